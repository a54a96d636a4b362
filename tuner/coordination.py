"""Several workers, one study: a storage-wide mutex, heartbeats, the trial loop, the export claim.

Every `ef-tune` process that works on a study (several on one machine through `--jobs`, or on
many machines sharing a PostgreSQL `--storage`) runs `work()`. The rules that make them one study:

* **One mutex per study** (`tuner.locks.study_lock`): a PostgreSQL session advisory lock keyed by the study
  name, a `flock` on `<file>.lock` beside a SQLite study, a thread lock in memory. The server (or
  the kernel) drops it when its holder dies, so a killed worker never leaves it held.
* **Claiming a trial is exact**: under the mutex a worker fails stale trials, counts the trials
  that use up the study's target (`tuner.trials.tally`) and asks Optuna for a trial only while that count is
  below the target. `--trials N` is therefore the study's total, however many workers share it:
  three workers given `--trials 60` run 60 trials between them, never 61.
* **Heartbeats**: a thread records one every `heartbeat_interval` seconds while a trial runs. A
  worker killed mid-trial (SIGKILL, a lost machine) stops beating; after the grace period the
  next worker that claims fails that trial, and the storage's retry callback queues its params
  again (WAITING), so the trial is re-run elsewhere. A worker killed between claiming a trial and
  its first beat leaves a RUNNING trial with no heartbeat; the next worker under the mutex gives
  it one, so it expires the same way (`fail_stale`).
* **Ctrl-C / SIGTERM** are held while a trial is claimed, run and recorded (well under a second):
  the worker finishes that trial, then stops, so nothing is half-recorded and `--resume` goes on.
  A second Ctrl-C stops at once; the trial is then failed and queued again like a dead one.
* **What counts toward the target**: COMPLETE and RUNNING trials, and FAIL trials that failed on
  their own (the simulator raised or returned NaN: user attr `fail_kind = "error"`). Trials failed
  by a dead or interrupted worker do not count: their queued retry does.
* **The study is complete** when the count reached the target and nothing runs. Every worker
  keeps claiming until then, and waits for the other workers' last trials, so each one sees the
  same finished study; `ExportClaim` then lets exactly one of them export it.

Test-only knob: the environment variable `EXPERTFLOW_TEST_TRIAL_SLEEP_S` (seconds, default 0)
makes every trial sleep that long after choosing its params and before simulating (read by
`tuner.objective.Objective`), so tests can kill or interrupt a worker in the middle of a trial; such a
trial first sets the user attr `ef:test_asleep`, so a test can wait until every param is stored.
It is not meant for users.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import optuna_private as op
from .locks import StudyLock
from .trials import TrialFailed, tally

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 60  # the study's trial target when none is given
DEFAULT_HEARTBEAT_S = 10  # a running trial records a heartbeat this often (seconds)
TEST_SLEEP_ENV = "EXPERTFLOW_TEST_TRIAL_SLEEP_S"
TEST_ASLEEP_ATTR = "ef:test_asleep"  # user attr set (with the sleep only) once a trial has all its params
EXPORT_ATTR = "ef:export"  # study user attr: who exported which results, where
WORKERS_ATTR = "ef:workers"  # study user attr: workers that joined so far (sampler seed offset)
TARGET_ATTR = "ef:n_trials"  # study user attr: the study's trial target (the largest asked for)


# ---- heartbeats -------------------------------------------------------------------------------
class Heartbeat:
    """Records a heartbeat for `trial_id` now and then every `interval_s` seconds, until stopped."""

    def __init__(self, storage, trial_id: int, interval_s: int | None):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = None
        if interval_s:
            storage.record_heartbeat(trial_id)  # at once: a trial never runs without one
            self._thread = threading.Thread(target=self._beat, name=f"ef-heartbeat-{trial_id}", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next interval
                log.warning("heartbeat of trial id %d failed: %s", self.trial_id, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def fail_stale(study) -> None:
    """Fail the trials of workers whose heartbeat stopped (their retry is queued by the storage's
    callback). A no-op without heartbeats. Call it under the study's lock: then a RUNNING trial
    with no heartbeat at all belongs to a worker that died between claiming it and its first
    beat (both happen under the lock); it gets a heartbeat now, so it expires like any other."""
    storage = op.storage_of(study)
    if op.heartbeat_interval(storage):
        for trial_id in op.unbeaten_running_trials(storage, op.study_id_of(study)):
            log.warning("trial id %d has run without a heartbeat: its worker died before the first "
                        "beat; it will be retried after the grace period", trial_id)
            storage.record_heartbeat(trial_id)
    op.fail_stale_trials(study)


# ---- the trial loop -----------------------------------------------------------------------------
@dataclass
class WorkResult:
    ran: int  # trials this worker ran to the end (COMPLETE or FAIL(error))
    timed_out: bool
    lost: int = 0  # trials of this worker another one declared dead (late heartbeat)


def work(study, objective, *, target: int, lock: StudyLock, timeout_s: float | None = None,
         on_progress=None, requeue=None) -> WorkResult:
    """Claim and run trials of `study` until it is complete (or `timeout_s` passes).

    `objective(trial) -> values` raises `tuner.trials.TrialFailed` for a trial that fails on its
    own. `on_progress(tally, waiting)` is called after each trial and while waiting for the other
    workers' last trials. `requeue(study, frozen_trial)` queues an interrupted trial again.
    """
    import optuna  # optional at import time (tuner/optuna_private.py)

    deadline = time.monotonic() + timeout_s if timeout_s else None
    interval = op.heartbeat_interval(op.storage_of(study))
    poll_s = min(1.0, float(interval)) if interval else 0.5
    ran = lost = 0
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return WorkResult(ran, True, lost)
        trial = frozen = None
        with _DeferredSignals() as held:  # Ctrl-C lets the claimed trial finish, then stops
            with lock:
                fail_stale(study)
                now = tally(study)
                if now.counted < target:
                    with warnings.catch_warnings():  # we beat ourselves (Heartbeat), not optimize()
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = study.ask()
                    beat = Heartbeat(op.storage_of(study), op.trial_id_of(trial), interval)
            if trial is not None:
                frozen = _run_one(study, trial, beat, objective, requeue)
        held.deliver()
        if trial is None:
            if now.running == 0:
                return WorkResult(ran, False, lost)
            if on_progress is not None:
                on_progress(now, True)
            time.sleep(poll_s)
            continue
        ours = frozen is not None and (frozen.state == optuna.trial.TrialState.COMPLETE or
                                       frozen.user_attrs.get("fail_kind") == "error")
        ran, lost = (ran + 1, lost) if ours else (ran, lost + 1)
        if on_progress is not None:
            on_progress(tally(study), False)


def _run_one(study, trial, beat: Heartbeat, objective, requeue):
    """Run and tell one claimed trial; the frozen trial, or None if another worker failed it as
    stale meanwhile (our heartbeat was late; it re-runs it)."""
    import optuna  # optional at import time (tuner/optuna_private.py)

    fail = optuna.trial.TrialState.FAIL
    try:
        try:
            values = objective(trial)
        finally:
            beat.stop()
        return study.tell(trial, values, skip_if_finished=True)
    except TrialFailed:
        return study.tell(trial, state=fail, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    except BaseException:  # a second Ctrl-C, SystemExit: fail the trial and queue it again
        with contextlib.suppress(Exception):
            frozen = study.tell(trial, state=fail, skip_if_finished=True)
            if requeue is not None and frozen.state == fail and "fail_kind" not in frozen.user_attrs:
                requeue(study, frozen)
        raise


class _DeferredSignals:
    """Holds the first SIGINT/SIGTERM while a trial is claimed, run and told, so a stop never
    leaves a trial half-recorded (trials take well under a second); `deliver()` re-raises it
    with its usual handler afterwards. The same signal again stops at once (the trial is then
    failed and queued again when possible, or expires by its heartbeat); a SIGTERM after a
    SIGINT (a --jobs parent stopping its children after a terminal's Ctrl-C) is only held too.
    Main thread only (elsewhere a no-op)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.held: list[int] = []
        self._old: dict[int, Any] = {}

    def _hold(self, signum, frame) -> None:
        if signum in self.held:  # the same signal twice (Ctrl-C, Ctrl-C): stop now
            self._restore()
            raise KeyboardInterrupt
        if not self.held:
            log.warning("stopping after the running trial (Ctrl-C again to stop at once)")
        self.held.append(signum)

    def __enter__(self) -> _DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name)
                self._old[num] = signal.signal(num, self._hold)
        return self

    def _restore(self) -> None:
        for num, handler in self._old.items():
            signal.signal(num, handler if handler is not None else signal.SIG_DFL)
        self._old.clear()

    def __exit__(self, *exc) -> None:
        self._restore()

    def deliver(self) -> None:
        held, self.held = self.held, []
        for num in held[:1]:
            signal.raise_signal(num)


# ---- one export -------------------------------------------------------------------------------
class ExportClaim:
    """Held during the export: exactly one worker exports each state of the shared results.

    Entered, it takes the study's mutex (so the other workers wait until the export is written)
    and decides `won`: False when these same results (same finished-trial count) were exported
    already, to another folder, or to this one and its config.yaml is still there. `force` (an
    explicit `--export-only`) always wins. After writing, `done(config_path)` records the export.
    If the exporter dies, the mutex is released, nothing is recorded, and the next worker exports.
    """

    def __init__(self, study, lock: StudyLock, out_dir: str | os.PathLike, *, force: bool = False):
        self.study, self.lock, self.out_dir, self.force = study, lock, Path(out_dir).resolve(), force
        self.won = False
        self.previous: dict[str, Any] | None = None
        self.finished = 0

    def __enter__(self) -> ExportClaim:
        self.lock.acquire()
        try:
            self.finished = tally(self.study).finished
            rec = self.study.user_attrs.get(EXPORT_ATTR)
            self.previous = rec if isinstance(rec, dict) else None
            same = self.previous is not None and self.previous.get("finished") == self.finished
            here = same and self.previous.get("out") == str(self.out_dir)
            self.won = self.force or not same or (here and not (self.out_dir / "config.yaml").is_file())
        except BaseException:
            self.lock.release()
            raise
        return self

    def done(self, config_path: str | os.PathLike) -> None:
        self.study.set_user_attr(EXPORT_ATTR, {
            "finished": self.finished, "out": str(self.out_dir), "config": str(Path(config_path).resolve()),
            "by": worker_id(), "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})

    def __exit__(self, *exc) -> None:
        self.lock.release()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
