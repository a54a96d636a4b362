"""The adaptive-k trace check: an exact-top-k trace replayed for an adaptive-k config against a
trace re-recorded under that config's adaptive-k (tuner/adaptive_trace.py)."""

from __future__ import annotations

import numpy as np

from tuner.records import AdaptiveTraceCheck

MODEL = "tiny-qwen2-moe"


def _ctx(prof):
    from expertflow.budget import plan_memory
    from expertflow.config import default_config
    from expertflow.registry import resolve_model
    from tuner.objective import StudyContext
    from tuner.simulator import Costs

    spec = resolve_model(prof.meta.model.name)
    plan = plan_memory(spec, "1GB", max_context_tokens=256, prefill_chunk_tokens=64)
    base = default_config(spec, plan, priors=prof.priors()).with_values(
        {"cache.capacity_experts": 2 * spec.num_moe_layers, "prefetch.depth": 0})
    costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    return spec, StudyContext(prof.trace, costs, base, None, max_decode_tokens=32)


def _finalists():
    from tuner.records import TrialRecord

    def t(n, params):
        return TrialRecord(number=n, params=params, values=[1.0, 0.0], metrics={}, constraints={}, feasible=True)
    return [t(1, {"adaptive_k.threshold": 0.7}), t(2, {"adaptive_k.threshold": 1.0}),
            t(3, {"adaptive_k.threshold": 0.7, "cache.policy": "lfu"})]


def test_count_error_is_zero_for_the_same_trace_and_positive_for_another():
    import _tuner_fixtures as fx

    from tuner.adaptive_trace import count_error

    prof = fx.make_profile(MODEL, routing="real")
    spec, ctx = _ctx(prof)
    lens = np.bincount(prof.trace.seq).tolist()
    tokens = [[0] * n for n in lens]
    asked = []

    def same(spec, token_lists, *, device, dtype, values):
        asked.append(values)
        return prof.trace

    notes: list[str] = []
    rec = count_error(spec, prof, ctx, _finalists(), token_lists=tokens, device="cpu", dtype="float32",
                      max_decode_tokens=32, notes=notes, record=same)
    assert asked == [{"adaptive_k.threshold": 0.7, "adaptive_k.min_k": 1, "adaptive_k.renormalize": False}]
    assert [r["trial"] for r in rec["finalists"]] == [1, 3]  # trial 2 is exact top-k: nothing to check
    assert rec["max_count_error"] == 0.0 and "up to 0.00%" in notes[-1]

    other = fx.synthetic_trace(spec, seed=7)  # same shape, other routing

    def shifted(spec, token_lists, *, device, dtype, values):
        return other

    rec = count_error(spec, prof, ctx, _finalists(), token_lists=tokens, device="cpu", dtype="float32",
                      max_decode_tokens=32, notes=notes, record=shifted)
    row = rec["finalists"][0]
    hits = (row["exact_trace"]["hits"], row["rerecorded_trace"]["hits"])
    assert hits[0] != hits[1] and rec["max_count_error"] >= abs(hits[0] - hits[1]) / hits[1] - 1e-9
    # prompts that do not reproduce the profile's sequences: skipped, said
    assert count_error(spec, prof, ctx, _finalists(), token_lists=[[0] * 3] * len(lens), device="cpu",
                       dtype="float32", max_decode_tokens=32, notes=notes, record=same) is None
    assert "skipped" in notes[-1]


def test_pydocs_rerecorded_trace_differs_after_the_first_layer(pydocs):
    """With trained weights, routing recorded under adaptive-k 0.7 equals exact top-k in the first
    MoE layer (nothing dropped before it) and differs in later ones (the dropped experts changed
    their input): the error the check measures is real."""
    from expertflow.registry import resolve_model
    from tuner import quality
    from tuner.profiler.activation import record_routing

    spec = resolve_model(pydocs)
    ids = quality.prompt_ids(spec, n_prompts=6)
    exact = record_routing(spec, ids, device="cpu", dtype="float32")
    ak = record_routing(spec, ids, device="cpu", dtype="float32", values={"adaptive_k.threshold": 0.7})
    assert np.array_equal(exact.ids[:, 0], ak.ids[:, 0])
    changed = [float((exact.ids[:, l] != ak.ids[:, l]).any(-1).mean()) for l in range(1, spec.num_moe_layers)]
    assert max(changed) > 0.01


def test_the_report_states_the_count_error():
    from reports.robustness import checks

    def check(err):
        return AdaptiveTraceCheck(finalists=[], max_count_error=err, what="test")

    (c,) = checks(adaptive_trace=check(0.0076))
    assert c["level"] == "ok" and "0.8%" in c["text"] and "re-recorded" in c["text"]
    assert checks(adaptive_trace=check(0.05))[0]["level"] == "warn"
    assert checks() == []
