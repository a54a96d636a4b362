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

Storage: `make_storage(url)`, any Optuna storage URL (one place, where heartbeats and the retry
of a dead worker's trial are switched on); the default is a SQLite file in the output folder
(write-ahead log, so each trial costs no fsync), which resumes. Trials may run in several
processes sharing the storage: `jobs` on this machine (each with its own sampler seed; with
SQLite on 2 cores that was measured slower than one process, the workers queue on the file's
write lock, so ef-tune runs one unless told otherwise), or `ef-tune` workers on many machines
sharing a PostgreSQL study. How they share it (a per-study lock, `n_trials` as the study's
total, heartbeats, one export) is in tuner/coordination.py.
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

from .cli import DEFAULT_HEARTBEAT_S
from .coordination import TEST_ASLEEP_ATTR, TEST_SLEEP_ENV
from .search_space import SearchSpace, suggest

log = logging.getLogger(__name__)

OBJECTIVES = ("decode_tokens_per_s", "quality_loss")
DIRECTIONS = ("maximize", "minimize")
METRIC_NAMES = ("decode_tokens_per_s", "quality_loss")  # the objectives' names in the storage
MEMORY_CONSTRAINT = "memory_over_budget"
QUALITY_CONSTRAINT = "quality_over_cap"
DEFAULT_BASELINE = "default config"
LRU_BASELINE = "plain LRU, no prefetch"


class TrialFailed(Exception):
    """A trial whose simulation raised or produced NaN/inf: Optuna marks it FAIL and goes on."""


# ---- storage --------------------------------------------------------------------------------
# DEFAULT_HEARTBEAT_S (tuner.cli): a running trial records a heartbeat this often (seconds)
GRACE_FACTOR = 3  # ...and is declared dead after GRACE_FACTOR missed beats
MAX_RETRY = 3  # a dead worker's trial is re-run at most this many times


def make_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for `url`: any SQLAlchemy URL Optuna takes (sqlite:///...,
    postgresql://..., mysql://...), or `memory` for an in-process study (tests, benchmarks).

    `heartbeat_interval` (seconds) switches on RDB heartbeats: a trial whose worker stops
    beating for `grace_period` seconds (default GRACE_FACTOR beats) is failed by the next worker
    and its params are queued again (at most MAX_RETRY times). A bare `postgresql://` URL uses
    whichever driver is installed (psycopg 3, else psycopg2). Raises StorageError (one line,
    password masked) when the storage cannot be reached or used.
    """
    import optuna

    if url in ("memory", ":memory:"):
        return optuna.storages.InMemoryStorage()
    kwargs: dict[str, Any] = {}
    try:
        url = resolve_url(url)
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            path = url[len("sqlite:///"):]  # its folder must exist: a typo makes no folders
            kwargs["engine_kwargs"] = {"creator": _sqlite_connector(path)}
        elif url.startswith("postgresql"):
            kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        if heartbeat_interval:
            from .coordination import retry_callback

            kwargs["heartbeat_interval"] = int(heartbeat_interval)
            kwargs["grace_period"] = int(grace_period or GRACE_FACTOR * int(heartbeat_interval))
            kwargs["heartbeat_stale_trial_callback"] = retry_callback(MAX_RETRY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for attempt in range(3):
                try:
                    return optuna.storages.RDBStorage(url, **kwargs)
                except Exception as exc:  # noqa: BLE001
                    # Two first workers on an empty database may race to create the tables.
                    if attempt == 2 or not _is_create_race(exc):
                        raise
                    time.sleep(0.2 + 0.3 * attempt)
    except ExpertFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors come in many types
        raise storage_error(url, exc) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _is_create_race(exc: Exception) -> bool:
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text or "unique" in text


def mask_url(url: str) -> str:
    """`url` with its password replaced by ***, for messages and tuning.json."""
    if url in ("memory", ":memory:") or "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: hide anything between :// and @
        head, _, rest = url.partition("://")
        return f"{head}://***@{rest.rpartition('@')[2]}" if "@" in rest else url


def resolve_url(url: str) -> str:
    """A bare `postgresql://` gets an installed driver (psycopg 3, else psycopg2): SQLAlchemy's
    default differs between its versions and may not be installed."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise StorageError(f"study storage {mask_url(url)!r} needs a PostgreSQL driver and none is installed; "
                       "pip install 'expertflow[postgres]' (psycopg2-binary)")


def storage_error(url: str, exc: BaseException) -> StorageError:
    """The one-line StorageError for a storage that failed with `exc` (password masked)."""
    shown = mask_url(url)
    msg = " ".join(str(exc).split())
    pw = _password(url)
    if pw:
        msg = msg.replace(pw, "***")
    msg = msg.split(" (Background on this error")[0][:220]
    hint = ("check the URL, that the server runs and accepts this user from here, and that the "
            "database exists (e.g. createdb NAME); or leave --storage out for a SQLite file in --out")
    if isinstance(exc, ImportError):
        hint = "install the database driver (pip install 'expertflow[postgres]' for PostgreSQL)"
    elif url.startswith("sqlite"):
        hint = "check that the folder of the SQLite file exists and is writable"
    return StorageError(f"study storage {shown!r} cannot be used ({exc.__class__.__name__}: {msg}); {hint}")


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password or None
    except Exception:  # noqa: BLE001
        return None


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
            trial.set_user_attr("fail_kind", "error")  # counts toward --trials (coordination.tally)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails this trial, not the study
            reason = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("trial %d failed: %s (params %s)", trial.number, reason, values)
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_kind", "error")
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


def open_study(storage, name: str, *, seed: int, resume: bool, attrs: dict[str, Any], join: bool = False,
               must_exist: bool = False):
    """(study, is_new); call it under the study's lock (`coordination.study_lock`).

    A study that already has trials is refused unless `resume` or `join` (a shared study: an
    explicit --storage and --study). Attrs the study lacks are recorded (a new study, or one
    whose creator stopped before it could); the ones it has must match, else StorageError.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    except Exception as exc:  # noqa: BLE001 - an unreadable storage is one StorageError line
        raise StorageError(f"study storage cannot be read ({exc.__class__.__name__}: "
                           f"{' '.join(str(exc).split())[:160]}); check --storage") from None
    if must_exist and (name not in existing or existing[name].n_trials == 0):
        raise StorageError(f"study {name!r} has no trials in this storage (studies there: "
                           f"{', '.join(sorted(existing)) or 'none'}); run ef-tune without --export-only first, "
                           "or pass the --storage and --study of the study to export")
    if name in existing and existing[name].n_trials > 0 and not (resume or join):
        raise StorageError(f"study {name!r} already exists in the storage with {existing[name].n_trials} "
                           "trials; pass --resume to continue it, or a new --study name / --out folder")
    study = optuna.create_study(study_name=name, storage=storage, directions=list(DIRECTIONS),
                                sampler=make_sampler(seed), load_if_exists=True)
    is_new = len(study.get_trials(deepcopy=False)) == 0
    if study.metric_names is None:  # Optuna's tools (optuna-dashboard) show these, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
    old = study.user_attrs
    for k in ("fingerprint", "budget_bytes", "search_space", "quality_cap", "max_decode_tokens"):
        if k in attrs and k in old and old[k] != attrs[k]:
            raise StorageError(f"study {name!r} was made with another {k} ({_short(old[k])} vs "
                               f"now {_short(attrs[k])}); run every worker with the same settings, "
                               "or start a new --study / --out")
    for k, v in attrs.items():
        if k not in old:
            study.set_user_attr(k, v)
    return study, is_new


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def enqueue_baselines(study, baselines: list[tuple[str, dict]]) -> int:
    """Queue each baseline the study does not hold yet (any state: a retried copy keeps its
    name). Under the study's lock this is exactly once per study, whatever the workers do."""
    have = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    todo = [(name, params) for name, params in baselines if name not in have]
    for name, params in todo:
        study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=False)
    return len(todo)


def finished_count(study) -> int:
    """Trials with a result: COMPLETE, or FAIL on their own (see coordination.tally)."""
    from .coordination import tally

    return tally(study).finished


def _raise_interrupt(signum, frame):
    """A --jobs child's SIGINT/SIGTERM handler (delivered once its running trial is recorded, see
    coordination._DeferredSignals): stop (KeyboardInterrupt), then ignore both while exiting."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker(url: str, name: str, ctx: StudyContext, target: int, timeout: float | None, seed: int,
            heartbeat_s: int | None) -> None:
    """A worker process of `jobs`: its own connections and sampler seed, the same study."""
    import signal

    import optuna

    from .coordination import retry_callback, study_lock, work

    signal.signal(signal.SIGINT, _raise_interrupt)  # Ctrl-C, or the parent stops us: finish
    signal.signal(signal.SIGTERM, _raise_interrupt)  # the running trial, then exit
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    lock = study_lock(url, name)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url, heartbeat_interval=heartbeat_s),
                                  sampler=make_sampler(seed))
        work(study, Objective(ctx), target=target, lock=lock, timeout_s=timeout,
             requeue=retry_callback(MAX_RETRY))
    except KeyboardInterrupt:
        pass  # the parent says so
    finally:
        lock.close()


@dataclass
class StudyRun:
    study: Any
    storage_url: str
    name: str
    is_new: bool
    ran: int  # trials finished while this call ran (by every worker of the study)
    elapsed_s: float
    jobs: int
    notes: list[str] = field(default_factory=list)
    target: int = 0  # the study's trial target (the largest --trials any worker asked for)
    complete: bool = True  # the target is reached and no trial runs
    worker: int = 0  # this worker's index in the study (its sampler seed is seed + 1000 * worker)
    lock: Any = None  # coordination.StudyLock of the study
    own: int = 0  # trials this process ran to the end (its --jobs children not included)

    def export_claim(self, out_dir, *, force: bool = False):
        """`coordination.ExportClaim`: enter it around the export; `.won` says whether to write."""
        from .coordination import ExportClaim

        return ExportClaim(self.study, self.lock, out_dir, force=force)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()


def run_study(ctx: StudyContext, *, storage_url: str, name: str, n_trials: int,
              timeout: float | None = None, seed: int = 0, resume: bool = False, jobs: int = 1,
              progress: bool = True, attrs: dict[str, Any] | None = None,
              baselines: list[tuple[str, dict]] | None = None, join: bool = False,
              heartbeat_s: int | None = DEFAULT_HEARTBEAT_S, run_trials: bool = True) -> StudyRun:
    """Run (or continue, or join) the study until it has `n_trials` trials with a result.

    `n_trials` is the study's total, shared by every worker (see tuner/coordination.py). The
    baselines are enqueued once per study (trials 0 and 1 of a new one). `jobs` > 1 runs trials
    in that many processes of this machine (not for the in-memory storage). `join` lets this
    worker take part in a study that already has trials. `run_trials=False` only opens it.
    """
    import optuna

    from .coordination import TARGET_ATTR, WORKERS_ATTR, ProgressBar, retry_callback, study_lock, tally, work

    if n_trials < 1:
        raise ConfigError(f"--trials {n_trials} must be >= 1")
    memory = storage_url in ("memory", ":memory:")
    heartbeat_s = None if memory else heartbeat_s
    lock = study_lock(storage_url, name)
    try:
        with lock:
            storage = make_storage(storage_url, heartbeat_interval=heartbeat_s)
            study, is_new = open_study(storage, name, seed=seed, resume=resume, attrs=attrs or {}, join=join,
                                       must_exist=not run_trials)
            target = max(n_trials, int(study.user_attrs.get(TARGET_ATTR) or 0)) if run_trials else 0
            if run_trials:
                study.set_user_attr(TARGET_ATTR, target)
            before = tally(study)
            todo = max(0, target - before.counted) if run_trials else 0
            jobs = 1 if memory else max(1, min(jobs, todo)) if todo else 1
            worker = int(study.user_attrs.get(WORKERS_ATTR) or 0)
            study.set_user_attr(WORKERS_ATTR, worker + jobs)
            if baselines and run_trials:
                enqueue_baselines(study, baselines)
    except BaseException:
        lock.close()
        raise
    notes = []
    if not is_new and run_trials:
        notes.append(f"{'joined' if join and not resume else 'resumed'} study {name!r} with "
                     f"{before.finished} finished trials (target {target})")
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(seed + 1000 * worker))
    t0 = time.perf_counter()
    timed_out, own = False, 0
    if run_trials and (todo or before.running):
        procs: list = []
        if jobs > 1:
            # Children sample with other seeds (the same seed would propose the same points).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            mpctx = mp.get_context(method)
            for i in range(1, jobs):
                p = mpctx.Process(target=_worker, args=(storage_url, name, ctx, target, timeout,
                                                        seed + 1000 * (worker + i), heartbeat_s), daemon=True)
                p.start()
                procs.append(p)
        try:
            with ProgressBar(progress, target, name) as bar:
                res = work(study, Objective(ctx), target=target, lock=lock, timeout_s=timeout,
                           on_progress=lambda t, waiting: bar(t, study, waiting),
                           requeue=retry_callback(MAX_RETRY))
                timed_out, own = res.timed_out, res.ran
                for p in procs:
                    while p.is_alive():
                        p.join(0.5)
                        bar(tally(study), study, True)
        finally:
            for p in procs:  # normally all done; on Ctrl-C they finish their trial, then stop
                if p.is_alive():
                    p.terminate()
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
        bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
        if bad:
            notes.append(f"{len(bad)} worker process(es) exited with an error (exit code {bad[0]}); "
                         "their trials were queued again or are missing")
        if res.lost:
            notes.append(f"{res.lost} trial(s) of this worker were declared dead by another (late "
                         "heartbeat) and re-run there")
    elapsed = time.perf_counter() - t0
    after = tally(study)
    complete = after.running == 0 and after.counted >= max(target, 1)
    if run_trials and not complete:
        notes.append(f"study {name!r} stopped {'by --timeout ' if timed_out else ''}with {after.finished} of "
                     f"{target} trials finished ({after.running} still running elsewhere); continue with "
                     "--resume")
    return StudyRun(study, storage_url if memory else mask_url(resolve_url(storage_url)), name, is_new,
                    after.finished - before.finished, elapsed, jobs, notes, target, complete, worker, lock, own)


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
