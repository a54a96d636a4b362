"""tuner/optuna_private.py is the one place that uses Optuna's private API: pin the versions it
was checked against, and that each private name it reads still exists."""

from __future__ import annotations

import optuna
import pytest

from tuner import optuna_private as op
from tuner.storage import make_storage


def test_optuna_major_is_one_the_fence_was_checked_against():
    major = int(optuna.__version__.split(".")[0])
    assert major in op.TESTED_OPTUNA_MAJOR, (
        f"optuna {optuna.__version__}: check tuner/optuna_private.py against it, then add {major} "
        "to TESTED_OPTUNA_MAJOR")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # we ask() a trial by hand, as work() does
def test_private_names_still_exist(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 's.sqlite3'}", heartbeat_interval=5)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    assert op.storage_of(study) is not None and isinstance(op.study_id_of(study), int)
    assert isinstance(op.trial_id_of(trial), int)
    assert op.heartbeat_interval(op.storage_of(study)) == 5
    assert op.rdb_engine(op.storage_of(study)) is not None
    assert op.unbeaten_running_trials(op.storage_of(study), op.study_id_of(study)) == [op.trial_id_of(trial)]
    assert all(hasattr(m, "trial_id") for m in op.heartbeat_models())
    op.fail_stale_trials(study)
    assert op.trial_id_of(study.get_trials()[0]) == op.trial_id_of(trial)
