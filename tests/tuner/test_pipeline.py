"""`ef-tune` end to end on tiny-qwen2-moe (a hand-made profile, no profiler): the output folder
contract, the config round trip through `ef-run`, --resume, errors and exit codes, validation."""

from __future__ import annotations

import json

import pytest

from expertflow.errors import EXIT_BUDGET, EXIT_CONFIG, EXIT_STORAGE, EXIT_USAGE
from tuner.records import TuningRecord

MODEL = "tiny-qwen2-moe"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(profile dir, a budget string holding 20 of the 32 experts)."""
    import _tuner_fixtures as fx

    from expertflow.budget import plan_memory
    from expertflow.registry import resolve_model

    spec = resolve_model(MODEL)
    prof = fx.make_profile(MODEL).save(tmp_path_factory.mktemp("prof") / "profile")
    big = plan_memory(spec, "1GB", max_context_tokens=512)
    fixed = big.non_expert_bytes + big.kv_cache_bytes + big.workspace_bytes
    budget = str(int((fixed + 20.5 * big.bytes_per_expert) / (1 - big.margin_fraction)))
    assert plan_memory(spec, budget, max_context_tokens=512).capacity_experts == 20
    return prof, budget


def _tune(capsys, tiny, out, *extra):
    from efcli.tune import main as tune_main

    prof, budget = tiny
    given = ["--profile", str(prof)] if prof is not None else []
    rc = tune_main(["--model", MODEL, "--budget", budget, *given, "--out", str(out),
                    "--max-context", "512", "--json", "--jobs", "1", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def run5(tiny, tmp_path_factory):
    """A 5-trial ef-tune into a fresh folder (report included), via the console entry point."""
    import contextlib
    import io

    from efcli.tune import main as tune_main

    prof, budget = tiny
    out = tmp_path_factory.mktemp("tune") / "out"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = tune_main(["--model", MODEL, "--budget", budget, "--profile", str(prof), "--out", str(out),
                        "--trials", "5", "--max-context", "512", "--json", "--jobs", "1"])
    assert rc == 0, err.getvalue()
    return out, buf.getvalue(), err.getvalue()


def test_json_last_line_names_config_report_and_predicted_metrics(run5):
    from tuner.simulator import METRIC_KEYS

    out, stdout, stderr = run5
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["config_path"] == str((out / "config.yaml").resolve())
    assert set(METRIC_KEYS) <= set(last["predicted"])
    assert last["routing"] == "synthetic" and last["hardware_source"] == "bundled:h200"
    assert "config:" in stderr and "SYNTHETIC" in stderr
    try:
        import reports.build  # noqa: F401
    except ImportError:
        assert last["report_path"] is None
    else:
        assert last["report_path"] and (out / "report.html").is_file()


def test_output_folder_follows_the_contract(run5):
    from expertflow.config import load_config

    out, stdout, _ = run5
    raw = json.loads((out / "tuning.json").read_text())  # the file itself: every part written
    for key in ("version", "created_at", "tool_version", "model", "budget", "hardware", "routing",
                "profile_dir", "study", "quality", "chosen", "references", "pareto", "validation",
                "validation_note", "timings_s", "run_command"):
        assert key in raw, key
    t = TuningRecord.load(out)  # ... and a tuning record
    assert t.version == 1 and t.study.n_trials == 5
    assert t.study.storage.startswith("sqlite:///") and (out / "study.sqlite3").is_file()
    assert t.study.objectives == ["decode_tokens_per_s", "quality_loss"]
    assert [r.name for r in t.references] == ["all experts on GPU", "plain LRU, no prefetch",
                                              "whole-layer offload", "default config"]
    assert t.references[0].feasible is False and "budget" in t.references[0].reason
    assert sum(v for _, v in t.budget.terms) == t.budget.bytes
    assert t.quality.metric == "dropped_mass" and t.quality.cap == 0.02
    assert t.validation_note == "no GPU here: predictions not validated"
    assert t.chosen.predicted["quality_loss"] <= 0.02
    assert t.chosen.predicted["peak_gpu_bytes"] <= t.budget.bytes
    config = load_config(out / "config.yaml")
    p = config.provenance
    assert p.trial_number == t.chosen.trial and p.study_name == t.study.name
    assert p.routing == "synthetic" and p.hardware_source == "bundled:h200" and p.profile_id
    assert p.predicted["decode_tokens_per_s"] == pytest.approx(t.chosen.predicted["decode_tokens_per_s"])
    for key, value in t.chosen.params.items():
        assert config.get(key) == value
    assert config.cache.capacity_experts <= 20


def test_exported_config_round_trips_through_ef_run(run5, capsys):
    from efcli.run import main as run_main

    out, _, _ = run5
    rc = run_main(["--config", str(out / "config.yaml"), "--json", "--device", "cpu", "--max-new-tokens", "4"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert res["new_tokens"] == 4 and 0.0 <= res["hit_rate"] <= 1.0
    assert res["model"] == MODEL


def test_resume_continues_without_reenqueueing_and_a_rerun_without_it_is_refused(tiny, tmp_path, capsys):
    import optuna

    out = tmp_path / "out"
    assert _tune(capsys, tiny, out, "--trials", "3", "--no-report")[0] == 0
    rc, _, err = _tune(capsys, tiny, out, "--trials", "3", "--no-report")
    assert rc == EXIT_STORAGE and "--resume" in err and len(err.strip().splitlines()) == 1
    rc, stdout, _ = _tune(capsys, tiny, out, "--trials", "5", "--resume", "--no-report")
    assert rc == 0
    t = TuningRecord.load(out)
    study = optuna.load_study(study_name=t.study.name, storage=t.study.storage)
    assert len(study.trials) == 5
    assert [x.user_attrs.get("baseline") for x in study.trials].count(None) == 3


@pytest.mark.parametrize("extra, code, words", [
    (["--budget", "1MB"], EXIT_BUDGET, "budget too small"),
    (["--max-quality-loss", "-1"], EXIT_USAGE, "--max-quality-loss"),
])
def test_user_errors_are_one_line_with_their_exit_code(tiny, tmp_path, capsys, extra, code, words):
    from efcli.tune import main as tune_main

    prof, budget = tiny
    args = ["--model", MODEL, "--budget", budget, "--profile", str(prof), "--out", str(tmp_path / "o"),
            "--trials", "2", "--no-report", "--max-context", "512"]
    rc = tune_main(args + extra)
    err = capsys.readouterr().err
    assert rc == code and words in err and len(err.strip().splitlines()) == 1


def test_bad_search_space_names_the_key(tiny, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("version: 1\nparams:\n  cache.policy: {type: categorical, choices: [lru, mru]}\n")
    rc, _, err = _tune(capsys, tiny, tmp_path / "o", "--trials", "2", "--search-space", str(space))
    assert rc == EXIT_CONFIG and "'cache.policy'" in err and "'mru'" in err


def test_profile_of_another_model_is_refused(tiny, tmp_path, capsys):
    from efcli.tune import main as tune_main

    prof, _ = tiny
    rc = tune_main(["--model", "tiny-mixtral", "--budget", "2GB", "--profile", str(prof),
                    "--out", str(tmp_path / "o"), "--trials", "2"])
    assert rc == 4 and "fingerprint" in capsys.readouterr().err


def test_validate_configs_replays_the_trace_so_decisions_match_the_simulator(tiny):
    """Forced on CPU: the measured hits, activations and prefetches equal the predicted ones."""
    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner.profile import Profile
    from tuner.simulator import Costs
    from tuner.validate import validate_configs

    prof = Profile.load(tiny[0])
    spec = resolve_model(MODEL)
    plan = plan_memory(spec, "1GB", max_context_tokens=512, dtype="float32")
    base = default_config(spec, plan, priors=prof.priors(), device="cpu", dtype="float32")
    cfg = base.with_values({"cache.capacity_experts": 10, "cache.policy": "expertflow", "prefetch.depth": 2,
                            "adaptive_k.threshold": 0.8})
    costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    skipped = validate_configs(spec, [cfg], prof.trace, device="cpu", labels=["chosen"])
    assert skipped[0]["measured"] is None and "no GPU" in skipped[0]["note"]
    [v] = validate_configs(spec, [cfg], prof.trace, device="cpu", force=True, max_new_tokens=40,
                           costs=costs, labels=["chosen"], warmup_tokens=1)
    m, p = v["measured"], v["predicted"]
    assert m["decode_tokens"] == 40
    for key in ("hit_rate", "activated_per_token", "prefetch_precision", "bytes_per_token"):
        assert m[key] == pytest.approx(p[key]), key
    assert 0 < m["hit_rate"] < 1 and m["prefetch_precision"] > 0
    assert set(v["error"]) >= {"decode_tokens_per_s", "hit_rate"} and v["error"]["hit_rate"] == pytest.approx(0)


def test_validate_on_the_graph_engine_measures_the_predicted_counts(tiny):
    """A config that runs on the graph engine is validated on the engine (eagerly on CPU, routing
    replayed inside its step): measured hits and misses equal the engine timeline's prediction."""
    import dataclasses

    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner.engine_sim import EngineCosts
    from tuner.profile import Profile
    from tuner.simulator import Costs
    from tuner.validate import validate_configs

    prof = Profile.load(tiny[0])
    spec = resolve_model(MODEL)
    plan = plan_memory(spec, "1GB", max_context_tokens=512, dtype="float32")
    base = default_config(spec, plan, priors=prof.priors(), device="cpu", dtype="float32")
    costs = dataclasses.replace(Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers), engine=EngineCosts(
        layer_ms=((1, 0.5),), overhead_ms=((1, 0.1),), kernel=((1, 1, 0, 0.2), (1, 0, 1, 1.0), (1, 2, 0, 0.3)),
        host_layer_ms=0.0, prefill_layer_ms_per_token=0.01, copy_ms=1.0))
    cfgs = [base.with_values({"cache.capacity_experts": cap, "cache.policy": pol, "runtime.engine": "graph",
                              "cache.read_through_slots": rt, "adaptive_k.threshold": thr})
            for cap, pol, rt, thr in ((10, "lru", 1, 1.0), (12, "lfu", 0, 0.8))]
    res = validate_configs(spec, cfgs, prof.trace, device="cpu", force=True, max_new_tokens=30, costs=costs)
    for v in res:
        m, p = v["measured"], v["predicted"]
        assert m["decode_tokens"] == 30
        assert m["misses_per_token"] > 0
        for key in ("hit_rate", "misses_per_token", "bytes_per_token", "admitted_per_token"):
            assert m[key] == pytest.approx(p[key]), key
    assert res[0]["measured"]["admitted_per_token"] > 0 and res[1]["measured"]["admitted_per_token"] == 0


def test_without_a_profile_the_profiler_runs_and_says_where_timing_came_from(tiny, tmp_path, capsys):
    """No --profile: ef-tune runs the profiler into out/profile. On a machine without a GPU it
    takes the bundled h200 tables, and for a model they do not cover (tiny-*) it measures this
    CPU instead; the output says which."""
    from tuner.profile import Profile

    out = tmp_path / "out"
    rc, stdout, err = _tune(capsys, (None, tiny[1]), out, "--trials", "3", "--no-report")
    assert rc == 0, err
    assert Profile.load(out / "profile").fingerprint
    t = TuningRecord.load(out)
    assert t.profile_dir == "profile"
    assert t.hardware.source == "measured"
    import torch

    if not torch.cuda.is_available():  # no tiny-* entry in the bundled h200 tables: this CPU
        assert "timing measured on this CPU" in err
