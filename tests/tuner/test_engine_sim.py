"""The simulator's graph-engine timeline (tuner.engine_sim) on cases small enough to compute by
hand, the choice between the engine's and the eager runtime's timeline, and the profiler's engine
measurements on a tiny model (CPU)."""

import dataclasses

import numpy as np
import pytest

from expertflow.config import RuntimeConfig
from expertflow.trace import DECODE, PREFILL, RoutingTrace
from tuner.engine_sim import EngineCosts, EngineTimeline
from tuner.simulator import Costs, simulate

# one layer: 0.1 ms of the step outside the layer, 0.5 ms of the layer with its experts
# resident; the experts kernel 0.05 ms empty, +0.1 ms per resident expert, +1.0 per miss
KERNEL = ((1, 0, 0, 0.05), (1, 1, 0, 0.15), (1, 0, 1, 1.05), (1, 2, 0, 0.25), (1, 1, 1, 1.15),
          (1, 0, 2, 2.05))
ENGINE = EngineCosts(layer_ms=((1, 0.5),), overhead_ms=((1, 0.1),), kernel=KERNEL, host_layer_ms=0.0,
                     prefill_layer_ms_per_token=0.01, copy_ms=2.0)
EAGER = Costs(copy_ms=2.0, layer_ms=((1, 0.5),), kernel_ms=((1, 0.25),), host_layer_ms=1.0,
              sync_ms=0.0, load_issue_ms=0.0, gpu_share_decode=1.0, predictor_host_ms=0.0, adaptive_host_ms=0.0)
COSTS = dataclasses.replace(EAGER, engine=ENGINE)


def config(capacity, *, top_k=1, priors=None, staging=0, threshold=1.0, engine="auto", device="cuda", layers=1):
    return RuntimeConfig.model_validate({
        "model": {"name": "hand", "architecture": "qwen2_moe", "fingerprint": "dims-0123456789abcdef",
                  "num_moe_layers": layers, "num_experts": 4, "top_k": top_k},
        "cache": {"capacity_experts": capacity, "policy": "lru", "warm_start": priors is not None,
                  "priors": priors, "read_through_slots": staging},
        "adaptive_k": {"threshold": threshold},
        "memory": {"budget_bytes": 10**9, "budget_text": "1GB", "non_expert_bytes": 100,
                   "kv_cache_bytes": 10, "workspace_bytes": 1, "margin_bytes": 0,
                   "expert_cache_bytes": 10**6, "bytes_per_expert": 1000},
        "runtime": {"engine": engine, "device": device},
        "provenance": {"tool_version": "t", "created_at": "now"},
    })


def trace_of(rows, weights=None):
    """rows: per token its experts (one layer); the first token is the prefill."""
    n, k = len(rows), len(rows[0])
    ids = np.array(rows, dtype=np.int64).reshape(n, 1, k)
    w = np.ones((n, 1, k), np.float32) / k if weights is None else np.array(weights, np.float32).reshape(n, 1, k)
    kinds = [PREFILL] + [DECODE] * (n - 1)
    return RoutingTrace(ids=ids, weights=w, pred=np.full((n, 1, 1, k), -1, np.int64),
                        seq=np.zeros(n, np.int32), pos=np.arange(n, dtype=np.int32),
                        steps=np.array([[i, 1, kd] for i, kd in enumerate(kinds)]), meta={"num_experts": 4})


def test_bypass_cache_charges_each_miss_its_zero_copy_read():
    # expert 1 is warm-started into the only slot and, with no read-through slot, never leaves:
    # decode routes 0 (miss), 1, 1 (hits): a miss reads zero-copy (1.05 ms) instead of from a
    # slot (0.15): 0.6 + 0.9, 0.6, 0.6 ms
    tr = trace_of([[1], [0], [1], [1]])
    res = simulate(tr, COSTS, config(1, priors=[[0.1, 0.9, 0.0, 0.0]]), schedule="recorded")
    assert res.timeline["decode_ms"] == pytest.approx(1.5 + 0.6 + 0.6)
    assert res.metrics["hit_rate"] == pytest.approx(2 / 3)
    assert res.metrics["bytes_per_token"] == pytest.approx(1000 / 3)
    assert res.metrics["stall_ms_per_token"] == pytest.approx(0.9 / 3)
    assert res.metrics["peak_gpu_bytes"] == 100 + 10 + 1 + 1000


def test_dropped_experts_are_neither_read_nor_counted():
    # top-2, both experts resident; adaptive-k at 0.8 keeps only the 0.9-weight expert, so the
    # layer reads one expert instead of two: 0.1 ms less per step than the measured full step
    tr = trace_of([[0, 1]] * 4, weights=[[0.9, 0.1]] * 4)
    full = simulate(tr, COSTS, config(4, top_k=2, priors=[[1, 1, 1, 1]]), schedule="recorded")
    cut = simulate(tr, COSTS, config(4, top_k=2, priors=[[1, 1, 1, 1]], threshold=0.8), schedule="recorded")
    assert full.timeline["decode_ms"] == pytest.approx(3 * 0.6)
    assert cut.timeline["decode_ms"] == pytest.approx(3 * 0.5)
    assert cut.metrics["activated_per_token"] == pytest.approx(1.0)
    assert full.metrics["activated_per_token"] == pytest.approx(2.0)


def test_host_longer_than_the_step_bounds_it():
    slow = dataclasses.replace(COSTS, engine=dataclasses.replace(ENGINE, host_layer_ms=5.0))
    tr = trace_of([[1], [1], [1]])
    res = simulate(tr, slow, config(4, priors=[[1, 1, 1, 1]]), schedule="recorded")
    assert res.timeline["decode_ms"] == pytest.approx(2 * 5.0)


def test_eager_configs_keep_the_eager_timeline():
    tr = trace_of([[1], [0], [1], [1]])
    cfg = config(1, priors=[[0.1, 0.9, 0.0, 0.0]], engine="eager")
    assert simulate(tr, COSTS, cfg, schedule="recorded").metrics == simulate(tr, EAGER, cfg, schedule="recorded").metrics
    on_cpu = config(1, priors=[[0.1, 0.9, 0.0, 0.0]], device="cpu")  # auto = eager on CPU
    assert "engine" not in simulate(tr, COSTS, on_cpu, schedule="recorded").timeline
    assert "engine" in simulate(tr, COSTS, config(1, priors=[[0.1, 0.9, 0.0, 0.0]]), schedule="recorded").timeline


def test_kernel_outside_the_table_follows_the_fitted_plane():
    tl = EngineTimeline(ENGINE, 1)
    # the table is exactly 0.05 + 0.1 h + 1.0 m: the fit recovers it off the grid
    assert tl.kernel(1, 3, 2) == pytest.approx(0.05 + 0.3 + 2.0)
    assert tl.kernel(1, 1, 1) == 1.15  # a measured point is used as measured


def test_profile_engine_measurements_reach_the_simulator(tmp_path):
    import pandas as pd

    from expertflow.registry import resolve_model
    from tuner.profiler.engine_timing import measure_engine

    spec = resolve_model("tiny-qwen2-moe")
    values, grid = measure_engine(spec, device="cpu", dtype="float32", quick=True)
    k = spec.top_k
    assert {(h, m) for h, m in zip(grid["hits"], grid["misses"])} == \
        {(h, n - h) for n in range(1, k + 1) for h in range(n + 1)}
    assert (grid["median_ms"] > 0).all()
    assert values["engine_layer_ms_b1"] > 0 and values["engine_prefill_layer_ms_per_token"] > 0

    class Prof:  # the two tables EngineCosts reads
        tables = {"engine": grid, "runtime": pd.DataFrame({"name": list(values), "value": list(values.values())})}

    ec = EngineCosts.from_profile(Prof(), copy_ms=0.5)
    assert ec.layer_ms == ((1, values["engine_layer_ms_b1"]),)
    assert len(ec.kernel) == len(grid)
    Prof.tables = {"runtime": Prof.tables["runtime"]}
    assert EngineCosts.from_profile(Prof(), copy_ms=0.5) is None  # no engine table: a CPU profile


def test_adaptive_k_rule_costs_its_measured_time_per_layer():
    tr = trace_of([[0, 1]] * 4, weights=[[0.9, 0.1]] * 4)
    ruled = dataclasses.replace(COSTS, engine=dataclasses.replace(ENGINE, adaptive_layer_ms=0.25))
    cut = simulate(tr, ruled, config(4, top_k=2, priors=[[1, 1, 1, 1]], threshold=0.8), schedule="recorded")
    full = simulate(tr, ruled, config(4, top_k=2, priors=[[1, 1, 1, 1]]), schedule="recorded")
    assert cut.timeline["decode_ms"] == pytest.approx(3 * (0.5 + 0.25))  # one expert fewer, the rule's cost
    assert full.timeline["decode_ms"] == pytest.approx(3 * 0.6)  # no rule without adaptive-k


def test_dropped_mass_has_one_unit_on_both_timelines():
    """The quality cap (and quality.dropped_mass_table) is the mean dropped share of a token's
    top-k gate mass per MoE layer: both timelines report that, not a sum over the layers."""
    L, n = 3, 6
    ids = np.tile(np.array([[0, 1], [2, 3], [1, 2]], np.int64), (n, 1, 1))  # [n, L, 2]
    w = np.tile(np.array([0.7, 0.3], np.float32), (n, L, 1))  # threshold 0.6 keeps the first
    kinds = [PREFILL] + [DECODE] * (n - 1)
    tr = RoutingTrace(ids=ids, weights=w, pred=np.full((n, L, 1, 2), -1, np.int64), seq=np.zeros(n, np.int32),
                      pos=np.arange(n, dtype=np.int32), steps=np.array([[i, 1, kd] for i, kd in enumerate(kinds)]),
                      meta={"num_experts": 4})
    cfg = config(6, top_k=2, threshold=0.6, layers=L)
    on_engine = simulate(tr, COSTS, cfg, schedule="recorded").metrics
    eager = simulate(tr, COSTS, cfg.with_values({"runtime.device": "cpu"}), schedule="recorded").metrics
    assert on_engine["dropped_mass_per_token"] == pytest.approx(0.3)
    assert eager["dropped_mass_per_token"] == pytest.approx(0.3)
    assert on_engine["quality_loss"] == pytest.approx(0.3) == eager["quality_loss"]
