"""Bundled hardware profiles: timing measured on a real GPU and shipped with the package, so
that `ef-tune` on a machine without a GPU tunes for that GPU (`--hardware h200`).

Layout (written by bench/bundle_hardware.py on the GPU machine):

    tuner/data/hardware/<name>/<model alias>/
        hardware.yaml       name, model, fingerprint, dtype, bytes_per_expert, hardware {...},
                            timing {kind, note}, summary {...}, created_at, tool_version
        transfer.parquet  kernel.parquet  layer.parquet  runtime.parquet   (tuner/profile.py)
        engine.parquet    (the graph engine's experts kernel; GPU bundles made since 2026-12-03)

Tables are keyed by alias and checked against the model's dims fingerprint; a checkpoint
directory whose fingerprint equals an alias's uses that alias's tables.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from expertflow.config import now_iso, tool_version
from expertflow.errors import DataError
from expertflow.fsutil import atomic_path, atomic_write_text
from expertflow.registry import ModelSpec

TIMING_TABLES = ("transfer", "kernel", "layer", "runtime", "engine")
OPTIONAL_TABLES = ("engine",)  # GPU bundles only: the graph engine's experts kernel
ROOT_ENV = "EXPERTFLOW_HARDWARE_DIR"  # override of the bundle root (tests, custom bundles)


def hardware_root() -> Path:
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else Path(str(resources.files("tuner") / "data" / "hardware"))


def bundled_hardware_names(root: Path | None = None) -> list[str]:
    """Names of the bundled hardware profiles that hold at least one model."""
    r = root or hardware_root()
    if not r.is_dir():
        return []
    return sorted(d.name for d in r.iterdir()
                  if d.is_dir() and any((m / "hardware.yaml").is_file() for m in d.iterdir() if m.is_dir()))


def _entries(base: Path) -> list[tuple[Path, dict]]:
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        f = d / "hardware.yaml"
        if f.is_file():
            try:
                meta = yaml.safe_load(f.read_text(encoding="utf-8"))
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                raise DataError(f"bundled hardware file {str(f)!r} is corrupt; re-run "
                                "bench/bundle_hardware.py") from None
            if isinstance(meta, dict):
                out.append((d, meta))
    return out


def load_bundled(name: str, spec: ModelSpec, root: Path | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """(hardware dict, timing tables) of bundle `name` for `spec`. Raises DataError.

    The hardware dict is profile.yaml's block with source "bundled:<name>", plus bundle_model,
    bundle_dtype, bundle_created_at and bundle_timing_note.
    """
    r = root or hardware_root()
    base = r / name
    names = bundled_hardware_names(r)
    if name not in names:
        have = ", ".join(names) or "none (run bench/bundle_hardware.py on the GPU to make one)"
        raise DataError(f"no bundled hardware profile {name!r}; bundled: {have}; or profile on the "
                        "GPU machine itself")
    entries = _entries(base)
    match = [(d, m) for d, m in entries if d.name == spec.name]
    if match and match[0][1].get("fingerprint") != spec.fingerprint:
        raise DataError(f"bundled hardware {name!r} for {spec.name!r} was made for dims "
                        f"{match[0][1].get('fingerprint')!r}, but the model has {spec.fingerprint!r}; "
                        "re-run bench/bundle_hardware.py")
    if not match:
        match = [(d, m) for d, m in entries if m.get("fingerprint") == spec.fingerprint]
    if not match:
        models = ", ".join(d.name for d, _ in entries) or "none"
        raise DataError(f"bundled hardware {name!r} has no timing for {spec.name!r} (fingerprint "
                        f"{spec.fingerprint}); it covers: {models}; profile on the GPU machine or "
                        "run bench/bundle_hardware.py there for this model")
    d, meta = match[0]
    tables = {}
    for t in TIMING_TABLES:
        f = d / f"{t}.parquet"
        if t in OPTIONAL_TABLES and not f.exists():
            continue
        try:
            tables[t] = pd.read_parquet(f)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several unrelated types for bad files
            raise DataError(f"bundled table {str(f)!r} is missing or corrupt ({exc.__class__.__name__}); "
                            "re-run bench/bundle_hardware.py") from None
    hardware = dict(meta.get("hardware") or {})
    timing = meta.get("timing") or {}
    hardware.update(source=f"bundled:{name}", bundle_model=d.name, bundle_dtype=meta.get("dtype"),
                    bundle_created_at=meta.get("created_at"), bundle_timing_note=timing.get("note"))
    return hardware, tables


def save_bundled(name: str, alias: str, *, fingerprint: str, dtype: str, bytes_per_expert: int,
                 hardware: dict, timing: dict, summary: dict, tables: dict[str, pd.DataFrame],
                 root: Path | None = None) -> Path:
    """Write one bundle entry (used by bench/bundle_hardware.py and tests)."""
    d = (root or hardware_root()) / name / alias
    d.mkdir(parents=True, exist_ok=True)
    for t in TIMING_TABLES:
        if t not in tables:
            continue
        with atomic_path(d / f"{t}.parquet") as tmp:
            tables[t].to_parquet(tmp, index=False)
    meta = {"name": name, "model": alias, "fingerprint": fingerprint, "dtype": dtype,
            "bytes_per_expert": int(bytes_per_expert), "hardware": hardware, "timing": timing,
            "summary": summary, "created_at": now_iso(), "tool_version": tool_version()}
    atomic_write_text(d / "hardware.yaml", yaml.safe_dump(meta, sort_keys=False))
    return d
