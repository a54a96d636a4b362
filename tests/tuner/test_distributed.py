"""Several ef-tune workers, one study: exact trial counts, baselines once, one export, a late
joiner, a SIGKILLed worker whose trial is retried, Ctrl-C and --resume, --export-only.

Workers are real `ef-tune` processes (`efcli.tune.main` in a fresh interpreter) on
tiny-qwen2-moe with a hand-made profile, so each trial is a few milliseconds of simulation. Tests
marked `postgres` start their own PostgreSQL server on 127.0.0.1 (tests/tuner/_postgres.py) and
skip, with the reason, where its binaries are missing. The test-only environment variable
EXPERTFLOW_TEST_TRIAL_SLEEP_S (tuner/coordination.py) makes trials long enough to kill or
interrupt in their middle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from expertflow.errors import EXIT_INTERRUPTED
from tuner.coordination import TEST_ASLEEP_ATTR
from tuner.records import TuningRecord

MODEL = "tiny-qwen2-moe"
WORKER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from efcli.tune import main as tune_main; sys.exit(tune_main())")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(profile dir, budget) of tiny-qwen2-moe."""
    import _tuner_fixtures as fx

    prof = fx.make_profile(MODEL).save(tmp_path_factory.mktemp("prof") / "profile")
    return str(prof), "2GB"


@pytest.fixture(scope="module")
def pg_url():
    import _postgres

    reason = _postgres.skip_reason()
    if reason:
        pytest.skip(reason)
    with _postgres.postgres_server() as url:
        yield url


def _args(tiny, out, *extra) -> list[str]:
    prof, budget = tiny
    return ["--model", MODEL, "--budget", budget, "--profile", prof, "--out", str(out), "--no-report",
            "--no-validate", "--json", *extra]


def _spawn(args, *, sleep_s: float = 0.0, session: bool = False) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("EXPERTFLOW_TEST_TRIAL_SLEEP_S", None)
    if sleep_s:
        env["EXPERTFLOW_TEST_TRIAL_SLEEP_S"] = str(sleep_s)
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=session)


def _finish(proc, timeout=240) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


def _study(url, name):
    import optuna

    from tuner.storage import resolve_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=name, storage=resolve_url(url))


def _states(url, name) -> Counter:
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        return Counter()
    try:  # ASLEEP: RUNNING trials that have stored all their params and sleep (tuner.coordination)
        trials = _study(url, name).get_trials(deepcopy=False)
        return Counter([t.state.name for t in trials] + ["ASLEEP" for t in trials if t.state.name == "RUNNING"
                                                           and t.user_attrs.get(TEST_ASLEEP_ATTR)])
    except Exception:  # noqa: BLE001 - not created yet, or its tables are being created right now
        return Counter()


def _wait_for(url, name, pred, procs=(), timeout=120.0) -> Counter:
    """Poll the study until `pred(state counts)`; fail at once, with its stderr, when one of the
    worker processes `procs` has ended before that."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c = _states(url, name)
        if pred(c):
            return c
        for p in procs:
            if p.poll() is not None:
                _, err = p.communicate()
                raise AssertionError(f"worker ended with {p.returncode} before the study got there "
                                     f"(states {dict(c)}): {err[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting; study states {dict(_states(url, name))}")


def _no_half_files(folder) -> None:
    assert not [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]


def _check_baselines_once(study) -> None:
    """Each baseline was enqueued once and completed once; nothing else repeats their params."""
    from tuner.study import DEFAULT_BASELINE, LRU_BASELINE

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    tags = [t.user_attrs.get("baseline") for t in done if t.user_attrs.get("baseline")]
    assert sorted(tags) == sorted([DEFAULT_BASELINE, LRU_BASELINE])
    enqueued = [t for t in study.trials if "fixed_params" in t.system_attrs and "failed_trial" not in t.system_attrs]
    assert len(enqueued) == 2
    for t in enqueued:
        same = [u for u in done if u.params == t.system_attrs["fixed_params"] and "fixed_params" in u.system_attrs]
        assert len(same) == 1, t.user_attrs


# ---- many workers on PostgreSQL -------------------------------------------------------------
@pytest.mark.postgres
def test_three_workers_share_one_postgres_study(tiny, pg_url, tmp_path):
    """3 workers (one joining late) run one 60-trial study: 60 complete trials, none duplicated
    or lost, the baselines once, and exactly one export; a worker joining the finished study
    runs nothing and writes nothing."""
    name = "three-workers"
    common = ["--storage", pg_url, "--study", name, "--trials", "60"]
    # 0.5 s per trial: the first two would need ~15 s more when the third joins (after ~5 s of start-up)
    procs = [_spawn(_args(tiny, tmp_path / f"w{i}", *common), sleep_s=0.5) for i in range(2)]
    _wait_for(pg_url, name, lambda c: c["COMPLETE"] >= 4, procs)
    procs.append(_spawn(_args(tiny, tmp_path / "w2", *common), sleep_s=0.5))  # joins the running study
    results = [_finish(p) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    study = _study(pg_url, name)
    assert Counter(t.state.name for t in study.trials) == {"COMPLETE": 60}
    assert sorted(t.number for t in study.trials) == list(range(60))
    _check_baselines_once(study)
    configs = sorted(tmp_path.glob("w*/config.yaml"))
    assert len(configs) == 1
    exported = [last for _, last, _ in results if last["exported"]]
    assert len(exported) == 1 and exported[0]["config_path"] == str(configs[0].resolve())
    assert all(last["config_path"] == str(configs[0].resolve()) for _, last, _ in results)
    assert sum(last["trials_run"] for _, last, _ in results) == 60
    assert results[2][1]["trials_run"] > 0  # the late joiner took part
    tuning = TuningRecord.load(configs[0].parent)
    assert tuning.study.n_trials == 60 and tuning.study.storage.startswith("postgresql")

    rc, last, err = _finish(_spawn(_args(tiny, tmp_path / "late", *common)))
    assert rc == 0 and last["exported"] is False and last["trials_run"] == 0, err[-2000:]
    assert not (tmp_path / "late" / "config.yaml").exists()
    assert len(_study(pg_url, name).trials) == 60


# ---- a worker killed mid-trial ------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "beat"), [("sqlite", True), ("sqlite", False),
                                               pytest.param("postgres", True, marks=pytest.mark.postgres)])
def test_a_killed_workers_trial_is_retried_and_the_study_completes(tiny, tmp_path, backend, beat, request):
    """SIGKILL a worker in the middle of a trial: its trial stays RUNNING until its heartbeat is
    3 beats late; then the next worker fails it, re-runs its params and completes the study.
    `beat=False`: the worker died between claiming the trial and its first heartbeat (its
    heartbeat row is deleted here); the next worker must not wait for that trial for ever."""
    url = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'shared.db'}"
    name = f"killed-{backend}-{beat}"
    common = ["--storage", url, "--study", name, "--trials", "6", "--heartbeat", "1"]
    victim = _spawn(_args(tiny, tmp_path / "a", *common), sleep_s=1.5)
    try:
        _wait_for(url, name, lambda c: c["COMPLETE"] >= 1 and c["RUNNING"] == 1 and c["ASLEEP"] == 1, [victim])
    finally:
        victim.kill()
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    stuck = [t for t in _study(url, name).trials if t.state.name == "RUNNING"]
    assert len(stuck) == 1
    if not beat:
        _delete_heartbeat(url, stuck[0]._trial_id)

    rc, last, err = _finish(_spawn(_args(tiny, tmp_path / "b", *common)))
    assert rc == 0 and last["exported"], err[-2000:]
    study = _study(url, name)
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": 6, "FAIL": 1}, states
    [dead] = [t for t in study.trials if t.state.name == "FAIL"]
    assert dead.number == stuck[0].number and "fail_kind" not in dead.user_attrs
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert dead.params and retry.state.name == "COMPLETE" and retry.params == dead.params
    _check_baselines_once(study)
    assert (tmp_path / "b" / "config.yaml").is_file() and not (tmp_path / "a" / "config.yaml").exists()
    _no_half_files(tmp_path)


def _delete_heartbeat(url, trial_id) -> None:
    import sqlalchemy
    from optuna.storages._rdb import models

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        H = models.TrialHeartbeatModel
        assert conn.execute(sqlalchemy.delete(H).where(H.trial_id == trial_id)).rowcount == 1
    engine.dispose()


# ---- Ctrl-C and --resume ------------------------------------------------------------------------
@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_stops_cleanly_and_resume_continues(tiny, tmp_path, capsys, jobs):
    """Ctrl-C mid-trial (SIGINT to the process group, as a terminal sends it; with --jobs 2 the
    child process gets it too): each worker finishes and records its running trial, then stops
    with exit 130; no trial is left RUNNING, no output is written, none half-written; --resume
    completes the study without enqueueing the baselines again."""
    from efcli.tune import main as tune_main

    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.sqlite3'}"
    name = f"{MODEL}-2GB"
    proc = _spawn(_args(tiny, out, "--trials", "8", "--jobs", str(jobs)), sleep_s=1.0, session=True)
    try:
        before = _wait_for(url, name, lambda c: c["COMPLETE"] >= 1 and c["ASLEEP"] == jobs, [proc])
        os.killpg(proc.pid, signal.SIGINT)
        rc, _, err = _finish(proc, timeout=60)
    finally:
        proc.kill()
    assert rc == EXIT_INTERRUPTED, err[-2000:]
    assert "stopping after the running trial" in err and "--resume" in err
    study = _study(url, name)
    states = Counter(t.state.name for t in study.trials)
    assert set(states) == {"COMPLETE"} and before["COMPLETE"] + jobs <= states["COMPLETE"] < 8, states
    assert not (out / "config.yaml").exists() and not (out / "tuning.json").exists()
    _no_half_files(out)

    rc = tune_main(_args(tiny, out, "--trials", "8", "--resume"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    study = _study(url, name)
    assert Counter(t.state.name for t in study.trials) == {"COMPLETE": 8}
    _check_baselines_once(study)
    assert (out / "config.yaml").is_file()


# ---- export ---------------------------------------------------------------------------------------
def test_export_only_writes_the_shared_results_and_a_rerun_does_not_export_twice(tiny, tmp_path, capsys):
    from efcli.tune import main as tune_main

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    common = ["--storage", url, "--study", "s", "--trials", "4"]
    assert tune_main(_args(tiny, tmp_path / "a", *common)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["exported"] and first["trials_run"] == 4
    assert tune_main(_args(tiny, tmp_path / "b", *common)) == 0  # joins the complete study
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == {**again, "exported": False, "trials_run": 0, "config_path": first["config_path"]}
    assert not (tmp_path / "b" / "config.yaml").exists()
    assert tune_main(_args(tiny, tmp_path / "c", *common, "--export-only")) == 0
    forced = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert forced["exported"] and forced["trials_run"] == 0 and forced["chosen_trial"] == first["chosen_trial"]
    assert (tmp_path / "c" / "config.yaml").read_text().split("provenance:")[0] == \
        (tmp_path / "a" / "config.yaml").read_text().split("provenance:")[0]
    assert len(_study(url, "s").trials) == 4


def test_export_only_of_a_missing_study_is_a_storage_error(tiny, tmp_path, capsys):
    from expertflow.errors import EXIT_STORAGE
    from efcli.tune import main as tune_main

    url = f"sqlite:///{tmp_path / 'none.db'}"
    rc = tune_main(_args(tiny, tmp_path / "o", "--storage", url, "--study", "nope", "--export-only"))
    err = capsys.readouterr().err
    assert rc == EXIT_STORAGE and "'nope'" in err and "--export-only" in err
    assert len(err.strip().splitlines()) == 1


# ---- library-level: the count is exact with threads racing on one storage ------------------------
def test_racing_workers_never_overshoot_the_target(tmp_path):
    """Four threads (each its own storage, lock and sampler, as separate processes would have)
    claim trials of one SQLite study as fast as they can: exactly the target, each number once."""
    import threading

    import optuna

    from tuner.coordination import work
    from tuner.locks import study_lock
    from tuner.storage import make_storage
    from tuner.trials import TrialFailed, tally

    url = f"sqlite:///{tmp_path / 'race.db'}"
    optuna.create_study(study_name="race", storage=make_storage(url))
    calls = Counter()

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        calls[trial.number] += 1
        if trial.number % 7 == 3:
            trial.set_user_attr("fail_kind", "error")
            raise TrialFailed("NaN")
        return x

    def run(i):
        st = optuna.load_study(study_name="race", storage=make_storage(url, heartbeat_interval=5),
                               sampler=optuna.samplers.RandomSampler(seed=i))
        work(st, objective, target=25, lock=study_lock(url, "race"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = optuna.load_study(study_name="race", storage=url)
    assert len(study.trials) == 25 and tally(study).finished == 25
    assert set(calls.values()) == {1} and sorted(calls) == list(range(25))
    assert Counter(t.state.name for t in study.trials) == {"COMPLETE": 21, "FAIL": 4}


def test_storage_urls_are_shown_without_their_password():
    from tuner.storage import mask_url, storage_error

    url = "postgresql://ef:s3cret@db.example:5432/studies"
    assert "s3cret" not in mask_url(url) and "ef:***@db.example" in mask_url(url)
    err = storage_error(url, RuntimeError("password authentication failed for s3cret"))
    assert "s3cret" not in str(err) and "***" in str(err) and "\n" not in str(err)
