"""One trial: the config a trial's values make, its simulation, its metrics and constraints.

`StudyContext` is everything a trial needs (picklable, for `--jobs` workers); `Objective` is the
function Optuna calls. The constraints are defined in tuner/trials.py and tuner/study.py.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from .coordination import TEST_ASLEEP_ATTR, TEST_SLEEP_ENV
from .search_space import SearchSpace, suggest
from .simulator import simulate
from .trials import FAIL_KIND_ERROR, TrialFailed, feasible, trial_constraints

log = logging.getLogger(__name__)


@dataclass
class StudyContext:
    """Everything a trial needs (picklable, so worker processes can get a copy)."""

    trace: Any  # expertflow.trace.RoutingTrace
    costs: Any  # tuner.simulator.Costs
    base_config: Any  # expertflow.config.RuntimeConfig: the default config of this model/budget
    space: SearchSpace  # resolved
    quality_cap: float | None = None
    # (renormalize, min_k) -> {threshold: loss} (tuner.quality.measure_tables); a bare
    # renormalize key is min_k 1 (contexts pickled before min_k was measured)
    quality_tables: dict[Any, dict[float, float]] | None = None
    max_decode_tokens: int | None = 256
    prompt_tokens: int = 16
    simulate_fn: Any = None  # tests may inject a stand-in for tuner.simulator.simulate

    @property
    def budget_limit_bytes(self) -> int:
        m = self.base_config.memory
        return m.budget_bytes - m.margin_bytes


def trial_config(base, values: dict[str, Any]):
    """`base` with the trial's dotted values. A cache larger than the budget's expert cache
    gets a budget stretched to fit (for simulation only; the memory constraint judges it)."""
    cap = values.get("cache.capacity_experts", base.cache.capacity_experts)
    mem = base.memory
    need = int(cap) * mem.bytes_per_expert
    if need > mem.expert_cache_bytes:
        extra = need - mem.expert_cache_bytes
        values = {**values, "memory.expert_cache_bytes": need,
                  "memory.budget_bytes": mem.budget_bytes + extra}
    return base.with_values(values)


def quality_table_for(ctx: StudyContext, config) -> dict[float, float] | None:
    """The measured {threshold: loss} table for this config's adaptive-k (renormalize, min_k).
    A min_k that was not measured takes the nearest measured one below it: keeping at least as
    many experts, its loss is the lower min_k's or less, so that table errs on the safe side."""
    if not ctx.quality_tables:
        return None
    a = config.adaptive_k
    keyed = {(k if isinstance(k, tuple) else (bool(k), 1)): v for k, v in ctx.quality_tables.items()}
    renorm = bool(a.renormalize) if any(r == bool(a.renormalize) for r, _ in keyed) else \
        (False if any(r is False for r, _ in keyed) else next(iter(keyed))[0])
    measured = sorted(mk for r, mk in keyed if r == renorm)
    below = [mk for mk in measured if mk <= int(a.min_k)]
    return keyed[(renorm, below[-1] if below else measured[0])]


def evaluate(ctx: StudyContext, values: dict[str, Any], *, max_decode_tokens: int | None | str = "study"
             ) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, constraints) of the config with `values`. Raises TrialFailed on NaN/inf."""
    config = trial_config(ctx.base_config, values)
    n = ctx.max_decode_tokens if max_decode_tokens == "study" else max_decode_tokens
    sim = ctx.simulate_fn or simulate
    res = sim(ctx.trace, ctx.costs, config, prompt_tokens=ctx.prompt_tokens, max_decode_tokens=n,
              quality_table=quality_table_for(ctx, config))
    metrics = {k: float(v) for k, v in res.metrics.items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrialFailed(f"simulator returned non-finite {bad[0]}={metrics[bad[0]]}")
    cons = trial_constraints(metrics, budget_bytes=ctx.base_config.memory.budget_bytes,
                             margin_bytes=ctx.base_config.memory.margin_bytes, quality_cap=ctx.quality_cap)
    return metrics, cons


class Objective:
    """The trial function. A config proposed twice (TPE on a mostly discrete space does that)
    is simulated once per process: the simulator is deterministic."""

    def __init__(self, ctx: StudyContext):
        self.ctx = ctx
        self._memo: dict[tuple, tuple[dict, dict]] = {}
        self._sleep_s = float(os.environ.get(TEST_SLEEP_ENV) or 0.0)

    def __call__(self, trial) -> tuple[float, float]:
        values = suggest(trial, self.ctx.space)
        if self._sleep_s:  # test-only (tuner/coordination.py): a trial long enough to kill
            trial.set_user_attr(TEST_ASLEEP_ATTR, True)  # its params are all in the storage now
            time.sleep(self._sleep_s)
        key = tuple(sorted(values.items()))
        try:
            if key not in self._memo:
                self._memo[key] = evaluate(self.ctx, values)
            metrics, cons = self._memo[key]
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", str(exc))
            trial.set_user_attr("fail_kind", FAIL_KIND_ERROR)  # counts toward --trials (trials.tally)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails this trial, not the study
            reason = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("trial %d failed: %s (params %s)", trial.number, reason, values)
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_kind", FAIL_KIND_ERROR)
            raise TrialFailed(reason) from exc
        for key, value in cons.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("feasible", feasible(cons))
        return metrics["decode_tokens_per_s"], metrics["quality_loss"]
