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

The rooms of the study: one trial (tuner/objective.py), what is recorded per trial and when it
is feasible (tuner/trials.py), where the study lives (tuner/storage.py, tuner/locks.py, and
Optuna's private API fenced in tuner/optuna_private.py), how workers share it
(tuner/coordination.py), progress bars (tuner/progress.py). This module opens and runs it.

Storage: `tuner.storage.make_storage(url)`, any Optuna storage URL (one place, where heartbeats and the retry
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
import multiprocessing as mp
import signal
import warnings
import time
from dataclasses import dataclass, field
from typing import Any

from expertflow.errors import ConfigError, StorageError

from . import optuna_private as op
from .coordination import DEFAULT_HEARTBEAT_S, TARGET_ATTR, WORKERS_ATTR, ExportClaim, WorkResult, work
from .locks import study_lock
from .objective import Objective, StudyContext
from .progress import Reporter
from .search_space import SearchSpace
from .storage import MAX_RETRY, StorageURL, make_storage
from .trials import DIRECTIONS, best_feasible_speed, tally

log = logging.getLogger(__name__)

METRIC_NAMES = ("decode_tokens_per_s", "quality_loss")  # the objectives' names in the storage
DEFAULT_BASELINE = "default config"
LRU_BASELINE = "plain LRU, no prefetch"


# ---- the study ------------------------------------------------------------------------------
def make_sampler(seed: int):
    return op.tpe_sampler(seed)


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
    """(study, is_new); call it under the study's lock (`tuner.locks.study_lock`).

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


def _raise_interrupt(signum, frame):
    """A --jobs child's SIGINT/SIGTERM handler (delivered once its running trial is recorded, see
    coordination._DeferredSignals): stop (KeyboardInterrupt), then ignore both while exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker(url: str, name: str, ctx: StudyContext, target: int, timeout: float | None, seed: int,
            heartbeat_s: int | None) -> None:
    """A worker process of `jobs`: its own connections and sampler seed, the same study."""
    import optuna  # optional at import time (tuner/optuna_private.py)

    signal.signal(signal.SIGINT, _raise_interrupt)  # Ctrl-C, or the parent stops us: finish
    signal.signal(signal.SIGTERM, _raise_interrupt)  # the running trial, then exit
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    lock = study_lock(url, name)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(url, heartbeat_interval=heartbeat_s),
                                  sampler=make_sampler(seed))
        work(study, Objective(ctx), target=target, lock=lock, timeout_s=timeout,
             requeue=op.retry_callback(MAX_RETRY))
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
        return ExportClaim(self.study, self.lock, out_dir, force=force)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()


def _start_children(storage_url: str, name: str, ctx: StudyContext, *, target: int, timeout: float | None,
                    heartbeat_s: int | None, seeds: list[int]) -> list:
    """One `--jobs` child process per seed. Children sample with other seeds (the same seed
    would propose the same points)."""
    procs: list = []
    if not seeds:
        return procs
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mpctx = mp.get_context(method)
    for child_seed in seeds:
        p = mpctx.Process(target=_worker, args=(storage_url, name, ctx, target, timeout, child_seed, heartbeat_s),
                          daemon=True)
        p.start()
        procs.append(p)
    return procs


def _run_here(study, ctx: StudyContext, *, target: int, lock, timeout: float | None, progress: bool,
              procs: list) -> WorkResult:
    """This process's share of the trials (with the progress bar), then wait for the children."""
    with Reporter(progress, tty_only=False) as bars:
        bar = bars.task("tuning", target)

        def show(now, waiting: bool = False) -> None:
            bar.update(completed=min(now.finished, target), note=progress_note(study, now, waiting))

        res = work(study, Objective(ctx), target=target, lock=lock, timeout_s=timeout,
                   on_progress=show if bars.enabled else None, requeue=op.retry_callback(MAX_RETRY))
        for p in procs:
            while p.is_alive():
                p.join(0.5)
                if bars.enabled:
                    show(tally(study), True)
    return res


def _stop_children(procs: list) -> None:
    """Normally all done; on Ctrl-C they finish their trial, then stop."""
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def _worker_notes(procs: list, res: WorkResult) -> list[str]:
    notes = []
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        notes.append(f"{len(bad)} worker process(es) exited with an error (exit code {bad[0]}); "
                     "their trials were queued again or are missing")
    if res.lost:
        notes.append(f"{res.lost} trial(s) of this worker were declared dead by another (late "
                     "heartbeat) and re-run there")
    return notes


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
    import optuna  # optional at import time (tuner/optuna_private.py)

    if n_trials < 1:
        raise ConfigError(f"--trials {n_trials} must be >= 1")
    memory = StorageURL(storage_url).is_memory
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
        procs = _start_children(storage_url, name, ctx, target=target, timeout=timeout, heartbeat_s=heartbeat_s,
                                seeds=[seed + 1000 * (worker + i) for i in range(1, jobs)])
        try:
            res = _run_here(study, ctx, target=target, lock=lock, timeout=timeout, progress=progress, procs=procs)
            timed_out, own = res.timed_out, res.ran
        finally:
            _stop_children(procs)
        notes += _worker_notes(procs, res)
    elapsed = time.perf_counter() - t0
    after = tally(study)
    complete = after.running == 0 and after.counted >= max(target, 1)
    if run_trials and not complete:
        notes.append(f"study {name!r} stopped {'by --timeout ' if timed_out else ''}with {after.finished} of "
                     f"{target} trials finished ({after.running} still running elsewhere); continue with "
                     "--resume")
    shown_url = storage_url if memory else StorageURL(storage_url).resolved().masked()
    return StudyRun(study, shown_url, name, is_new,
                    after.finished - before.finished, elapsed, jobs, notes, target, complete, worker, lock, own)


def progress_note(study, now, waiting: bool = False) -> str:
    """The study's progress-bar note: the best feasible tokens/s so far, and whom it waits for."""
    best = best_feasible_speed(study)
    text = f"best feasible {best:.2f} tokens/s" if best else ""
    if waiting and now.running:
        text += f" (waiting for {now.running} trial(s) of other workers)"
    return text
