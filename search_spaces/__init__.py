"""Packaged search spaces: `default.yaml` and per-model files named after registry aliases.

`tuner.search_space` loads and validates them; this module only locates the files (through
importlib.resources, so an installed wheel finds them too).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

DEFAULT = "default"


def packaged(name: str) -> Traversable | None:
    """The packaged `<name>.yaml`, or None when there is none."""
    f = resources.files(__name__).joinpath(f"{name}.yaml")
    return f if f.is_file() else None


def available() -> list[str]:
    """Names of the packaged search spaces (without .yaml), sorted."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml"))
