"""Trials: what the study records per trial, when one is feasible, the Pareto front, the count.

The one definition of each, shared by the study, the export and the report:

* **feasible**: every constraint value is <= 0 (Optuna's rule), read from the trial itself; an
  older study's constraints in `system_attrs["constraints"]`, and a `feasible` user attr set to
  False, count too.
* **Pareto front**: the feasible trials no other feasible trial beats in every objective
  (at least as good in each, better in one), objectives and directions as the study's.
* **tally**: which trials use up the study's target (see tuner/coordination.py).

optuna is imported inside the functions that read a study (optional at import time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
import numpy as np

from .records import TrialRecord

OBJECTIVES = ("decode_tokens_per_s", "quality_loss")
DIRECTIONS = ("maximize", "minimize")
MEMORY_CONSTRAINT = "memory_over_budget"
QUALITY_CONSTRAINT = "quality_over_cap"
FAIL_KIND_ERROR = "error"  # user attr `fail_kind` of a trial that failed on its own


class TrialFailed(Exception):
    """A trial whose simulation raised or produced NaN/inf: Optuna marks it FAIL and goes on."""


def trial_constraints(metrics: Mapping[str, float], *, budget_bytes: int, margin_bytes: int,
                      quality_cap: float | None = None) -> dict[str, float]:
    """The constraints a trial records (the one definition; <= 0 is feasible):

    memory_over_budget  (predicted peak_gpu_bytes + margin_bytes - budget_bytes) / budget_bytes
    quality_over_cap    quality_loss - cap                      (only when a cap is set)
    """
    cons = {MEMORY_CONSTRAINT: (metrics["peak_gpu_bytes"] + margin_bytes - budget_bytes) / budget_bytes}
    if quality_cap is not None:
        cons[QUALITY_CONSTRAINT] = metrics["quality_loss"] - quality_cap
    return cons


def feasible(constraints: Mapping[str, float]) -> bool:
    return all(v <= 0 for v in constraints.values())


def trial_feasible(trial) -> bool:
    """Feasibility of an Optuna (frozen) trial: its constraints, a legacy constraint list in
    system attrs, and a `feasible` user attr (see the module docstring)."""
    cons = getattr(trial, "constraints", None) or {}
    if not feasible({k: float(v) for k, v in cons.items()}):
        return False
    legacy = (getattr(trial, "system_attrs", None) or {}).get("constraints")
    if legacy and any(float(v) > 0 for v in legacy):
        return False
    return bool((getattr(trial, "user_attrs", None) or {}).get("feasible", True))


def complete_trials(study) -> list:
    """The study's COMPLETE frozen trials that have values."""
    import optuna  # optional at import time

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.values]


def completed_trials(study) -> list[TrialRecord]:
    """The study's completed trials as TrialRecords."""
    out = []
    for t in complete_trials(study):
        params = {k: round(v, 10) if isinstance(v, float) else v for k, v in t.params.items()}
        out.append(TrialRecord(number=t.number, params=params, values=[float(v) for v in t.values],
                               metrics=dict(t.user_attrs.get("metrics") or {}), constraints=dict(t.constraints),
                               feasible=trial_feasible(t), baseline=t.user_attrs.get("baseline")))
    return out


def best_feasible_speed(study) -> float | None:
    """The best first objective (tokens/s) of the feasible completed trials, or None."""
    speeds = [t.values[0] for t in complete_trials(study) if trial_feasible(t)]
    return max(speeds) if speeds else None


def pareto_mask(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """True where no other point is at least as good in every objective and better in one."""
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    v = np.asarray(values, dtype=float).reshape(len(values), len(directions)) * signs  # minimise
    out = []
    for i in range(len(v)):
        dominated = np.any(np.all(v <= v[i], axis=1) & np.any(v < v[i], axis=1))
        out.append(not bool(dominated))
    return out


def pareto_front(trials: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The feasible trials on the Pareto front of the study's objectives, fastest first."""
    feas = [t for t in trials if t.feasible]
    if not feas:
        return []
    mask = pareto_mask([t.values[:len(DIRECTIONS)] for t in feas], DIRECTIONS)
    return sorted((t for t, m in zip(feas, mask) if m), key=lambda t: -t.values[0])


# ---- the count --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    counted: int  # trials that use up the target (see tuner/coordination.py)
    finished: int  # COMPLETE + FAIL(error): the results a worker sees
    complete: int
    running: int
    waiting: int


def tally(study) -> Tally:
    import optuna  # optional at import time

    S = optuna.trial.TrialState
    complete = running = waiting = failed = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == S.COMPLETE:
            complete += 1
        elif t.state == S.RUNNING:
            running += 1
        elif t.state == S.WAITING:
            waiting += 1
        elif t.state == S.FAIL and t.user_attrs.get("fail_kind") == FAIL_KIND_ERROR:
            failed += 1
    return Tally(complete + running + failed, complete + failed, complete, running, waiting)


def finished_count(study) -> int:
    """Trials with a result: COMPLETE, or FAIL on their own (see `tally`)."""
    return tally(study).finished
