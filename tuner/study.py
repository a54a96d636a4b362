"""The Optuna study: each trial is a RuntimeConfig, scored by the trace-driven simulator.

Objectives: maximise `decode_tokens_per_s`, minimise `quality_loss` (a Pareto front).
Constraints (Optuna 5 `Trial.set_constraint`; a trial is feasible when every value is <= 0,
and TPE reads them from the trial itself, no `constraints_func` needed):

    memory_over_budget  (predicted peak_gpu_bytes + margin_bytes - budget_bytes) / budget_bytes
    quality_over_cap    quality_loss - cap                      (only when a cap is set)

The memory budget also bounds the space (`high: budget`); a space that allows more slots
gets them simulated against a budget stretched to fit, and the constraint marks them
infeasible, so the report can show what more memory would buy.

Sampler: multivariate TPE with `group=True` (conditional parameters, e.g. the expertflow
policy's weights, are modelled jointly within their group), seeded. Chosen over NSGA-II: with
the 30-100 trials ef-tune runs, NSGA-II's population (50 by default) would leave it one or two
generations, close to random search; TPE starts modelling after 10 trials. The default config
and the plain-LRU baseline are enqueued as trials 0 and 1 of a new study (never again on
resume), so the study never ends worse than either.

Storage: `make_storage(url)` (one place, so RDB heartbeats can be switched on there); the
default is a SQLite file in the output folder (write-ahead log, so each trial costs no fsync),
which resumes. Trials may run in several worker processes sharing the storage (`jobs`, each
with its own sampler seed); with SQLite on 2 cores that was measured slower than one process
(the workers queue on the file's write lock), so ef-tune runs one unless told otherwise; with a
server storage (PostgreSQL) workers on many cores or machines divide the study's wall time.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from expertflow.errors import ConfigError, ExpertFlowError, StorageError

from .search_space import SearchSpace, suggest

log = logging.getLogger(__name__)

OBJECTIVES = ("decode_tokens_per_s", "quality_loss")
DIRECTIONS = ("maximize", "minimize")
MEMORY_CONSTRAINT = "memory_over_budget"
QUALITY_CONSTRAINT = "quality_over_cap"
DEFAULT_BASELINE = "default config"
LRU_BASELINE = "plain LRU, no prefetch"


class TrialFailed(Exception):
    """A trial whose simulation raised or produced NaN/inf: Optuna marks it FAIL and goes on."""


# ---- storage --------------------------------------------------------------------------------
def make_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for `url`: any SQLAlchemy URL Optuna takes (sqlite:///...,
    postgresql://..., mysql://...), or `memory` for an in-process study (tests, benchmarks).

    `heartbeat_interval`/`grace_period` (seconds) switch on RDB heartbeats so that trials of
    a dead worker are marked FAIL (distributed tuning). Raises StorageError when it fails.
    """
    import optuna

    if url in ("memory", ":memory:"):
        return optuna.storages.InMemoryStorage()
    try:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            path = url[len("sqlite:///"):]
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            kwargs["engine_kwargs"] = {"creator": _sqlite_connector(path)}
        if heartbeat_interval is not None:
            kwargs["heartbeat_interval"] = heartbeat_interval
            if grace_period is not None:
                kwargs["grace_period"] = grace_period
        return optuna.storages.RDBStorage(url, **kwargs)
    except ExpertFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors come in many types
        msg = " ".join(str(exc).split())[:200]
        raise StorageError(f"study storage {url!r} cannot be used ({exc.__class__.__name__}: {msg}); "
                           "check the URL and that the database is reachable, or leave --storage "
                           "out for a SQLite file in the output folder") from None


def _sqlite_connector(path: str):
    """Connections to a local SQLite study: write-ahead log and synchronous=NORMAL (one fsync
    per checkpoint instead of per transaction; a crash loses at most the last trials, never
    the file), and a 60 s wait for the lock when several local workers share it."""
    import sqlite3

    def connect():
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return connect


def sqlite_url(path) -> str:
    return f"sqlite:///{os.path.abspath(path)}"


# ---- one trial ------------------------------------------------------------------------------
@dataclass
class StudyContext:
    """Everything a trial needs (picklable, so worker processes can get a copy)."""

    trace: Any  # expertflow.trace.RoutingTrace
    costs: Any  # tuner.simulator.Costs
    base_config: Any  # expertflow.config.RuntimeConfig: the default config of this model/budget
    space: SearchSpace  # resolved
    quality_cap: float | None = None
    quality_tables: dict[bool, dict[float, float]] | None = None  # renormalize -> {threshold: loss}
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
    if not ctx.quality_tables:
        return None
    renorm = bool(config.adaptive_k.renormalize)
    return ctx.quality_tables.get(renorm) or ctx.quality_tables.get(False) or \
        next(iter(ctx.quality_tables.values()))


def evaluate(ctx: StudyContext, values: dict[str, Any], *, max_decode_tokens: int | None | str = "study"
             ) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, constraints) of the config with `values`. Raises TrialFailed on NaN/inf."""
    from .simulator import simulate

    config = trial_config(ctx.base_config, values)
    n = ctx.max_decode_tokens if max_decode_tokens == "study" else max_decode_tokens
    sim = ctx.simulate_fn or simulate
    res = sim(ctx.trace, ctx.costs, config, prompt_tokens=ctx.prompt_tokens, max_decode_tokens=n,
              quality_table=quality_table_for(ctx, config))
    metrics = {k: float(v) for k, v in res.metrics.items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrialFailed(f"simulator returned non-finite {bad[0]}={metrics[bad[0]]}")
    limit = ctx.base_config.memory.budget_bytes
    cons = {MEMORY_CONSTRAINT: (metrics["peak_gpu_bytes"] + ctx.base_config.memory.margin_bytes - limit) / limit}
    if ctx.quality_cap is not None:
        cons[QUALITY_CONSTRAINT] = metrics["quality_loss"] - ctx.quality_cap
    return metrics, cons


def feasible(constraints: dict[str, float]) -> bool:
    return all(v <= 0 for v in constraints.values())


class Objective:
    """The trial function. A config proposed twice (TPE on a mostly discrete space does that)
    is simulated once per process: the simulator is deterministic."""

    def __init__(self, ctx: StudyContext):
        self.ctx = ctx
        self._memo: dict[tuple, tuple[dict, dict]] = {}

    def __call__(self, trial) -> tuple[float, float]:
        values = suggest(trial, self.ctx.space)
        key = tuple(sorted(values.items()))
        try:
            if key not in self._memo:
                self._memo[key] = evaluate(self.ctx, values)
            metrics, cons = self._memo[key]
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails this trial, not the study
            reason = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("trial %d failed: %s (params %s)", trial.number, reason, values)
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason) from exc
        for key, value in cons.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("feasible", feasible(cons))
        return metrics["decode_tokens_per_s"], metrics["quality_loss"]


# ---- the study ------------------------------------------------------------------------------
def make_sampler(seed: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def baseline_values(space: SearchSpace, base_config, capacity: int) -> list[tuple[str, dict]]:
    """(name, params) of the two enqueued trials: the default config and plain LRU (LRU, no
    prefetch, exact top-k, every slot the budget holds)."""
    default = space.defaults_from(base_config)
    lru_cfg = base_config.with_values({"cache.policy": "lru", "prefetch.depth": 0,
                                       "prefetch.adaptive": False, "adaptive_k.threshold": 1.0,
                                       "cache.capacity_experts": capacity})
    return [(DEFAULT_BASELINE, default), (LRU_BASELINE, space.defaults_from(lru_cfg))]


def open_study(storage, name: str, *, seed: int, resume: bool, attrs: dict[str, Any]):
    """(study, is_new). A new study records `attrs`; a resumed one must match them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    except Exception as exc:  # noqa: BLE001 - an unreadable storage is one StorageError line
        raise StorageError(f"study storage cannot be read ({exc.__class__.__name__}: "
                           f"{' '.join(str(exc).split())[:160]}); check --storage") from None
    if name in existing and existing[name].n_trials > 0 and not resume:
        raise StorageError(f"study {name!r} already exists in the storage with {existing[name].n_trials} "
                           "trials; pass --resume to continue it, or a new --study name / --out folder")
    study = optuna.create_study(study_name=name, storage=storage, directions=list(DIRECTIONS),
                                sampler=make_sampler(seed), load_if_exists=True)
    is_new = len(study.trials) == 0
    if is_new:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    else:
        old = study.user_attrs
        for k in ("fingerprint", "budget_bytes", "search_space", "quality_cap", "max_decode_tokens"):
            if k in attrs and k in old and old[k] != attrs[k]:
                raise StorageError(f"study {name!r} was made with another {k} ({_short(old[k])} vs "
                                   f"now {_short(attrs[k])}); resume it with the same settings, or "
                                   "start a new --study / --out")
    return study, is_new


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def enqueue_baselines(study, baselines: list[tuple[str, dict]]) -> None:
    for name, params in baselines:
        study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=False)


_FINISHED = ("COMPLETE", "FAIL", "PRUNED")


def finished_count(study) -> int:
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in _FINISHED)
    return len(study.get_trials(deepcopy=False, states=states))


def _worker(url: str, name: str, ctx: StudyContext, n_trials: int, timeout: float | None, seed: int) -> None:
    """A worker process: its own storage connection and sampler seed, the same study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    study = optuna.load_study(study_name=name, storage=make_storage(url), sampler=make_sampler(seed))
    study.optimize(Objective(ctx), n_trials=n_trials, timeout=timeout, catch=(TrialFailed,),
                   gc_after_trial=False)


@dataclass
class StudyRun:
    study: Any
    storage_url: str
    name: str
    is_new: bool
    ran: int  # trials run by this call
    elapsed_s: float
    jobs: int
    notes: list[str] = field(default_factory=list)


def run_study(ctx: StudyContext, *, storage_url: str, name: str, n_trials: int,
              timeout: float | None = None, seed: int = 0, resume: bool = False, jobs: int = 1,
              progress: bool = True, attrs: dict[str, Any] | None = None,
              baselines: list[tuple[str, dict]] | None = None) -> StudyRun:
    """Run (or continue) the study until it has `n_trials` finished trials or `timeout`.

    On a new study the baselines are enqueued first (trials 0 and 1). `jobs` > 1 runs trials
    in that many processes sharing the storage (not for the in-memory storage).
    """
    import optuna

    if n_trials < 1:
        raise ConfigError(f"--trials {n_trials} must be >= 1")
    storage = make_storage(storage_url)
    study, is_new = open_study(storage, name, seed=seed, resume=resume, attrs=attrs or {})
    notes = []
    if is_new and baselines:
        enqueue_baselines(study, baselines)
    elif resume and not is_new:
        notes.append(f"resumed study {name!r} with {finished_count(study)} finished trials")
    todo = max(0, n_trials - finished_count(study))
    if storage_url in ("memory", ":memory:"):
        jobs = 1
    jobs = max(1, min(jobs, todo)) if todo else 1
    t0 = time.perf_counter()
    start = finished_count(study)
    if todo:
        procs: list = []
        shares = [todo // jobs + (1 if i < todo % jobs else 0) for i in range(jobs)]
        if jobs > 1:
            # Children sample with other seeds (the same seed would propose the same points).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            mpctx = mp.get_context(method)
            for i in range(1, jobs):
                p = mpctx.Process(target=_worker, args=(storage_url, name, ctx, shares[i], timeout,
                                                        seed + 1000 * i), daemon=True)
                p.start()
                procs.append(p)
        try:
            with _progress_bar(progress, todo, name) as bar:
                def cb(st, trial):
                    bar(finished_count(st) - start, st)

                study.optimize(Objective(ctx), n_trials=shares[0], timeout=timeout, catch=(TrialFailed,),
                               callbacks=[cb], gc_after_trial=False)
                for p in procs:
                    while p.is_alive():
                        p.join(0.5)
                        bar(finished_count(study) - start, study)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if bad:
            notes.append(f"{len(bad)} worker process(es) exited with an error (exit code {bad[0]}); "
                         "their trials may be missing")
    elapsed = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(seed))
    return StudyRun(study, storage_url, name, is_new, finished_count(study) - start, elapsed, jobs, notes)


class _progress_bar:
    """A rich progress bar on stderr: trials finished and the best feasible tokens/s so far."""

    def __init__(self, enabled: bool, total: int, name: str):
        self.enabled, self.total, self.name = enabled, total, name
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._p = Progress(TextColumn("[bold]tuning[/]"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("{task.fields[best]}"),
                               console=Console(stderr=True), transient=False)
            self._p.start()
            self._task = self._p.add_task("trials", total=self.total, best="")
        return self

    def __call__(self, done: int, study) -> None:
        if self._p is None:
            return
        best = best_feasible_speed(study)
        self._p.update(self._task, completed=min(done, self.total),
                       best=f"best feasible {best:.2f} tokens/s" if best else "")

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()


def best_feasible_speed(study) -> float | None:
    import optuna

    best = None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.values and t.user_attrs.get("feasible", True) and all(v <= 0 for v in t.constraints.values()):
            best = t.values[0] if best is None else max(best, t.values[0])
    return best


def completed_trials(study) -> list[dict[str, Any]]:
    """Completed trials as plain dicts: number, params, values, metrics, constraints, feasible."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if not t.values:
            continue
        cons = dict(t.constraints)
        params = {k: round(v, 10) if isinstance(v, float) else v for k, v in t.params.items()}
        out.append({"number": t.number, "params": params, "values": [float(v) for v in t.values],
                    "metrics": dict(t.user_attrs.get("metrics") or {}), "constraints": cons,
                    "feasible": feasible(cons), "baseline": t.user_attrs.get("baseline")})
    return out


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feasible trials no other feasible trial beats on both objectives (faster and no worse
    quality, or better quality and no slower)."""
    feas = [t for t in trials if t["feasible"]]
    front = []
    for t in feas:
        s, q = t["values"]
        dominated = any((o["values"][0] >= s and o["values"][1] <= q) and
                        (o["values"][0] > s or o["values"][1] < q) for o in feas)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: -t["values"][0])
