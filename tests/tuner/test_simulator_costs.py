"""Simulator costs on a case small enough to compute by hand."""

import numpy as np
import pytest

from expertflow.config import RuntimeConfig
from expertflow.trace import DECODE, PREFILL, RoutingTrace
from tuner.simulator import Costs, decode_schedule, simulate


def one_layer_config(capacity, depth=0, policy="lru", warm=False):
    return RuntimeConfig.model_validate({
        "model": {"name": "hand", "architecture": "qwen2_moe", "fingerprint": "dims-0123456789abcdef",
                  "num_moe_layers": 1, "num_experts": 4, "top_k": 1},
        "cache": {"capacity_experts": capacity, "policy": policy, "warm_start": warm},
        "prefetch": {"depth": depth},
        "memory": {"budget_bytes": 10**9, "budget_text": "1GB", "non_expert_bytes": 100,
                   "kv_cache_bytes": 10, "workspace_bytes": 1, "margin_bytes": 0,
                   "expert_cache_bytes": 10**6, "bytes_per_expert": 1000},
        "provenance": {"tool_version": "t", "created_at": "now"},
    })


def trace_of(experts, kinds):
    n = len(experts)
    ids = np.array(experts, dtype=np.int64).reshape(n, 1, 1)
    return RoutingTrace(ids=ids, weights=np.ones((n, 1, 1), np.float32),
                        pred=np.full((n, 1, 1, 1), -1, np.int64), seq=np.zeros(n, np.int32),
                        pos=np.arange(n, dtype=np.int32),
                        steps=np.array([[i, 1, k] for i, k in enumerate(kinds)]),
                        meta={"num_experts": 4})


COSTS = Costs(copy_ms=2.0, layer_ms=((1, 0.5),), kernel_ms=((1, 0.25),), host_layer_ms=1.0,
              host_pre_fraction=0.5, sync_ms=0.0, load_issue_ms=0.0, step_overhead_ms=0.0,
              gpu_share_decode=1.0, predictor_host_ms=0.0, adaptive_host_ms=0.0)


def test_hit_and_miss_costs_by_hand():
    # One layer, host 0.5 ms before the router sync and 0.5 after. The GPU runs the layer's 0.5 ms
    # of kernels as they are launched, so a hit step takes the host's 1.0 ms (the expert's 0.25
    # ms runs during host_post). A miss copies for 2.0 ms from the sync: the expert runs at
    # +2.5..+2.75 and the host waits for it at the step's end: 2.75 ms.
    tr = trace_of([0, 0, 1, 1], [PREFILL, DECODE, DECODE, DECODE])
    res = simulate(tr, COSTS, one_layer_config(capacity=1), schedule="recorded")
    # decode: hit (1.0), miss (2.75), hit (1.0) -> 3 tokens in 4.75 ms
    assert res.timeline["decode_ms"] == pytest.approx(4.75)
    assert res.metrics["decode_tokens_per_s"] == pytest.approx(3 / 4.75e-3)
    assert res.metrics["stall_ms_per_token"] == pytest.approx(2.0 / 3)
    assert res.metrics["hit_rate"] == pytest.approx(2 / 3)
    assert res.metrics["bytes_per_token"] == pytest.approx(1000 / 3)
    assert res.metrics["peak_gpu_bytes"] == 100 + 10 + 1 + 1000


def test_decode_schedule_rebatches_prompt_then_one_token_steps():
    tr = trace_of([0, 1, 2, 3, 0, 1], [PREFILL] * 6)
    steps = decode_schedule(tr, prompt_tokens=2)
    assert [len(t) for t, _ in steps] == [2, 1, 1, 1, 1]
    assert [k for _, k in steps] == [PREFILL] + [DECODE] * 4


def test_decode_gpu_share_and_host_extras_by_hand():
    # gpu_share 0.5: GPU layer 0.25, expert 0.125, both hidden behind the host. Decode steps all
    # hit: host_pre 0.5 + predictor 0.2, sync, host_post 0.5 -> 1.2 ms per step.
    import dataclasses

    costs = dataclasses.replace(COSTS, gpu_share_decode=0.5, predictor_host_ms=0.2)
    tr = trace_of([0, 0, 0, 0], [PREFILL, DECODE, DECODE, DECODE])
    cfg = one_layer_config(capacity=4, depth=1)
    res = simulate(tr, costs, cfg, schedule="recorded")
    assert res.timeline["decode_ms"] == pytest.approx(3 * 1.2)
