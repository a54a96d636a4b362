"""Choose the config to deploy and write it as config.yaml with its provenance.

Rule: the fastest feasible trial within the quality cap ("feasible": its predicted peak fits
the memory budget; "within the cap": quality_loss <= cap, when a cap is set). Ties go to the
lower quality loss, then the earlier trial. The study's trials are scored on a slice of the
trace; `rescore` re-simulates the best few on a longer slice before the final choice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from expertflow.config import now_iso, save_config, tool_version
from expertflow.errors import BudgetError, ConfigError

from .objective import StudyContext, evaluate, trial_config
from .records import TrialRecord
from .trials import feasible

log = logging.getLogger(__name__)

RULE = "fastest feasible trial within the quality cap"


def within_cap(trial: TrialRecord, cap: float | None) -> bool:
    return cap is None or _quality(trial) <= cap + 1e-12


def _speed(t: TrialRecord) -> float:
    return float(t.metrics.get("decode_tokens_per_s", t.values[0]))


def _quality(t: TrialRecord) -> float:
    return float(t.metrics.get("quality_loss", t.values[1]))


def ranked(trials: list[TrialRecord], cap: float | None) -> list[TrialRecord]:
    """Feasible trials within the cap, best first by the rule."""
    ok = [t for t in trials if t.feasible and within_cap(t, cap)]
    return sorted(ok, key=lambda t: (-_speed(t), _quality(t), t.number))


def choose(trials: list[TrialRecord], cap: float | None, *, study_name: str = "the study") -> TrialRecord:
    """The trial the rule picks; raises a one-line error saying what to relax when none fits."""
    best = ranked(trials, cap)
    if best:
        return best[0]
    n = len(trials)
    if n == 0:
        raise ConfigError(f"{study_name} has no completed trial (all failed or none ran); re-run "
                          "with --debug to see why trials fail, or add trials with --resume --trials N")
    over_mem = [t for t in trials if not t.feasible and t.constraints.get("memory_over_budget", 0) > 0]
    if len(over_mem) == n:
        raise BudgetError(f"no trial of {study_name} fits the memory budget ({n} completed, all over "
                          "budget); raise --budget or lower cache.capacity_experts' high bound in the "
                          "search space")
    q = min(_quality(t) for t in trials if t.feasible) if any(t.feasible for t in trials) else None
    seen = f"; the lowest quality loss of a feasible trial was {q:.4g}" if q is not None else ""
    raise ConfigError(f"no trial of {study_name} is within the quality cap {cap} ({n} completed, "
                      f"{len(over_mem)} over the memory budget{seen}); raise --max-quality-loss, or "
                      "include adaptive_k.threshold 1.0 (exact top-k) in the search space")


def rescore(ctx: StudyContext, trials: list[TrialRecord], *, max_decode_tokens: int | None) -> list[TrialRecord]:
    """Copies of `trials` with metrics/constraints re-simulated on a longer trace slice."""
    out = []
    for t in trials:
        metrics, cons = evaluate(ctx, t.params, max_decode_tokens=max_decode_tokens)
        out.append(t.model_copy(update={"metrics": metrics, "constraints": cons, "feasible": feasible(cons),
                                        "values": [metrics["decode_tokens_per_s"], metrics["quality_loss"]],
                                        "study_metrics": t.metrics}))
    return out


def final_choice(ctx: StudyContext, trials: list[TrialRecord], cap: float | None, *,
                 finalists: int = 4, max_decode_tokens: int | None = None,
                 study_name: str = "the study") -> tuple[TrialRecord, list[TrialRecord]]:
    """(chosen, rescored finalists): the best `finalists` trials by the rule on the study's
    slice and the enqueued baselines (the default config, plain LRU: a choice is never one the
    longer slice predicts slower than what a user gets without tuning), re-simulated on
    `max_decode_tokens`, then the rule again."""
    first = ranked(trials, cap)
    if not first:
        choose(trials, cap, study_name=study_name)  # raises with the reason
    if finalists <= 1 or max_decode_tokens == ctx.max_decode_tokens:
        return first[0], first[:1]
    pool = first[:finalists] + [t for t in first[finalists:] if t.baseline]
    scored = rescore(ctx, pool, max_decode_tokens=max_decode_tokens)
    best = ranked(scored, cap)
    return (best[0] if best else first[0]), scored


def build_config(base_config, params: dict[str, Any], *, predicted: dict[str, float],
                 measured: dict[str, float] | None = None, study_name: str | None = None,
                 trial_number: int | None = None, profile_id: str | None = None,
                 routing: str | None = None, hardware_source: str | None = None):
    """The deployable RuntimeConfig: the base with the trial's params and full provenance."""
    config = trial_config(base_config, params)
    if config.memory != base_config.memory:
        mem = base_config.memory
        raise BudgetError(f"trial {trial_number} needs {config.cache.capacity_experts} cache slots, more "
                          f"than the budget's {mem.expert_cache_bytes // mem.bytes_per_expert}; "
                          "choose a feasible trial")
    prov = {"tool_version": tool_version(), "created_at": now_iso(), "profile_id": profile_id,
            "study_name": study_name, "trial_number": trial_number, "routing": routing,
            "hardware_source": hardware_source,
            "predicted": {k: float(v) for k, v in predicted.items()},
            "measured": {k: float(v) for k, v in (measured or {}).items()}}
    return config.with_values({f"provenance.{k}": v for k, v in prov.items()})


def write_config(config, path: str | os.PathLike) -> Path:
    """Write config.yaml atomically (a reader never sees half a file)."""
    return save_config(config, path)
