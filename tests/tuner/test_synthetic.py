"""The synthetic routing generator: trace contract, knobs, calibration to targets, presets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from expertflow.errors import DataError
from expertflow.trace import RoutingTrace
from tuner import stats, synthetic
from tuner.synthetic import RoutingTargets, SyntheticParams


def params(L=6, E=16, k=4, **kw) -> SyntheticParams:
    base = {"skew": (1.0,) * L, "locality": (0.5,) * L}
    base.update(kw)
    return SyntheticParams(L, E, k, **base)


def test_generated_trace_follows_the_trace_contract(tmp_path):
    p = params(normalize_topk=True)
    t = synthetic.generate(p, [5, 9, 3], seed=3, meta={"fingerprint": "dims-0000000000000000"})
    N, L, k = t.ids.shape
    assert (N, L, k) == (17, 6, 4) and t.num_experts == 16 and t.lookahead == 4
    assert t.routing == "synthetic" and t.meta["synthetic"]["preset"] == "custom"
    # distinct experts per token, weights descending and renormalised
    s = np.sort(t.ids, -1)
    assert (s[..., 1:] != s[..., :-1]).all()
    assert (np.diff(t.weights, axis=-1) <= 1e-7).all()
    assert np.allclose(t.weights.sum(-1), 1.0, atol=1e-5)
    # predictions: valid ids where l + d < L, -1 past the last layer
    for src in range(L):
        for d in range(1, 5):
            block = t.pred[:, src, d - 1]
            assert ((block >= 0).all() and (block < 16).all()) if src + d < L else (block == -1).all()
    assert t.seq.tolist() == [0] * 5 + [1] * 9 + [2] * 3
    assert t.pos.tolist() == list(range(5)) + list(range(9)) + list(range(3))
    assert t.steps.tolist() == [[0, 5, 0], [5, 9, 0], [14, 3, 0]]
    # round trip through the trace file format
    back = RoutingTrace.load(t.save(tmp_path / "t.npz"))
    for name in ("ids", "weights", "pred", "seq", "pos", "steps"):
        assert np.array_equal(getattr(back, name), getattr(t, name)), name
    assert back.meta["synthetic"] == t.meta["synthetic"]


def test_unnormalised_weights_are_softmax_shares():
    t = synthetic.generate(params(), [50], seed=0)
    assert (t.weights.sum(-1) < 1.0).all() and (t.weights > 0).all()


def test_deterministic_per_seed():
    a = synthetic.generate(params(), [40, 40], seed=1)
    b = synthetic.generate(params(), [40, 40], seed=1)
    c = synthetic.generate(params(), [40, 40], seed=2)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.pred, b.pred)
    assert not np.array_equal(a.ids, c.ids)


def test_each_knob_moves_its_statistic():
    lens = [64] * 24
    lo = synthetic.generate(params(skew=(0.2,) * 6), lens, seed=0)
    hi = synthetic.generate(params(skew=(2.0,) * 6), lens, seed=0)
    assert stats.traffic_share_top(hi).mean() > stats.traffic_share_top(lo).mean() + 0.15
    lo = synthetic.generate(params(locality=(0.0,) * 6), lens, seed=0)
    hi = synthetic.generate(params(locality=(0.9,) * 6), lens, seed=0)
    assert stats.lru_hit_rate(hi).mean() > stats.lru_hit_rate(lo).mean() + 0.1
    lo = synthetic.generate(params(cross_layer=0.3, predictor_fidelity=1.0), lens, seed=0)
    hi = synthetic.generate(params(cross_layer=0.95, predictor_fidelity=1.0), lens, seed=0)
    r_lo, r_hi = stats.predictor_recall(lo), stats.predictor_recall(hi)
    assert np.nanmean(r_hi[1]) > np.nanmean(r_lo[1]) + 0.15
    # accuracy decays with lookahead distance
    assert np.nanmean(r_hi[0]) > np.nanmean(r_hi[1]) > np.nanmean(r_hi[3])


def test_calibrate_reproduces_its_targets():
    targets = RoutingTargets(traffic_share=0.6, lru_hit={0.25: 0.62, 0.5: 0.86},
                             predictor_recall={1: 0.8, 3: 0.65}, top1_weight_share=0.55, source="test")
    p = synthetic.calibrate(targets, num_layers=6, num_experts=32, top_k=4, tokens=2048)
    t = synthetic.generate(p, [64] * 96, seed=11)  # fresh tokens, not the calibration sample
    assert stats.traffic_share_top(t, 0.25).mean() == pytest.approx(0.6, abs=0.03)
    assert stats.lru_hit_rate(t, 0.25).mean() == pytest.approx(0.62, abs=0.04)
    assert stats.lru_hit_rate(t, 0.5).mean() == pytest.approx(0.86, abs=0.05)
    rec = stats.predictor_recall(t)
    assert np.nanmean(rec[0]) == pytest.approx(0.8, abs=0.04)
    assert stats.top1_weight_share(t) == pytest.approx(0.55, abs=0.02)
    assert set(p.fit_error) >= {"traffic_share", "lru_hit_0.25", "predictor_recall", "top1_weight_share"}


def test_per_layer_targets_are_fitted_per_layer():
    share = (0.9, 0.5, 0.7, 0.45)
    lru = (0.9, 0.5, 0.65, 0.45)
    targets = RoutingTargets(traffic_share=share, lru_hit={0.25: lru}, source="test")
    p = synthetic.calibrate(targets, num_layers=4, num_experts=32, top_k=4, tokens=4096)
    t = synthetic.generate(p, [64] * 96, seed=5)
    assert stats.traffic_share_top(t) == pytest.approx(share, abs=0.04)
    assert stats.lru_hit_rate(t) == pytest.approx(lru, abs=0.05)


def test_mixtral_preset_reproduces_first_expert_repeats_and_predictor():
    p = synthetic.preset_params("mixtral", num_layers=32, num_experts=8, top_k=2, normalize_topk=True)
    t = synthetic.generate(p, [64] * 64, seed=7)
    assert stats.first_expert_repeat(t).mean() == pytest.approx(0.21, abs=0.03)  # 14-28%
    assert stats.traffic_share_top(t, 0.25).mean() == pytest.approx(0.35, abs=0.03)
    assert np.nanmean(stats.predictor_recall(t)[0]) == pytest.approx(0.93, abs=0.06)
    assert np.allclose(t.weights.sum(-1), 1.0, atol=1e-5)


def test_qwen_preset_reproduces_published_skew_and_lru():
    p = synthetic.preset_params("qwen2_moe", num_layers=24, num_experts=60, top_k=4)
    t = synthetic.generate(p, [64] * 64, seed=9)
    # Qwen3-30B: 95% of traffic through 52.5% of experts; LRU 60/74/85% at 15/25/35% capacity
    assert stats.traffic_share_top(t, 0.525).mean() == pytest.approx(0.95, abs=0.02)
    d = stats.lru_stack_distances(t)
    for frac, want in ((0.15, 0.60), (0.25, 0.74), (0.35, 0.85)):
        assert stats.lru_hit_rate(t, frac, distances=d).mean() == pytest.approx(want, abs=0.05), frac
    # Qwen2-57B next-layer gate reuse 66.9%
    assert np.nanmean(stats.predictor_recall(t)[0]) == pytest.approx(0.669, abs=0.04)


def test_bad_knobs_and_unknown_family_raise_data_errors():
    with pytest.raises(DataError, match="one value per layer"):
        SyntheticParams(4, 8, 2, skew=(1.0,) * 3, locality=(0.5,) * 4)
    with pytest.raises(DataError, match="locality"):
        params(locality=(1.5,) * 6)
    with pytest.raises(DataError, match="top_k"):
        SyntheticParams(2, 4, 4, skew=(1.0,) * 2, locality=(0.0,) * 2)
    with pytest.raises(DataError, match="no synthetic routing preset"):
        synthetic.family_of("gpt2")
    with pytest.raises(DataError, match="sequences"):
        synthetic.generate(params(), [])


def test_as_dict_is_plain_yaml():
    import yaml

    p = replace(params(), fit_error={"traffic_share": 0.001})
    d = yaml.safe_load(yaml.safe_dump(p.as_dict()))
    assert d["skew"] == [1.0] * 6 and d["preset"] == "custom" and "layer_ids" not in d


# ---- bundled presets ----------------------------------------------------------------------------
def _registry_dims():
    from expertflow.registry import known_models, resolve_model

    for name in known_models():
        spec = resolve_model(name)
        if not spec.tiny:
            yield name, synthetic.family_of(spec.architecture), {
                "num_layers": spec.num_moe_layers, "num_experts": spec.num_experts, "top_k": spec.top_k,
                "normalize_topk": spec.norm_topk_prob}


def test_every_registry_model_has_a_bundled_preset_and_preset_params_uses_it(monkeypatch):
    bundled = synthetic._bundled_presets()
    for name, family, dims in _registry_dims():
        assert synthetic.preset_key(family, **dims) in bundled, (
            f"{name}: no bundled synthetic preset for CALIBRATION_VERSION {synthetic.CALIBRATION_VERSION}; "
            "run python bench/bundle_presets.py")
    # a bundled model never calibrates; an unknown one does
    synthetic.preset_params.cache_clear()
    calls = []
    monkeypatch.setattr(synthetic.bundle, "calibrate", lambda *a, **k: calls.append(k) or None)
    name, family, dims = next(_registry_dims())
    assert isinstance(synthetic.preset_params(family, **dims), SyntheticParams) and calls == []
    synthetic.preset_params(family, **{**dims, "num_experts": dims["num_experts"] + 2})
    assert len(calls) == 1
    synthetic.preset_params.cache_clear()


def test_a_bundled_preset_equals_a_fresh_calibration():
    """bench/bundle_presets.py stores what calibrate gives: re-fit the cheapest model (mixtral,
    ~3 s) and compare every knob and a generated trace. Fails when the calibration changed
    without CALIBRATION_VERSION and a re-bundle."""
    name, family, dims = next((n, f, d) for n, f, d in _registry_dims() if f == "mixtral")
    fresh = synthetic.calibrate_preset(family, **dims)
    stored = synthetic.params_from_json(synthetic._bundled_presets()[synthetic.preset_key(family, **dims)])
    assert stored == fresh, f"{name}: bundled preset is stale; run python bench/bundle_presets.py"
    assert stored.fit_error == pytest.approx(fresh.fit_error)
    a = synthetic.generate(stored, [40, 24], seed=5)
    b = synthetic.generate(fresh, [40, 24], seed=5)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.weights, b.weights) and np.array_equal(a.pred, b.pred)
