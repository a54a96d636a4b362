"""Per-layer counters of the scheduler (Python lists on the hot path; JSON via `as_dict`)."""

from __future__ import annotations

INT_FIELDS = ("steps", "tokens", "hits", "misses", "demand_loads", "prefetch_issued",
              "prefetch_used", "prefetch_wasted", "evictions", "activated", "unique_needed")
FLOAT_FIELDS = ("dropped_mass", "stall_ms")


class Counters:
    """hits / misses count unique experts per layer visit (a resident expert needed by several
    tokens of a step is one hit). `activated` sums kept experts per token; `dropped_mass` sums
    the per-token share of top-k gate mass adaptive-k dropped. `stall_ms` is filled by whoever
    executes the decisions (the runtime measures it, the simulator predicts it)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        for name in INT_FIELDS:
            setattr(self, name, [0] * num_layers)
        for name in FLOAT_FIELDS:
            setattr(self, name, [0.0] * num_layers)

    def reset(self) -> None:
        for name in INT_FIELDS:
            setattr(self, name, [0] * self.num_layers)
        for name in FLOAT_FIELDS:
            setattr(self, name, [0.0] * self.num_layers)

    def sums(self) -> dict[str, float]:
        return {n: sum(getattr(self, n)) for n in INT_FIELDS + FLOAT_FIELDS}

    def totals(self) -> dict[str, float]:
        out = self.sums()
        lookups = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / lookups if lookups else 0.0
        # tokens counts token-layer visits; a model token visits every MoE layer once.
        tokens = out["tokens"] / self.num_layers if self.num_layers else 0
        out["model_tokens"] = tokens
        out["activated_per_token"] = out["activated"] / tokens if tokens else 0.0
        out["dropped_mass_per_token"] = out["dropped_mass"] / out["tokens"] if out["tokens"] else 0.0
        out["prefetch_precision"] = (out["prefetch_used"] / out["prefetch_issued"]
                                     if out["prefetch_issued"] else 0.0)
        return out

    def per_layer(self) -> dict[str, list]:
        return {n: list(getattr(self, n)) for n in INT_FIELDS + FLOAT_FIELDS}

    def as_dict(self) -> dict:
        return {"total": self.totals(), "per_layer": self.per_layer()}

    def decision_counts(self) -> dict[str, list[int]]:
        """The counts the runtime and the simulator must agree on exactly."""
        keys = ("hits", "misses", "demand_loads", "prefetch_issued", "prefetch_used",
                "prefetch_wasted", "evictions", "activated")
        return {n: list(getattr(self, n)) for n in keys}
