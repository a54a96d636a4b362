"""Synthetic routing is never exported as the model's own (no priors in config.yaml, no policy
that needs them), the sensitivity band's settings move locality as labelled, its rule prefers
the finalist that stays fast, and a profile whose timing was too noisy says so everywhere."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tuner.records import TimingNoise, TuningRecord

MODEL = "tiny-qwen2-moe"


def _tune(tmp_path, prof, *extra, trials: int = 6):
    import contextlib
    import io

    from efcli.tune import main as tune_main

    prof_dir = prof.save(tmp_path / "profile")
    out = tmp_path / "out"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = tune_main(["--model", MODEL, "--budget", "1GB", "--profile", str(prof_dir), "--out", str(out),
                        "--trials", str(trials), "--json", "--jobs", "1", *extra])
    assert rc == 0, err.getvalue()
    return out, json.loads(buf.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    import _tuner_fixtures as fx

    return _tune(tmp_path_factory.mktemp("syn"), fx.make_profile(MODEL, routing="synthetic"))


def test_synthetic_routing_exports_no_priors_and_never_searches_static(synthetic_run):
    import optuna

    from expertflow.config import load_config

    out, last, err = synthetic_run
    config = load_config(out / "config.yaml")
    assert config.provenance.routing == "synthetic"
    assert config.cache.priors is None and config.cache.policy != "static"
    t = TuningRecord.load(out)
    study = optuna.load_study(study_name=t.study.name, storage=t.study.storage)
    assert all(tr.params.get("cache.policy") != "static" for tr in study.trials)
    assert all(tr.params.get("cache.allocation", "uniform") == "uniform" for tr in study.trials)
    assert "carries no cache.priors" in err


def test_real_routing_keeps_the_profile_priors(tmp_path):
    import _tuner_fixtures as fx

    from expertflow.config import load_config

    prof = fx.make_profile(MODEL, routing="real")
    out, _, err = _tune(tmp_path, prof, trials=3)
    priors = load_config(out / "config.yaml").cache.priors
    assert priors is not None and np.allclose(priors, prof.priors(), rtol=1e-2, atol=1e-4)
    assert all(v == float(f"{v:.3g}") for row in priors for v in row)  # rounded: config.yaml stays short
    assert "carries no cache.priors" not in err


def test_synthetic_run_reports_the_sensitivity_band(synthetic_run):
    out, _, err = synthetic_run
    t = TuningRecord.load(out)
    s = t.sensitivity
    assert [b.label for b in s.settings] == ["preset", "more local", "less local", "much less local"]
    assert s.chosen == t.chosen.trial and t.chosen.rule == s.rule
    row = next(r for r in s.finalists if r.trial == s.chosen)
    assert row.speeds[0] == pytest.approx(t.chosen.predicted["decode_tokens_per_s"], rel=1e-6)
    assert "sensitivity band (synthetic routing" in err
    html = (out / "report.html").read_text()
    assert 'id="sensitivity"' in html and "Sensitivity to routing locality" in html


def test_band_settings_are_less_and_more_local_as_labelled():
    import _tuner_fixtures as fx

    from tuner.sensitivity import band_traces

    band = band_traces(fx.make_profile(MODEL, seqs=8, seq_len=64))
    lru = {b["label"]: b["lru_hit_25"] for b in band}
    assert lru["more local"] > lru["preset"] > lru["less local"] > lru["much less local"]
    n = band[0]["trace"].num_tokens
    assert all(b["trace"].num_tokens == n for b in band)


def test_robust_choice_prefers_the_finalist_that_stays_fast(tiny_config):
    """Finalist A (lru) is fastest at the preset but loses 100 tokens/s per unit of LRU hit rate;
    B (lfu) is 2 tokens/s slower at the preset and loses 10: the band rule picks B, and says the
    speed rule would have picked A."""
    import _tuner_fixtures as fx

    from tuner import stats
    from tuner.objective import StudyContext
    from tuner.records import TrialRecord
    from tuner.sensitivity import band_traces, describe, robust_choice
    from tuner.simulator import SimResult

    prof = fx.make_profile(MODEL, seqs=8, seq_len=64)
    band = band_traces(prof)
    ref = float(np.mean(stats.lru_hit_rate(prof.trace, 0.25)))

    def sim(trace, costs, config, **kw):
        gap = ref - float(np.mean(stats.lru_hit_rate(trace, 0.25)))
        tps = 40.0 - 100.0 * gap if config.cache.policy == "lru" else 38.0 - 10.0 * gap
        return SimResult(metrics={"decode_tokens_per_s": tps, "quality_loss": 0.0, "peak_gpu_bytes": 0.0},
                         counters=None)

    ctx = StudyContext(prof.trace, None, tiny_config(MODEL), None, simulate_fn=sim)
    a = TrialRecord(number=3, params={"cache.policy": "lru"}, feasible=True, values=[40.0, 0.0], constraints={},
                    metrics={"decode_tokens_per_s": 40.0, "quality_loss": 0.0})
    b = TrialRecord(number=5, params={"cache.policy": "lfu"}, feasible=True, values=[38.0, 0.0], constraints={},
                    metrics={"decode_tokens_per_s": 38.0, "quality_loss": 0.0})
    pick, rec = robust_choice(ctx, a, [a, b], band, 0.02, max_decode_tokens=16)
    assert pick.number == 5 and rec.chosen == 5 and rec.changed and rec.speed_rule_choice == 3
    rows = {r.trial: r for r in rec.finalists}
    assert rows[3].speeds[0] == pytest.approx(40.0) and rows[3].worst < rows[5].worst
    assert "Chosen over trial 3" in describe(rec)
    # without the losses in the band, the preset's fastest stays chosen
    flat = dataclasses.replace(ctx, simulate_fn=lambda trace, costs, config, **kw: sim(prof.trace, costs, config))
    assert robust_choice(flat, a, [a, b], band, 0.02, max_decode_tokens=16)[0].number == 3


def test_noisy_timing_is_said_in_the_output_tuning_json_and_report(tmp_path):
    import _tuner_fixtures as fx

    from tuner.profiler.robust import CRITERION

    prof = fx.make_profile(MODEL)
    prof.meta.timing.noise = TimingNoise(criterion=CRITERION, threshold_rel_iqr=0.25, noisy=True,
                                         reasons=["the per-layer decode time is uncertain by 80%"])
    out, last, err = _tune(tmp_path, prof, trials=3)
    assert "WARNING: timing too noisy to rank configs (the per-layer decode time is uncertain by 80%" in err
    assert last["timing_noisy"] is True
    assert TuningRecord.load(out).timing_noise.noisy is True
    html = (out / "report.html").read_text()
    assert "Timing too noisy to rank configs" in html


def test_quiet_or_unassessed_timing_says_nothing_alarming(synthetic_run):
    out, last, err = synthetic_run
    assert last["timing_noisy"] is False and "too noisy" not in err
    assert TuningRecord.load(out).timing_noise is None  # bundled tables
