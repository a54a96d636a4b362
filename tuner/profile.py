"""The profile: what `ef-profile` measures and `ef-tune` / the simulator / the report read.

A profile is a directory (version 1):

    profile.yaml         metadata (below); written last, so its presence marks a complete profile
    trace.npz            the routing trace (expertflow.trace format)
    activation.parquet   layer, expert, count, frequency            (frequency: share of the layer's
                                                                    expert activations; rows sum to 1)
    coactivation.parquet layer, expert_a, expert_b, count           (pairs chosen by the same token)
    transitions.parquet  layer, expert_from, expert_to, probability (layer -> layer+1, same token)
    reuse.parquet        layer, distance, count                     (tokens between two uses of an
                                                                    expert in one layer and sequence)
    predictor.parquet    lookahead, layer, recall, precision         (next-gate predictor, d = 1..4)
    transfer.parquet     bytes, pinned, concurrency, median_ms, p10_ms, p90_ms, gbps
    kernel.parquet       tokens, median_ms, p10_ms, p90_ms           (one expert's FFN, the runtime's kernel)
    layer.parquet        tokens, median_ms, p10_ms, p90_ms           (non-expert part of one decoder layer)
    runtime.parquet      name, value                                 (calibration of the real runtime:
                                                                    decode_layer_ms, sync_ms, ...; the
                                                                    graph engine's engine_layer_ms_b1, ...)
    engine.parquet       tokens, hits, misses, median_ms, p10_ms,    (GPU profiles: the graph engine's
                         p90_ms                                       experts kernel, hits from slots,
                                                                    misses zero-copy; optional)

profile.yaml keys:
    version, profile_id, created_at, tool_version
    model:     name, architecture, fingerprint, dims (ModelSpec.dims()), dtype, bytes_per_expert
    hardware:  device (cuda|cpu), gpu_name, gpu_memory_bytes, pcie_generation, pcie_width,
               driver_version, cuda_version, torch_version, transformers_version, host_cpu,
               host_memory_bytes, source ("measured" | "bundled:<name>")
    routing:   kind ("real" | "synthetic"), tokens, prompts, source, note (words for the report;
               says plainly when routing is synthetic), synthetic (generator params or null)
    timing:    kind ("measured-gpu" | "measured-cpu" | "bundled:<name>"), note
    summary:   headline numbers (pinned_gbps, pageable_gbps, expert_copy_ms, expert_kernel_ms,
               layer_ms, decode_layer_ms, ...)
    files:     {table name: file name}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from expertflow.errors import DataError, OutputError
from expertflow.fsutil import atomic_path, foreign_entries, read_versioned
from expertflow.trace import RoutingTrace

from .numeric import piecewise_linear
from .records import PROFILE_VERSION, ProfileMeta, validation_summary
TABLES = ("activation", "coactivation", "transitions", "reuse", "predictor", "transfer", "kernel",
          "layer", "runtime", "engine")
OPTIONAL_TABLES = ("engine",)  # measured on a GPU only (the graph engine runs on CUDA)
REQUIRED_COLUMNS = {
    "activation": ["layer", "expert", "count", "frequency"],
    "coactivation": ["layer", "expert_a", "expert_b", "count"],
    "transitions": ["layer", "expert_from", "expert_to", "probability"],
    "reuse": ["layer", "distance", "count"],
    "predictor": ["lookahead", "layer", "recall", "precision"],
    "transfer": ["bytes", "pinned", "concurrency", "median_ms", "p10_ms", "p90_ms", "gbps"],
    "kernel": ["tokens", "median_ms", "p10_ms", "p90_ms"],
    "layer": ["tokens", "median_ms", "p10_ms", "p90_ms"],
    "runtime": ["name", "value"],
    "engine": ["tokens", "hits", "misses", "median_ms"],
}


def interpolate(table: pd.DataFrame, x_col: str, x: float, y_col: str = "median_ms") -> float:
    """`y_col` at `x_col` = x in a profile table, by the tuner's one rule
    (`tuner.numeric.piecewise_linear`: flat below the first point, linear inside, linear
    extrapolation past the last, never < 0)."""
    if len(table) == 0:
        raise DataError(f"profile table for {y_col} vs {x_col} is empty; re-run ef-profile")
    t = table.sort_values(x_col)
    return piecewise_linear(t[x_col].to_numpy(dtype=np.float64), t[y_col].to_numpy(dtype=np.float64), x)


@dataclass
class TimingTables:
    """A profile's timing tables and how the simulator reads them (interpolated, the tuner's one
    rule). A Profile is one; bundled hardware tables without a trace are one too."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    name: str = "timing tables"  # how messages call it

    def copy_ms(self, nbytes: int, concurrency: int = 1, pinned: bool = True) -> float:
        """Host->device time of one copy of `nbytes` (interpolated in bytes)."""
        t = self.tables["transfer"]
        sub = t[(t["pinned"] == pinned) & (t["concurrency"] == concurrency)]
        if sub.empty:
            sub = t[t["pinned"] == pinned]
        return interpolate(sub, "bytes", float(nbytes))

    def expert_kernel_ms(self, tokens: int) -> float:
        return interpolate(self.tables["kernel"], "tokens", float(tokens))

    def layer_ms(self, tokens: int) -> float:
        """Non-expert part of one decoder layer for `tokens` tokens."""
        return interpolate(self.tables["layer"], "tokens", float(tokens))

    def runtime_value(self, name: str, default: float | None = None) -> float:
        t = self.tables.get("runtime")
        if t is not None:
            row = t[t["name"] == name]
            if len(row):
                return float(row["value"].iloc[0])
        if default is None:
            raise DataError(f"{self.name} has no runtime calibration {name!r}; re-run ef-profile")
        return default


@dataclass
class Profile(TimingTables):
    """A profile: what it is of and how it was measured (`meta`, profile.yaml), the routing
    trace, and the tables (activation statistics and timing)."""

    meta: ProfileMeta | None = None
    trace: RoutingTrace | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.meta, ProfileMeta):
            raise TypeError("Profile.meta must be a tuner.records.ProfileMeta")
        self.name = f"profile {self.meta.profile_id!r}"

    # ---- identity --------------------------------------------------------------------------
    @property
    def profile_id(self) -> str:
        return self.meta.profile_id

    @property
    def routing_kind(self) -> str:
        return self.meta.routing.kind

    @property
    def fingerprint(self) -> str:
        return self.meta.model.fingerprint

    def priors(self) -> np.ndarray:
        """Activation frequency [L, E] (rows sum to 1)."""
        a = self.tables["activation"]
        out = np.zeros((self.trace.num_layers, self.trace.num_experts))
        out[a["layer"].to_numpy(int), a["expert"].to_numpy(int)] = a["frequency"].to_numpy(float)
        return out

    # ---- io --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the profile directory atomically: built beside it, then swapped in.

        Never deletes what it did not write: a `directory` that is a file, or a folder holding
        anything but a profile's own files, is refused (OutputError) unless `force`, which
        writes each of our files into it atomically (profile.yaml last) and leaves the rest.
        """
        target = Path(directory)
        if target.exists() and not target.is_dir():
            raise OutputError(f"profile folder {str(target)!r} is a file; pass a folder path for the profile")
        foreign = foreign_entries(target, is_profile_file) if target.is_dir() else []
        if foreign and not force:
            raise OutputError(f"profile folder {str(target)!r} holds files that are not a profile's "
                              f"({', '.join(foreign[:4])}); pass a new or empty folder, or --force to "
                              "write the profile beside them (none of them is deleted)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the usual mode
        try:
            self.trace.save(tmp / "trace.npz")
            files = {"trace": "trace.npz"}
            for name, df in self.tables.items():
                df.to_parquet(tmp / f"{name}.parquet", index=False)
                files[name] = f"{name}.parquet"
            meta = self.meta.model_copy(update={"files": files}).model_dump(mode="json")
            (tmp / "profile.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
            if foreign:  # --force into a folder of other files: ours one by one, theirs kept
                with contextlib.suppress(FileNotFoundError):
                    (target / "profile.yaml").unlink()  # incomplete until the new one lands
                for f in sorted(tmp.iterdir(), key=lambda f: f.name == "profile.yaml"):
                    with atomic_path(target / f.name) as t:
                        shutil.copyfile(f, t)
                shutil.rmtree(tmp, ignore_errors=True)
            elif target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = target
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Profile:
        d = Path(directory)
        meta_file = d / "profile.yaml"
        if not meta_file.is_file():
            raise DataError(f"{str(d)!r} is not a profile: no profile.yaml in it (incomplete or "
                            "wrong folder); run ef-profile --out DIR")
        raw = read_versioned(meta_file, yaml.safe_load, version=PROFILE_VERSION,
                             source=f"profile file {str(meta_file)!r}", redo="re-run ef-profile",
                             errors=(yaml.YAMLError,))
        try:
            meta = ProfileMeta.model_validate(raw)
        except ValidationError as exc:
            raise DataError(f"profile file {str(meta_file)!r} is not a profile record "
                            f"({validation_summary(exc)}); it is truncated or from another tool; "
                            "re-run ef-profile") from None
        files = meta.files
        trace = RoutingTrace.load(d / files.get("trace", "trace.npz"))
        tables: dict[str, pd.DataFrame] = {}
        for name in TABLES:
            fname = files.get(name)
            if fname is None:
                continue
            try:
                df = pd.read_parquet(d / fname)
            except Exception as exc:  # pyarrow raises several unrelated types for bad files
                raise DataError(f"profile table {str(d / fname)!r} is corrupt or truncated "
                                f"({exc.__class__.__name__}); re-run ef-profile") from None
            missing = [c for c in REQUIRED_COLUMNS[name] if c not in df.columns]
            if missing:
                raise DataError(f"profile table {str(d / fname)!r} lacks columns {missing}; re-run ef-profile")
            tables[name] = df
        for name in ("activation", "transfer", "kernel", "layer"):
            if name not in tables:
                raise DataError(f"profile {str(d)!r} lacks the {name!r} table; re-run ef-profile")
        return cls(tables=tables, meta=meta, trace=trace, path=d)


def is_profile_file(name: str) -> bool:
    """A name a profile folder holds (what Profile.save writes)."""
    return name in ("profile.yaml", "trace.npz") or (name.endswith(".parquet") and name[:-8] in TABLES)


def new_profile_id(model_name: str, device_label: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(model_name).name)
    dev = "".join(ch if ch.isalnum() else "-" for ch in device_label.lower()).strip("-")
    return f"{safe}-{dev}-{stamp}"
