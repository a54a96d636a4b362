"""The simulator replays a recorded trace through the runtime's own decision code: on the same
trace and config its hit / miss / prefetch / eviction counts equal the runtime's exactly."""

import itertools

import numpy as np
import pytest
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.registry import resolve_model
from expertflow.runtime.generate import greedy_generate
from expertflow.runtime.loading import build_model
from expertflow.runtime.offload import offload
from tuner.simulator import Costs, simulate

COSTS = Costs(copy_ms=0.3, layer_ms=((1, 0.1), (64, 0.2)), kernel_ms=((1, 0.05), (64, 0.1)),
              host_layer_ms=1.0)


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-mixtral"])
def test_counts_equal_runtime(name):
    spec = resolve_model(name)
    model = build_model(spec, device="cpu", dtype="float32", seed=0)
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = plan_memory(spec, "1GB", dtype="float32", max_context_tokens=64)
    priors = np.random.default_rng(0).random((spec.num_moe_layers, spec.num_experts))
    L, E = spec.num_moe_layers, spec.num_experts
    grid = itertools.product([L, L * E // 4], ["lru", "lfu", "static", "expertflow"], [0, 1, 3],
                             [1.0, 0.6], ["per_layer", "pooled"])
    checked = prefetched = 0
    for cap, policy, depth, threshold, scope in grid:
        if (cap + depth + int(threshold * 10)) % 3 and scope == "pooled":
            continue  # a third of the pooled combinations keeps the test quick
        cfg = default_config(spec, plan, device="cpu", dtype="float32", priors=priors).with_values({
            "cache.capacity_experts": cap, "cache.policy": policy, "prefetch.depth": depth,
            "cache.scope": scope, "adaptive_k.threshold": threshold})
        with offload(model, cfg, record_trace=True) as handle:
            greedy_generate(model, ids, 6)
            runtime = handle.counters.decision_counts()
            trace = handle.trace()
        sim = simulate(trace, COSTS, cfg, schedule="recorded")
        assert sim.counters.decision_counts() == runtime, (policy, cap, depth, threshold, scope)
        checked += 1
        prefetched += sum(runtime["prefetch_issued"])
    assert checked >= 40
    assert prefetched > 0  # the grid exercises prefetch decisions too
