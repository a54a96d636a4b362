"""adaptive_k.min_k is searched, so its quality is measured per (threshold, min_k) and each
config's quality is read from the table of its own min_k (issue 13: measured only at min_k 1)."""

from __future__ import annotations

import pytest

from tuner import quality


def _ctx(tables):
    import _tuner_fixtures as fx

    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner.objective import StudyContext
    from tuner.search_space import packaged_space
    from tuner.simulator import Costs

    spec = resolve_model("tiny-qwen2-moe")
    plan = plan_memory(spec, "1GB", max_context_tokens=256, prefill_chunk_tokens=64)
    prof = fx.make_profile(spec.name)
    base = default_config(spec, plan, priors=prof.priors())
    costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    sym = {"budget": plan.capacity_experts, "layers": spec.num_moe_layers, "experts": spec.num_experts,
           "total": plan.total_experts, "top_k": spec.top_k, "lookahead": prof.trace.lookahead}
    space = packaged_space(spec.name).resolve(sym)
    return StudyContext(prof.trace, costs, base, space, quality_tables=tables, max_decode_tokens=16), space


def test_each_config_reads_the_quality_table_of_its_min_k():
    from tuner.objective import evaluate

    tables = {(False, 1): {0.5: 0.10, 1.0: 0.0}, (False, 2): {0.5: 0.02, 1.0: 0.0},
              (True, 1): {0.5: 0.30, 1.0: 0.0}}
    ctx, _ = _ctx(tables)

    def loss(**values):
        m, _ = evaluate(ctx, {f"adaptive_k.{k}": v for k, v in values.items()})
        return m["quality_loss"]

    assert loss(threshold=0.5, min_k=1) == pytest.approx(0.10)
    assert loss(threshold=0.5, min_k=2) == pytest.approx(0.02)
    assert loss(threshold=0.75, min_k=2) == pytest.approx(0.01)  # interpolated in its own table
    # renormalize measured at min_k 1 only: min_k 2 takes the nearest measured min_k below it
    # (that one keeps fewer experts, so its loss errs on the safe side)
    assert loss(threshold=0.5, min_k=1, renormalize=True) == pytest.approx(0.30)
    assert loss(threshold=0.5, min_k=2, renormalize=True) == pytest.approx(0.30)
    # a context from before min_k was measured: bare renormalize keys are min_k 1
    legacy, _ = _ctx({False: {0.5: 0.07, 1.0: 0.0}})
    assert evaluate(legacy, {"adaptive_k.threshold": 0.5, "adaptive_k.min_k": 2})[0]["quality_loss"] == pytest.approx(0.07)


def test_searched_min_ks_follow_the_space():
    _, space = _ctx(None)
    top_k = 2  # tiny-qwen2-moe
    assert space.params["adaptive_k.min_k"].high == top_k
    assert quality.searched_min_ks(space, top_k) == [1, 2]  # default.yaml: 1..top_k
    narrow = space.restrict("cache.policy", ("lru",), "test")
    del narrow.params["adaptive_k.min_k"]
    assert quality.searched_min_ks(narrow, top_k) == [1]


def test_pydocs_quality_is_measured_per_min_k(pydocs):
    """On trained weights, min_k 2 keeps more experts than min_k 1 at a low threshold, so its
    measured perplexity increase is smaller; min_k = top_k is exact top-k (no loss, not run)."""
    from expertflow.registry import resolve_model

    spec = resolve_model(pydocs)
    ids = quality.prompt_ids(spec, n_prompts=8)
    tables, rows = quality.measure_tables(spec, (0.5, 0.8), prompts=ids, min_ks=(1, 2, spec.top_k))
    assert set(tables) == {(False, 1), (False, 2), (False, spec.top_k)}
    assert tables[(False, 1)][0.5] > tables[(False, 2)][0.5] > 0
    assert tables[(False, spec.top_k)] == {0.5: 0.0, 0.8: 0.0, 1.0: 0.0}
    assert {(r["min_k"], r["threshold"]) for r in rows} == {(m, t) for m in (1, 2) for t in (0.5, 0.8, 1.0)}
    by = {(r["min_k"], r["threshold"]): r for r in rows}
    assert by[(2, 0.5)]["dropped_mass"] < by[(1, 0.5)]["dropped_mass"]
