"""Search spaces: YAML files keyed by dotted RuntimeConfig paths, validated strictly on load.

File format (version 1):

    version: 1
    description: free text
    params:
      adaptive_k.threshold:  {type: float, low: 0.5, high: 1.0, step: 0.05}
      cache.capacity_experts: {type: int, low: layers, high: budget}
      cache.policy:          {type: categorical, choices: [lru, lfu, static, expertflow]}
      prefetch.adaptive:     {type: bool}
      cache.expertflow.decay: {type: float, low: 0.8, high: 0.99, when: {cache.policy: expertflow}}

* every key is a scalar field of `expertflow.config.RuntimeConfig` that the tuner may change
  (not model.*, memory.*, hardware.*, provenance.*, runtime.device/dtype/record_trace);
* `type` matches the field: int/float for numbers (or categorical of numbers), bool, and
  categorical for Literal fields (choices among the allowed values);
* `low`/`high` are numbers, a symbol, or NUMBER*SYMBOL; symbols are resolved at study time
  (`SYMBOLS`), then every bound is checked against the field's allowed range;
* `step` (grid) and `log` (log scale) as in Optuna, not both;
* `when: {other.key: value | [values]}` samples the parameter only when an unconditional
  categorical/bool parameter has one of those values (else the config keeps its value).

Errors raise `ConfigError` naming the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


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


def field_range(dotted: str) -> dict[str, float]:
    """{'ge'|'gt'|'le'|'lt': bound} of a RuntimeConfig field (empty if unbounded)."""
    _, info = _field(dotted)
    out: dict[str, float] = {}
    for m in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            v = getattr(m, name, None)
            if v is not None:
                out[name] = v
    return out


def _field(dotted: str):
    """(base annotation, FieldInfo) of a dotted RuntimeConfig path; KeyError if none."""
    from pydantic import BaseModel

    from expertflow.config import RuntimeConfig

    model: Any = RuntimeConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            raise KeyError(".".join(parts[:i + 1]))
        info = model.model_fields[part]
        model = _strip_optional(info.annotation)
    return model, info


def _strip_optional(ann):
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _fixed_reason(key: str) -> str | None:
    for prefix, why in FIXED.items():
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


def _allowed_keys() -> list[str]:
    from pydantic import BaseModel

    from expertflow.config import RuntimeConfig

    out = []

    def walk(model, prefix):
        for name, info in model.model_fields.items():
            ann = _strip_optional(info.annotation)
            key = prefix + name
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
            elif _fixed_reason(key) is None:
                out.append(key)

    walk(RuntimeConfig, "")
    return out


def _err(source: str, key: str, what: str, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: key {key!r}: {what}; allowed: {allowed}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_bound(source: str, key: str, name: str, value: Any):
    if _is_num(value):
        if not math.isfinite(value):
            raise _err(source, key, f"{name} {value!r} is not finite", "a finite number")
        return value
    if isinstance(value, str):
        m = _BOUND_RE.match(value)
        if m and m.group(2) in SYMBOLS:
            return value.replace(" ", "")
    raise _err(source, key, f"{name} {value!r} is not a number or symbol",
               f"a number, one of {', '.join(SYMBOLS)}, or NUMBER*SYMBOL (e.g. 0.5*budget)")


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


def _check_value_type(source: str, key: str, ann, value: Any) -> None:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        allowed = typing.get_args(ann)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise _err(source, key, f"choice {value!r} is not allowed", f"one of {list(allowed)}")
    elif ann is bool:
        if not isinstance(value, bool):
            raise _err(source, key, f"choice {value!r} is not a bool", "true or false")
    elif ann is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _err(source, key, f"choice {value!r} is not an integer", "integers")
    elif ann is float:
        if not _is_num(value):
            raise _err(source, key, f"choice {value!r} is not a number", "numbers")
    elif ann is str:
        if not isinstance(value, str):
            raise _err(source, key, f"choice {value!r} is not a string", "strings")


def _parse_param(source: str, key: str, spec: Any) -> Param:
    if not isinstance(key, str):
        raise ConfigError(f"{source}: params key {key!r} is not a dotted config key; write e.g. "
                          "cache.capacity_experts")
    why = _fixed_reason(key)
    if why is not None:
        raise _err(source, key, f"cannot be searched (it is {why})",
                   f"searchable keys: {', '.join(_allowed_keys())}")
    try:
        ann, _ = _field(key)
    except KeyError as exc:
        raise _err(source, key, f"not a RuntimeConfig field ({exc.args[0]!r} does not exist)",
                   f"searchable keys: {', '.join(_allowed_keys())}") from None
    from pydantic import BaseModel

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        first = next(iter(ann.model_fields))
        raise _err(source, key, "is a section, not a field", f"its fields, e.g. {key}.{first}")
    if not isinstance(spec, dict):
        raise _err(source, key, f"spec {spec!r} is not a mapping",
                   "a mapping like {type: int, low: 1, high: 8}")
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise _err(source, key, f"unknown spec field {unknown[0]!r}", ", ".join(sorted(PARAM_KEYS)))
    kind = spec.get("type")
    if kind not in TYPES:
        raise _err(source, key, f"type {kind!r} is not known", " | ".join(TYPES))
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        field_kind = "literal"
    elif ann in (bool, int, float, str):
        field_kind = ann.__name__
    else:
        raise _err(source, key, f"has type {ann!r}, which cannot be searched", "scalar fields only")
    fits = {"int": ("int", "float"), "float": ("float",), "bool": ("bool",),
            "categorical": ("literal", "int", "float", "bool", "str")}
    if field_kind not in fits[kind]:
        hint = {"literal": "categorical", "bool": "bool or categorical", "int": "int or categorical",
                "float": "float or categorical", "str": "categorical"}[field_kind]
        raise _err(source, key, f"type {kind!r} does not fit a {field_kind} field", hint)
    numeric = kind in ("int", "float")
    for name in ("low", "high", "step", "log"):
        if name in spec and not numeric:
            raise _err(source, key, f"{name} is given for type {kind}", "low/high/step/log only for int and float")
    if "choices" in spec and kind != "categorical":
        raise _err(source, key, f"choices given for type {kind}", "choices only for categorical")
    low = high = step = None
    log = False
    choices = None
    if numeric:
        for name in ("low", "high"):
            if name not in spec:
                raise _err(source, key, f"{name} is missing", f"{name}: a number or symbol")
        low = _parse_bound(source, key, "low", spec["low"])
        high = _parse_bound(source, key, "high", spec["high"])
        if kind == "int":
            for name, v in (("low", low), ("high", high)):
                if _is_num(v) and not float(v).is_integer():
                    raise _err(source, key, f"{name} {v!r} is not an integer", "integers for type int")
        if _is_num(low) and _is_num(high) and low > high:
            raise _err(source, key, f"low {low} > high {high}", "low <= high")
        step = spec.get("step")
        if step is not None and (not _is_num(step) or step <= 0 or
                                 (kind == "int" and not float(step).is_integer())):
            raise _err(source, key, f"step {step!r} is not a positive number",
                       "a positive integer for int, a positive number for float")
        if kind == "int" and step is not None:
            step = int(step)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise _err(source, key, f"log {log!r} is not a bool", "true or false")
        if log and step is not None:
            raise _err(source, key, "log and step are both given", "one of them (Optuna's rule)")
        if log and _is_num(low) and low <= 0:
            raise _err(source, key, f"log scale with low {low}", "low > 0 for a log scale")
        p = Param(key, kind, low, high, step, log)
        _check_range(source, p, field_range(key))
        return p
    if kind == "categorical":
        ch = spec.get("choices")
        if not isinstance(ch, list) or not ch:
            raise _err(source, key, f"choices {ch!r} is not a non-empty list", "a list of values")
        if len({repr(c) for c in ch}) != len(ch):
            raise _err(source, key, f"choices {ch!r} repeat a value", "distinct values")
        for c in ch:
            _check_value_type(source, key, ann, c)
        choices = tuple(ch)
        p = Param(key, kind, choices=choices)
        _check_range(source, p, field_range(key))
        return p
    return Param(key, "bool")


def _parse_when(source: str, key: str, when: Any, params: dict[str, Param]) -> tuple:
    if not isinstance(when, dict) or not when:
        raise _err(source, key, f"when {when!r} is not a mapping", "{other.key: value or [values]}")
    out = []
    for other, vals in when.items():
        ref = params.get(other)
        if ref is None or ref.type not in ("categorical", "bool"):
            raise _err(source, key, f"when names {other!r}, which is not a categorical or bool "
                       "parameter of this space", "a categorical/bool key of params")
        if ref.when:
            raise _err(source, key, f"when names {other!r}, which is itself conditional",
                       "an unconditional parameter (one level of conditions)")
        vals = tuple(vals) if isinstance(vals, list) else (vals,)
        for v in vals:
            if not ref.contains(v):
                raise _err(source, key, f"when {other}={v!r} is not among {other}'s values",
                           f"one of {list(ref.values())}")
        out.append((other, vals))
    return tuple(out)


def _ordered(params: dict[str, Param]) -> list[Param]:
    """Unconditional parameters first (conditions refer only to those)."""
    return [p for p in params.values() if not p.when] + [p for p in params.values() if p.when]


def parse_space(data: Any, source: str = "search space") -> SearchSpace:
    """Validate a parsed YAML mapping into a `SearchSpace` (bounds may stay symbolic)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with version and params, got "
                          f"{type(data).__name__}; see search_spaces/default.yaml")
    unknown = sorted(set(data) - {"version", "description", "params"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}; allowed: version, "
                          "description, params")
    version = data.get("version")
    if version != SPACE_VERSION:
        raise ConfigError(f"{source}: key 'version': got {version!r}; allowed: {SPACE_VERSION}")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: key 'params': got {raw!r}; allowed: a non-empty mapping of "
                          "dotted config keys to parameter specs")
    params: dict[str, Param] = {}
    whens: dict[str, Any] = {}
    for key, spec in raw.items():
        params[key] = _parse_param(source, key, spec)
        if isinstance(spec, dict) and "when" in spec:
            whens[key] = spec["when"]
    for key, when in whens.items():
        if when is not None:
            params[key] = replace(params[key], when=_parse_when(source, key, when, params))
    params = {p.key: p for p in _ordered(params)}
    desc = data.get("description") or ""
    return SearchSpace(params, source, str(desc), version)


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Load and validate a search-space YAML file."""
    from expertflow.config import read_yaml_file

    data = read_yaml_file(path, what="search space",
                          missing_hint="pass a YAML file (see search_spaces/default.yaml)")
    return parse_space(data, str(Path(path)))


def _load_text(text: str, source: str) -> SearchSpace:
    from expertflow.config import parse_yaml_text

    return parse_space(parse_yaml_text(text, what=f"search space {source!r}"), source)


def packaged_space(model_name: str | None = None) -> SearchSpace:
    """search_spaces/<alias>.yaml when one exists for `model_name`, else default.yaml."""
    import search_spaces

    for name in ([model_name] if model_name else []) + [search_spaces.DEFAULT]:
        if name and "/" not in name:
            f = search_spaces.packaged(name)
            if f is not None:
                return _load_text(f.read_text(encoding="utf-8"), f"search_spaces/{name}.yaml")
    raise ConfigError("search_spaces/default.yaml is missing from the installation; reinstall "
                      "expertflow")


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    """Ask `trial` (an optuna Trial) for a value of every active parameter of a resolved space."""
    values: dict[str, Any] = {}
    for p in _ordered(space.params):
        if not p.active(values):
            continue
        if p.symbolic:
            raise ConfigError(f"{space.source}: key {p.key!r} still has symbolic bounds; resolve the "
                              "space first (SearchSpace.resolve)")
        if p.type == "int":
            values[p.key] = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        elif p.type == "float":
            v = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
            values[p.key] = round(v, 10) if p.step else v  # 0.8500000000000001 -> 0.85
        else:
            values[p.key] = trial.suggest_categorical(p.key, list(p.values()))
    return values
