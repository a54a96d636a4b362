"""The search space's model: Param, SearchSpace, the symbols a bound may name, and the checks of
a resolved space. See tuner/search_space/."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from expertflow.config import field_range
from expertflow.errors import ConfigError

SPACE_VERSION = 1
TYPES = ("int", "float", "categorical", "bool")
PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "when"}
#: Symbols a bound may name; resolved by `resolve()` from the model, the budget and the trace.
SYMBOLS = {
    "budget": "expert slots the memory budget holds (MemoryPlan.capacity_experts)",
    "layers": "MoE layers",
    "experts": "routed experts per MoE layer",
    "total": "all routed experts (layers x experts)",
    "top_k": "experts per token of the router",
    "lookahead": "predictor distances recorded in the trace (the deepest useful prefetch)",
}
#: Sections and fields fixed by the model, the budget or the run, never searched.
FIXED = {
    "version": "the config format version",
    "model": "the model's identity",
    "memory": "the memory budget's accounting (set by --budget, --max-context, --max-batch)",
    "hardware": "the target GPU",
    "provenance": "where the config came from",
    "runtime.device": "where ef-run runs (a deploy-time choice)",
    "runtime.dtype": "the weight dtype (it sets the bytes per expert of the budget)",
    "runtime.record_trace": "a debugging switch",
    "cache.priors": "the profile's activation frequencies",
    "cache.per_layer_capacity": "a list (use cache.allocation)",
}
_BOUND_RE = re.compile(r"^\s*(?:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?([a-z_]+)\s*$")


@dataclass(frozen=True)
class Param:
    """One searched parameter. Bounds may still be symbolic until `SearchSpace.resolve`."""

    key: str
    type: str
    low: Any = None
    high: Any = None
    step: float | int | None = None
    log: bool = False
    choices: tuple | None = None
    when: tuple[tuple[str, tuple], ...] = ()

    @property
    def symbolic(self) -> bool:
        return isinstance(self.low, str) or isinstance(self.high, str)

    def values(self) -> tuple:
        """The categorical values (bool -> (False, True))."""
        if self.type == "bool":
            return (False, True)
        return tuple(self.choices or ())

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when)

    def as_dict(self) -> dict[str, Any]:
        """JSON form for tuning.json (`type` is one of int|float|categorical)."""
        if self.type in ("categorical", "bool"):
            d: dict[str, Any] = {"type": "categorical", "choices": list(self.values())}
        else:
            d = {"type": self.type, "low": self.low, "high": self.high}
            if self.step is not None:
                d["step"] = self.step
            if self.log:
                d["log"] = True
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when}
        return d

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this (resolved) parameter can take."""
        if self.type in ("categorical", "bool"):
            return any(value == c and type(value) is type(c) for c in self.values())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        if not self.low - 1e-12 <= value <= self.high + 1e-12:
            return False
        if self.step:
            q = (value - self.low) / self.step
            return abs(q - round(q)) < 1e-6
        return True

    def grid(self, points: int = 5) -> list:
        """Discretised values: every choice; numbers on the step grid, else `points` evenly
        spaced (geometrically when log), always including both bounds."""
        if self.type in ("categorical", "bool"):
            return list(self.values())
        lo, hi = self.low, self.high
        if self.step:
            n = int(math.floor((hi - lo) / self.step + 1e-9)) + 1
            vals = [lo + i * self.step for i in range(n)]
            if len(vals) > points:
                idx = sorted({round(i * (len(vals) - 1) / (points - 1)) for i in range(points)})
                vals = [vals[i] for i in idx]
        elif self.log:
            vals = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)] if hi > lo else [lo]
        else:
            vals = [lo + (hi - lo) * i / (points - 1) for i in range(points)] if hi > lo else [lo]
        if self.type == "int":
            vals = sorted({int(round(v)) for v in vals})
        else:
            vals = sorted({round(float(v), 10) for v in vals})
        return vals


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    source: str = "search space"
    description: str = ""
    version: int = SPACE_VERSION
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __iter__(self):
        return iter(self.params.values())

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def as_dict(self) -> dict[str, dict]:
        return {k: p.as_dict() for k, p in self.params.items()}

    def resolve(self, symbols: dict[str, int]) -> SearchSpace:
        """Replace symbolic bounds with numbers and check them against the config's ranges.

        A `low` above the resolved `high` (e.g. `low: layers` when the budget holds fewer slots
        than layers) is lowered to `high`, with a note.
        """
        notes = list(self.notes)
        out: dict[str, Param] = {}
        for key, p in self.params.items():
            if p.type in ("int", "float"):
                low = _resolve_bound(self.source, key, "low", p.low, symbols)
                high = _resolve_bound(self.source, key, "high", p.high, symbols)
                if p.type == "int":
                    low, high = int(math.ceil(low - 1e-9)), int(math.floor(high + 1e-9))
                if low > high:
                    if isinstance(p.low, str) or isinstance(p.high, str):
                        notes.append(f"{key}: low {p.low}={low} is above high {p.high}={high}; "
                                     f"searching {key} = {high} only")
                        low = high
                    else:
                        raise ConfigError(f"{self.source}: key {key!r}: low {low} > high {high}; "
                                          "write low <= high")
                p = replace(p, low=low, high=high)
                _check_range(self.source, p, field_range(key))
            out[key] = p
        _check_model_limits(self.source, out, symbols)
        return SearchSpace(out, self.source, self.description, self.version, tuple(notes))

    def restrict(self, key: str, choices: tuple, note: str) -> SearchSpace:
        """A copy whose categorical `key` keeps only `choices` (a context rule, e.g. no
        per-layer scope when the budget holds fewer slots than layers)."""
        if key not in self.params:
            return self
        p = self.params[key]
        keep = tuple(c for c in p.values() if c in choices)
        if not keep:
            raise ConfigError(f"{self.source}: key {key!r}: none of its choices {list(p.values())} "
                              f"is possible here ({note}); allow one of {list(choices)}")
        params = dict(self.params)
        params[key] = replace(p, type="categorical", choices=keep)
        return SearchSpace(params, self.source, self.description, self.version,
                           self.notes + (f"{key}: {note}",))

    def without(self, keys, note: str) -> SearchSpace:
        """A copy without `keys` (and the parameters sampled only `when` one of them is set):
        knobs the target executor does not have, e.g. prefetch on the graph engine."""
        drop = {k for k in keys if k in self.params}
        if not drop:
            return self
        drop |= {k for k, p in self.params.items() if {w for w, _ in p.when} & drop}
        params = {k: p for k, p in self.params.items() if k not in drop}
        return SearchSpace(params, self.source, self.description, self.version,
                           self.notes + (f"{', '.join(sorted(drop))}: {note}",))

    def defaults_from(self, config) -> dict[str, Any]:
        """The values `config` has for the active parameters of this space (for enqueueing).

        Values the space cannot take are left out (the sampler picks those).
        """
        values: dict[str, Any] = {}
        for p in _ordered(self.params):
            v = config.get(p.key)
            if p.key == "prefetch.width" and v == 0:
                v = config.model.top_k  # 0 means top_k
            if not p.active(values):
                continue
            if not p.contains(v):
                continue  # outside the space: the sampler picks this one
            values[p.key] = v
        return values


def _fixed_reason(key: str) -> str | None:
    for prefix, why in FIXED.items():
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


def _err(source: str, key: str, what: str, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: key {key!r}: {what}; allowed: {allowed}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _resolve_bound(source: str, key: str, name: str, value: Any, symbols: dict[str, int]) -> float:
    if _is_num(value):
        return value
    m = _BOUND_RE.match(value)
    sym = m.group(2)
    if sym not in symbols:
        raise _err(source, key, f"{name} {value!r} names {sym!r}, which is not known here",
                   f"symbols known now: {', '.join(sorted(symbols))}")
    factor = float(m.group(1)) if m.group(1) else 1.0
    v = factor * symbols[sym]
    return v if m.group(1) else symbols[sym]


def _check_range(source: str, p: Param, rng: dict[str, float]) -> None:
    parts = []
    if "ge" in rng:
        parts.append(f">= {rng['ge']}")
    if "gt" in rng:
        parts.append(f"> {rng['gt']}")
    if "le" in rng:
        parts.append(f"<= {rng['le']}")
    if "lt" in rng:
        parts.append(f"< {rng['lt']}")
    allowed = f"values {' and '.join(parts)} (the range of {p.key} in RuntimeConfig)"
    for name, v in (("low", p.low), ("high", p.high)):
        if not _is_num(v):
            continue
        ok = (("ge" not in rng or v >= rng["ge"]) and ("gt" not in rng or v > rng["gt"])
              and ("le" not in rng or v <= rng["le"]) and ("lt" not in rng or v < rng["lt"]))
        if not ok:
            raise _err(source, p.key, f"{name} {v!r} is outside the field's range", allowed)
    for c in p.choices or ():
        if _is_num(c) and not (("ge" not in rng or c >= rng["ge"]) and ("gt" not in rng or c > rng["gt"])
                               and ("le" not in rng or c <= rng["le"]) and ("lt" not in rng or c < rng["lt"])):
            raise _err(source, p.key, f"choice {c!r} is outside the field's range", allowed)


def _check_model_limits(source: str, params: dict[str, Param], symbols: dict[str, int]) -> None:
    """Cross-field limits RuntimeConfig checks against the model (min_k <= top_k, ...)."""
    limits = {"adaptive_k.min_k": ("top_k", "the router's top_k"),
              "cache.capacity_experts": ("total", "all experts of the model"),
              "prefetch.width": ("top_k", "the router's top_k (predictions are top-k lists)")}
    for key, (sym, what) in limits.items():
        p = params.get(key)
        if p is None or sym not in symbols:
            continue
        hi = max(p.values()) if p.type == "categorical" else p.high
        if _is_num(hi) and hi > symbols[sym]:
            raise _err(source, key, f"high {hi} exceeds {what} = {symbols[sym]}",
                       f"at most {sym} ({symbols[sym]})")


def _ordered(params: dict[str, Param]) -> list[Param]:
    """Unconditional parameters first (conditions refer only to those)."""
    return [p for p in params.values() if not p.when] + [p for p in params.values() if p.when]
