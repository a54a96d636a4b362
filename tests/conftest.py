"""Shared test helpers and fixtures.

Use the fixtures below rather than `from conftest import ...`: with several conftest.py files
(tests/reports/ has one) the module named `conftest` is whichever pytest imported last.

Module-level helpers:

* `REPO_ROOT`        the repository root (a `Path`).
* `pydocs_path()`    the trained pydocs-moe checkpoint, from $EXPERTFLOW_PYDOCS or
                     <repo>/../shared/models/pydocs-moe; `None` when absent.
* `require_pydocs()` the same path, or `pytest.skip` with the reason when it is absent.
* `tiny_config(name, budget=..., values=..., **overrides)`  a CPU float32 RuntimeConfig for a
                     tiny-* alias (`expertflow.config.default_config` + `with_values`).

* `folder_state(path)` every file and folder under `path` (relative name -> size and content
                     hash; None when `path` does not exist), for before/after checks.

Fixtures: `repo_root`, `pydocs` (skips when absent), `tiny_config` (the helper itself,
session-scoped so module-scoped fixtures can use it), `left_as_found` (snapshot an output
folder before a command and check after it that nothing was added, changed or deleted).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PYDOCS_ENV = "EXPERTFLOW_PYDOCS"


def pydocs_path() -> Path | None:
    """The pydocs-moe checkpoint directory, or None when it is not on this machine."""
    env = os.environ.get(PYDOCS_ENV)
    candidate = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "models" / "pydocs-moe"
    return candidate if (candidate / "config.json").is_file() else None


def pydocs_skip_reason() -> str:
    where = os.environ.get(PYDOCS_ENV) or str(REPO_ROOT.parent / "shared" / "models" / "pydocs-moe")
    return (f"pydocs-moe checkpoint not found at {where} (set ${PYDOCS_ENV} to its directory to run "
            "the tests that need learned routing)")


def require_pydocs() -> Path:
    path = pydocs_path()
    if path is None:
        pytest.skip(pydocs_skip_reason())
    return path


def tiny_config(name: str = "tiny-qwen2-moe", *, budget: str = "1GiB",
                values: dict[str, Any] | None = None, **overrides: Any):
    """A validated CPU/float32 `RuntimeConfig` for a tiny-* alias.

    Overrides are dotted config keys, given either in `values` ({'prefetch.depth': 2}) or as
    keyword arguments with `__` for the dots (`prefetch__depth=2`). The default budget holds
    every expert of a tiny model; lower `cache__capacity_experts` for a cache that misses.
    """
    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model

    spec = resolve_model(name)
    plan = plan_memory(spec, budget, max_context_tokens=256, prefill_chunk_tokens=64,
                       dtype="float32")
    config = default_config(spec, plan, device="cpu", dtype="float32")
    merged = dict(values or {})
    merged.update({key.replace("__", "."): value for key, value in overrides.items()})
    return config.with_values(merged) if merged else config


def folder_state(path: Path) -> dict[str, tuple] | None:
    """{relative path: ('dir',) or (size, sha256)} of everything under `path` (hidden entries
    included, so a `.NAME.old-PID` or temporary left behind shows); None when it is absent."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())}
    state: dict[str, tuple] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        state[rel] = ("dir",) if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


class LeftAsFound:
    """`watch(path)` before a failing command, `check()` after: the folders are as they were
    (nothing written, nothing deleted), and the parent holds no leftover of ours either."""

    def __init__(self):
        self._watched: list[tuple[Path, Any, Any]] = []

    def watch(self, *paths: Path) -> LeftAsFound:
        for p in paths:
            p = Path(p)
            self._watched.append((p, folder_state(p), sorted(x.name for x in p.parent.iterdir())
                                  if p.parent.is_dir() else None))
        return self

    def check(self) -> None:
        for p, before, siblings in self._watched:
            after = folder_state(p)
            assert after == before, f"{p} changed: before {before}, after {after}"
            now = sorted(x.name for x in p.parent.iterdir()) if p.parent.is_dir() else None
            assert now == siblings, f"{p.parent} changed: before {siblings}, after {now}"


@pytest.fixture
def left_as_found() -> LeftAsFound:
    """Snapshot output folders (`left_as_found.watch(path)`) and `check()` them after a command."""
    return LeftAsFound()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def pydocs() -> Path:
    """The pydocs-moe checkpoint directory; skips the test with a reason when it is absent."""
    return require_pydocs()


@pytest.fixture(name="tiny_config", scope="session")
def _tiny_config_fixture():
    """The `tiny_config(name, **overrides)` helper, as a fixture."""
    return tiny_config
