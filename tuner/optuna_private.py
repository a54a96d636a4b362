"""The one fence around Optuna's private and experimental API.

Coordinating workers needs a few things Optuna does not expose publicly: a study's storage and
id, a trial's id, and the heartbeat table of an RDB storage. Every such use is a function here,
so an Optuna upgrade breaks in one file; `TESTED_OPTUNA_MAJOR` is pinned by
tests/tuner/test_optuna_private.py, which fails on a new major version until this file has been
checked against it. The experimental (public, but warning) API the study uses is here too, with
its warning silenced in one place.

optuna and sqlalchemy are imported inside the functions (optional at import time).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

TESTED_OPTUNA_MAJOR = (4, 5)  # Optuna majors this file was checked against (5.1 installed here)


@contextlib.contextmanager
def experimental():
    """Silences Optuna's ExperimentalWarning inside the block."""
    import optuna  # optional at import time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_of(study) -> Any:
    """The storage a study object reads and writes (`Study._storage`)."""
    return study._storage


def study_id_of(study) -> int:
    """The storage's id of a study (`Study._study_id`)."""
    return study._study_id


def trial_id_of(trial) -> int:
    """The storage's id of a trial (`Trial._trial_id`, `FrozenTrial._trial_id`)."""
    return trial._trial_id


def heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval in seconds, or None without heartbeats."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


def rdb_engine(storage):
    """The SQLAlchemy engine behind an RDB storage (`_CachedStorage._backend.engine`), else None."""
    rdb = getattr(storage, "_backend", storage)  # _CachedStorage wraps the RDBStorage
    return getattr(rdb, "engine", None)


def heartbeat_models():
    """(TrialModel, TrialHeartbeatModel) of the RDB schema (`optuna.storages._rdb.models`)."""
    from optuna.storages._rdb import models  # optional at import time

    return models.TrialModel, models.TrialHeartbeatModel


def unbeaten_running_trials(storage, study_id: int) -> list[int]:
    """Ids of the RUNNING trials of `study_id` that never recorded a heartbeat (RDB storages)."""
    import optuna  # optional at import time
    import sqlalchemy

    engine = rdb_engine(storage)
    if engine is None:
        return []
    T, H = heartbeat_models()
    query = (sqlalchemy.select(T.trial_id)
             .where(T.study_id == study_id, T.state == optuna.trial.TrialState.RUNNING,
                    ~sqlalchemy.exists().where(H.trial_id == T.trial_id)))
    with engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(query)]


def fail_stale_trials(study) -> None:
    """Optuna's (experimental) failing of trials whose heartbeat stopped."""
    import optuna  # optional at import time

    with experimental():
        optuna.storages.fail_stale_trials(study)


def retry_callback(max_retry: int):
    """What the storage calls for a trial of a dead worker: queue its params again (WAITING)."""
    import optuna  # optional at import time

    with experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def tpe_sampler(seed: int):
    """The study's sampler: multivariate TPE with `group=True` and the constant liar (experimental)."""
    import optuna  # optional at import time

    with experimental():
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
