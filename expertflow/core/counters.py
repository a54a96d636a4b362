"""Per-layer counters of the scheduler (plain numpy arrays; JSON via `as_dict`)."""

from __future__ import annotations

import numpy as np

_INT_FIELDS = ("steps", "tokens", "hits", "misses", "demand_loads", "prefetch_issued",
               "prefetch_used", "prefetch_wasted", "evictions", "activated", "unique_needed")
_FLOAT_FIELDS = ("dropped_mass", "stall_ms")


class Counters:
    """hits / misses count unique experts per layer visit (a resident expert needed by several
    tokens of a step is one hit). `activated` sums kept experts per token; `dropped_mass` sums
    the per-token share of top-k gate mass adaptive-k dropped. `stall_ms` is filled by whoever
    executes the decisions (the runtime measures it, the simulator predicts it)."""

    def __init__(self, num_layers: int, max_distance: int = 1):
        self.num_layers = num_layers
        for name in _INT_FIELDS:
            setattr(self, name, np.zeros(num_layers, dtype=np.int64))
        for name in _FLOAT_FIELDS:
            setattr(self, name, np.zeros(num_layers, dtype=np.float64))

    def reset(self) -> None:
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            getattr(self, name)[:] = 0

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {n: int(getattr(self, n).sum()) for n in _INT_FIELDS}
        out.update({n: float(getattr(self, n).sum()) for n in _FLOAT_FIELDS})
        lookups = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / lookups if lookups else 0.0
        tokens_per_layer = out["tokens"] / self.num_layers if self.num_layers else 0
        out["activated_per_token"] = out["activated"] / out["tokens"] * self.num_layers if out["tokens"] else 0.0
        out["dropped_mass_per_token"] = out["dropped_mass"] / out["tokens"] if out["tokens"] else 0.0
        out["prefetch_precision"] = (out["prefetch_used"] / out["prefetch_issued"]
                                     if out["prefetch_issued"] else 0.0)
        out["tokens_per_layer"] = tokens_per_layer
        return out

    def per_layer(self) -> dict[str, list]:
        return {n: getattr(self, n).tolist() for n in _INT_FIELDS + _FLOAT_FIELDS}

    def as_dict(self) -> dict:
        return {"total": self.totals(), "per_layer": self.per_layer()}

    def decision_counts(self) -> dict[str, list[int]]:
        """The counts the runtime and the simulator must agree on exactly."""
        keys = ("hits", "misses", "demand_loads", "prefetch_issued", "prefetch_used",
                "prefetch_wasted", "evictions", "activated")
        return {n: getattr(self, n).tolist() for n in keys}
