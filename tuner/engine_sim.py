"""The graph engine's timeline: a trace replayed through the engine's own decisions, charged its costs.

The engine (expertflow.engine) replays one captured CUDA graph per decode step. Every routed
expert is read through the device address table: from its GPU slot (a hit) or zero-copy from
pinned host memory (a miss); the r-th miss of a layer is also written into a staging slot
(read-through admission, no second transfer). The host decides step n one step behind, beside
the GPU. So a decode step of T tokens costs

    gpu  = overhead(T) + L x layer(T)                    every expert resident (measured)
         + sum over layers [c m + b (h + m - n_full)]    its misses and dropped experts
         + L x adaptive                                  adaptive-k's rule, when the config has it
    step = max(gpu, host)                                host: L x host_layer_ms

where h / m are the layer's distinct hits / misses in the step (after adaptive-k), n_full the
distinct experts of its full top-k routing (the measured all-resident step ran those), and b / c
the marginal cost of one expert read from a slot / zero-copy over PCIe: the slopes of a
least-squares plane a + b h + c m + d (T - 1) through the profile's `engine` table (the kernel
measured with h experts in slots and m zero-copy). Slopes, not differences of two table points:
each point carries the micro-benchmark's own fixed cost (cold L2, launch), which the captured
step does not pay per layer (H200, qwen2-moe: 0.155 ms for 1 to 4 resident experts, while every
extra miss adds 0.35 ms, 49 GB/s).
Prefill runs eagerly, chunked, misses copied per expert: overhead + L x P x per-token + copies.

Counts come from `expertflow.core.engine_cache.EngineScheduler`, the class the engine itself
uses (tests/tuner/test_sim_engine_contract.py): the same trace and config give the same hits,
misses and admissions here and on the GPU. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertflow.core import SchedulerParams
from expertflow.core.adaptive_k import decide
from expertflow.core.engine_cache import EngineScheduler
from expertflow.trace import DECODE, RoutingTrace


@dataclass(frozen=True)
class EngineCosts:
    """The graph engine's measured costs (tuner.profiler.engine_timing), in ms."""

    layer_ms: tuple[tuple[int, float], ...]  # (batch, per MoE layer, every expert resident)
    overhead_ms: tuple[tuple[int, float], ...]  # (batch, rest of the step)
    kernel: tuple[tuple[int, int, int, float], ...]  # (tokens, hits, misses, ms) of one layer
    host_layer_ms: float  # host decision per MoE layer and step
    prefill_layer_ms_per_token: float
    prefill_overhead_ms: float = 0.0
    copy_ms: float = 0.0  # one expert copied host -> device (prefill misses)
    adaptive_layer_ms: float = 0.0  # adaptive-k's rule on the device, per MoE layer and step

    @classmethod
    def from_profile(cls, profile, copy_ms: float) -> EngineCosts | None:
        """The engine's costs from a profile, or None when it was not measured (CPU profiles)."""
        table = profile.tables.get("engine")
        if table is None or len(table) == 0:
            return None
        rt = profile.tables["runtime"]
        values = dict(zip(rt["name"], rt["value"].astype(float)))
        batches = sorted(int(k.rsplit("_b", 1)[1]) for k in values if k.startswith("engine_layer_ms_b"))
        if not batches:
            return None
        kern = tuple((int(r.tokens), int(r.hits), int(r.misses), float(r.median_ms))
                     for r in table.itertuples(index=False))
        return cls(layer_ms=tuple((b, values[f"engine_layer_ms_b{b}"]) for b in batches),
                   overhead_ms=tuple((b, values.get(f"engine_step_overhead_ms_b{b}", 0.0)) for b in batches),
                   kernel=kern, host_layer_ms=values.get("engine_host_layer_ms", 0.0),
                   prefill_layer_ms_per_token=values.get("engine_prefill_layer_ms_per_token", 0.0),
                   prefill_overhead_ms=values.get("engine_prefill_overhead_ms", 0.0), copy_ms=copy_ms,
                   adaptive_layer_ms=values.get("engine_adaptive_layer_ms", 0.0))


class EngineTimeline:
    """Step times from EngineCosts; `decode(T, hits, misses, full)` per-layer arrays -> ms."""

    def __init__(self, costs: EngineCosts, num_layers: int):
        self.c, self.L = costs, num_layers
        self._grid = {(t, h, m): ms for t, h, m, ms in costs.kernel}
        rows = np.array([(1.0, h, m, t - 1) for t, h, m, _ in costs.kernel], dtype=np.float64)
        ys = np.array([ms for *_, ms in costs.kernel], dtype=np.float64)
        self.plane = np.linalg.lstsq(rows, ys, rcond=None)[0]  # a, b (per hit), c (per miss), d (per token)

    @staticmethod
    def _by_batch(table, T: int) -> float:
        xs = np.array([b for b, _ in table], dtype=np.float64)
        ys = np.array([v for _, v in table], dtype=np.float64)
        return float(np.interp(T, xs, ys))  # flat past the largest bucket measured

    def kernel(self, T: int, h: int, m: int) -> float:
        hit = self._grid.get((T, h, m))
        if hit is not None:
            return hit
        a, b, c, d = self.plane
        return float(a + b * h + c * m + d * (T - 1))

    def resident_ms(self, T: int) -> float:
        return self._by_batch(self.c.overhead_ms, T) + self.L * self._by_batch(self.c.layer_ms, T)

    def decode(self, T: int, hits, misses, full, adaptive: bool = False) -> tuple[float, float]:
        """(step ms, of which the layers' misses and dropped experts) for one decode step;
        `adaptive`: adaptive-k's rule runs in the step (its measured cost per layer)."""
        _, b, c, _ = self.plane
        extra = 0.0
        for h, m, n in zip(hits, misses, full):
            extra += c * m + b * (h - n)  # m reads over PCIe, h + m of the step's n from slots
        gpu = self.resident_ms(T) + extra + (self.L * self.c.adaptive_layer_ms if adaptive else 0.0)
        return max(gpu, self.L * self.c.host_layer_ms), extra

    def prefill(self, P: int, copies: int) -> float:
        c = self.c
        return c.prefill_overhead_ms + self.L * P * c.prefill_layer_ms_per_token + copies * c.copy_ms


def replay_engine(trace: RoutingTrace, config, steps, on_step=None) -> EngineScheduler:
    """Replay `steps` ([(trace rows, kind)]) through the engine's one-step-behind decisions under
    `config`; `on_step(kind, T, hits[L], misses[L], full[L], delta)` sees each step's per-layer
    distinct counts and the change of the counters' sums (activated, dropped_mass, ...). Adaptive-k is decided per row by the core's rule, dropped experts marked -1, as the
    engine's device code does."""
    params = SchedulerParams.from_config(config)
    sched = EngineScheduler(params, config.cache.read_through_slots)
    sched.warm_start_loads()
    c = sched.counters
    for tok, kind in steps:
        ids = trace.ids[tok].transpose(1, 0, 2)  # [L, T, k]
        w = trace.weights[tok].transpose(1, 0, 2)
        full = [len(np.unique(ids[m])) for m in range(ids.shape[0])]
        if params.threshold < 1.0:
            keep, _, _ = decide(w, params.threshold, params.min_k, params.renormalize)
            ids = np.where(keep, ids, -1)
        hits0, miss0, sums0 = list(c.hits), list(c.misses), c.sums()
        sched.decide(ids, w, kind)
        if on_step is not None:
            hits = [a - b for a, b in zip(c.hits, hits0)]
            misses = [a - b for a, b in zip(c.misses, miss0)]
            delta = {k: v - sums0[k] for k, v in c.sums().items()}
            on_step(kind, len(tok), hits, misses, full, delta)
    return sched


def simulate_engine(trace: RoutingTrace, costs: EngineCosts, config, steps, bytes_per_expert: int) -> dict:
    """Metrics of `config` on the graph engine over `steps` (tuner.simulator's schedules)."""
    tl = EngineTimeline(costs, trace.num_layers)
    adaptive = config.adaptive_k.threshold < 1.0
    acc = {"decode_ms": 0.0, "decode_tokens": 0, "stall_ms": 0.0, "misses": 0, "hits": 0,
           "prefill_ms": 0.0, "prefills": 0, "activated": 0.0, "dropped_mass": 0.0}

    def on_step(kind, T, hits, misses, full, delta):
        if kind == DECODE:
            ms, extra = tl.decode(T, hits, misses, full, adaptive)
            acc["decode_ms"] += ms
            acc["stall_ms"] += max(extra, 0.0)
            acc["decode_tokens"] += T
            acc["hits"] += sum(hits)
            acc["misses"] += sum(misses)
            acc["activated"] += delta["activated"]
            acc["dropped_mass"] += delta["dropped_mass"]
        else:
            acc["prefill_ms"] += tl.prefill(T, sum(misses))
            acc["prefills"] += 1

    sched = replay_engine(trace, config, steps, on_step)
    n = acc["decode_tokens"]
    lookups = acc["hits"] + acc["misses"]
    d = sched.decode
    return {
        "sched": sched,
        "decode_tokens_per_s": n / (acc["decode_ms"] / 1000.0) if acc["decode_ms"] > 0 else 0.0,
        "prefill_ms": acc["prefill_ms"] / acc["prefills"] if acc["prefills"] else 0.0,
        "stall_ms_per_token": acc["stall_ms"] / n if n else 0.0,
        "hit_rate": acc["hits"] / lookups if lookups else 1.0,
        "bytes_per_token": acc["misses"] * bytes_per_expert / n if n else 0.0,
        "misses_per_token": acc["misses"] / n if n else 0.0,
        "admitted_per_token": d["admitted"] / n if n else 0.0,
        "activated_per_token": acc["activated"] / n if n else 0.0,
        # the mean dropped share of a token's top-k gate mass per MoE layer, as the counters, the
        # eager timeline and quality.dropped_mass_table define it (the quality cap's unit)
        "dropped_mass_per_token": acc["dropped_mass"] / (n * trace.num_layers) if n else 0.0,
        "decode_ms": acc["decode_ms"], "decode_tokens": float(n),
    }


def whole_layer_offload_ms(costs: EngineCosts, num_layers: int, num_experts: int) -> float:
    """Decode ms per token of whole-layer offload (what accelerate does: no expert cache, each
    layer's experts copied in every token, compute otherwise as resident) at batch 1."""
    return EngineTimeline(costs, num_layers).resident_ms(1) + num_layers * num_experts * costs.copy_ms
