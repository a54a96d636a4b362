"""Reading a search space: YAML text or data to a SearchSpace, every key and bound checked
against RuntimeConfig. See tuner/search_space/."""

from __future__ import annotations

import math
import os
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import search_spaces
from expertflow.config import (
    config_field,
    field_range,
    leaf_fields,
    parse_yaml_text,
    read_yaml_file,
)
from expertflow.errors import ConfigError

from .model import (
    _BOUND_RE,
    PARAM_KEYS,
    SPACE_VERSION,
    SYMBOLS,
    TYPES,
    Param,
    SearchSpace,
    _check_range,
    _err,
    _fixed_reason,
    _is_num,
    _ordered,
)


def _allowed_keys() -> list[str]:
    return [k for k in leaf_fields() if _fixed_reason(k) is None]


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
        ann, _ = config_field(key)
    except KeyError as exc:
        raise _err(source, key, f"not a RuntimeConfig field ({exc.args[0]!r} does not exist)",
                   f"searchable keys: {', '.join(_allowed_keys())}") from None
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
    if numeric:
        return _numeric_param(source, key, kind, spec)
    if kind == "categorical":
        return _categorical_param(source, key, ann, spec)
    return Param(key, "bool")


def _numeric_param(source: str, key: str, kind: str, spec: dict) -> Param:
    """An int or float parameter: bounds (numbers or symbols), step or log scale, in the field's range."""
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


def _categorical_param(source: str, key: str, ann: Any, spec: dict) -> Param:
    """A categorical parameter: distinct choices, each a value the field takes."""
    ch = spec.get("choices")
    if not isinstance(ch, list) or not ch:
        raise _err(source, key, f"choices {ch!r} is not a non-empty list", "a list of values")
    if len({repr(c) for c in ch}) != len(ch):
        raise _err(source, key, f"choices {ch!r} repeat a value", "distinct values")
    for c in ch:
        _check_value_type(source, key, ann, c)
    p = Param(key, "categorical", choices=tuple(ch))
    _check_range(source, p, field_range(key))
    return p


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
    data = read_yaml_file(path, what="search space",
                          missing_hint="pass a YAML file (see search_spaces/default.yaml)")
    return parse_space(data, str(Path(path)))


def _load_text(text: str, source: str) -> SearchSpace:
    return parse_space(parse_yaml_text(text, what=f"search space {source!r}"), source)


def packaged_space(model_name: str | None = None) -> SearchSpace:
    """search_spaces/<alias>.yaml when one exists for `model_name`, else default.yaml."""
    for name in ([model_name] if model_name else []) + [search_spaces.DEFAULT]:
        if name and "/" not in name:
            f = search_spaces.packaged(name)
            if f is not None:
                return _load_text(f.read_text(encoding="utf-8"), f"search_spaces/{name}.yaml")
    raise ConfigError("search_spaces/default.yaml is missing from the installation; reinstall "
                      "expertflow")
