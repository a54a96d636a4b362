"""The simulator replays a trace through the graph engine's own one-step-behind decisions: on the
same trace and config its hit / miss / admission / eviction counts equal the engine's exactly
(the engine run eagerly on CPU, routing replayed from the trace inside the step)."""

import itertools

import numpy as np
import pytest
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.engine import attach, replay_generate
from expertflow.registry import resolve_model
from expertflow.runtime.generate import greedy_generate
from expertflow.runtime.loading import build_model
from expertflow.runtime.offload import offload
from tuner.engine_sim import EngineCosts
from tuner.simulator import Costs, engine_decisions, simulate
from tuner.validate import replay_schedule


# any positive costs: the counts under test do not depend on them
COSTS = Costs(copy_ms=1.0, layer_ms=((1, 0.5),), kernel_ms=((1, 0.25),), host_layer_ms=1.0,
              engine=EngineCosts(layer_ms=((1, 0.5),), overhead_ms=((1, 0.1),), host_layer_ms=0.0,
                                 kernel=((1, 1, 0, 0.2), (1, 0, 1, 1.0), (1, 2, 0, 0.3)),
                                 prefill_layer_ms_per_token=0.01, copy_ms=1.0))


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-mixtral"])
def test_engine_counts_equal_simulator(name):
    spec = resolve_model(name)
    model = build_model(spec, device="cpu", dtype="float32", seed=0)
    plan_mem = plan_memory(spec, "1GB", dtype="float32", max_context_tokens=64)
    L, E = spec.num_moe_layers, spec.num_experts
    priors = np.random.default_rng(0).random((L, E))
    base = default_config(spec, plan_mem, device="cpu", dtype="float32", priors=priors)
    ids = torch.randint(0, spec.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with offload(model, base, record_trace=True) as handle:  # a real router's trace, 3 sequences
        greedy_generate(model, ids, 10)
        trace = handle.trace()
    prompt = 6
    schedule = replay_schedule(trace, prompt, None)
    decode_tokens = sum(len(r) - p for r, p in schedule)
    checked = admitted = 0
    seen = set()
    grid = itertools.product([L, L * E // 2, L * E], ["lru", "lfu", "static", "expertflow"], [1.0, 0.6],
                             ["per_layer", "pooled"], [0, 1, 2])
    for i, (cap, policy, threshold, scope, staging) in enumerate(grid):
        if i % 7:
            continue  # a seventh of the grid keeps CI quick; every axis value still appears (below)
        seen |= {("cap", cap), ("policy", policy), ("threshold", threshold), ("scope", scope), ("staging", staging)}
        cfg = base.with_values({"cache.capacity_experts": cap, "cache.policy": policy, "cache.scope": scope,
                                "adaptive_k.threshold": threshold, "cache.read_through_slots": staging})
        with attach(model, cfg, device="cpu") as eng:
            replay_generate(eng, trace, schedule)
            engine = eng.counters.decision_counts()
            engine_decode = dict(eng.sched.decode)
        sim = engine_decisions(trace, cfg, prompt_tokens=prompt, max_decode_tokens=decode_tokens)
        assert sim.counters.decision_counts() == engine, (cap, policy, threshold, scope, staging)
        assert sim.decode == engine_decode, (cap, policy, threshold, scope, staging)
        # the timeline the tuner ranks by sees the engine's own decode counts
        pred = simulate(trace, COSTS, cfg.with_values({"runtime.engine": "graph"}), prompt_tokens=prompt,
                        max_decode_tokens=decode_tokens).metrics
        lookups = engine_decode["hits"] + engine_decode["misses"]
        assert pred["hit_rate"] == pytest.approx(engine_decode["hits"] / lookups)
        assert pred["misses_per_token"] == pytest.approx(engine_decode["misses"] / engine_decode["tokens"])
        checked += 1
        admitted += sum(engine["demand_loads"])
    assert len(seen) == 3 + 4 + 2 + 2 + 3  # every value of every axis was checked
    assert admitted > 0
