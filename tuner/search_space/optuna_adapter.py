"""The search space and Optuna: a trial's values for every active parameter. See tuner/search_space/."""

from __future__ import annotations

from typing import Any

from expertflow.errors import ConfigError

from .model import SearchSpace, _ordered


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
