"""Trace-driven simulator of the built-in scheduler.

Replays a routing trace through the runtime's own decision code (`expertflow.core.Scheduler`:
adaptive-k, eviction, prefetch planning) and charges each decision its cost from the profile:
copies on a copy stream, expert kernels and the non-expert part of each layer on the compute
stream, and the host, which at batch-1 decode is the bottleneck (anchors.md: ~143 ms of CPU for
~7 ms of GPU per transformers decode step), as a third clock.

The timeline per MoE layer visit mirrors `expertflow.runtime.offload` step by step:

    host  : launch the non-expert part (host_pre) -> sync on the router ids (waits for the GPU)
            -> decide -> issue demand loads -> launch experts -> issue prefetches (host_post)
    copy  : FIFO; a load starts when issued, the copy stream is free, and the slot's previous
            reader has finished; it takes copy_ms(bytes_per_expert)
    gpu   : runs the non-expert kernels as they are launched (it finishes with the host's last
            launch unless it has a backlog: prefill, or experts stalled on copies), then per
            wave waits for the wave's loads (stall) and runs the experts

At batch-1 decode the host is the bottleneck (host_layer_ms, measured on the real runtime, is
the wall time per layer with every expert resident) and the profile's layer/kernel tables are
launch-bound, so only `gpu_share_decode` of them is GPU time.

Torch-free. Same trace + same config => the same hit/miss/prefetch counts as the runtime
(tests/tuner/test_sim_runtime_contract.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from expertflow.config import resolved_engine
from expertflow.core import Scheduler, SchedulerParams
from expertflow.core.adaptive_k import decide
from expertflow.core.counters import Counters
from expertflow.core.engine_cache import EngineScheduler
from expertflow.errors import DataError
from expertflow.trace import DECODE, RoutingTrace

from .engine_sim import (
    EngineCosts,
    replay_engine,
    simulate_engine,
    whole_layer_offload_ms,
)
from .numeric import piecewise_linear
from .schedule import decode_schedule, recorded_schedule, schedule_steps  # noqa: F401 - re-exported

METRIC_KEYS = ("decode_tokens_per_s", "prefill_ms", "stall_ms_per_token", "hit_rate",
               "bytes_per_token", "peak_gpu_bytes", "activated_per_token",
               "dropped_mass_per_token", "prefetch_precision", "quality_loss")


@dataclass(frozen=True)
class Costs:
    """Every time the simulator charges, in ms. Build with `Costs.from_profile`."""

    copy_ms: float  # one expert host->device (pinned)
    layer_ms: tuple[tuple[int, float], ...]  # (tokens, GPU ms of one layer's non-expert part)
    kernel_ms: tuple[tuple[int, float], ...]  # (tokens, GPU ms of one expert's FFN)
    host_layer_ms: float  # host time per MoE layer at batch-1 decode, all experts resident
    host_pre_fraction: float = 0.6  # share of host_layer_ms spent before the router sync
    sync_ms: float = 0.02  # one small device->host read
    load_issue_ms: float = 0.02  # host cost of issuing one expert copy (2 copies + event)
    step_overhead_ms: float = 0.0  # per forward step: embeddings, LM head, sampling, generate()
    num_decoder_layers: int = 0  # dense layers add host_layer_ms each (no experts)
    # At decode the profile's layer/kernel tables are launch-bound wall times: the GPU executes
    # only a share of them (the rest is the host launching, already in host_layer_ms).
    # anchors.md: ~7 ms of GPU kernels per ~25-50 ms decode step at batch 1.
    gpu_share_decode: float = 0.25
    decode_tokens_max: int = 8  # steps of at most this many tokens count as decode
    predictor_host_ms: float = 0.09  # per layer with prefetch on: matmul + top-k + concat
    adaptive_host_ms: float = 0.15  # per layer with adaptive-k: weights to host + upload
    # The graph engine's costs (GPU profiles since 2026-12-03): configs whose runtime.engine
    # resolves to graph are simulated on its timeline (tuner.engine_sim); None = not measured.
    engine: EngineCosts | None = None

    @staticmethod
    def _interp(table, x: float) -> float:
        """The profile's rule (tuner.numeric.piecewise_linear) on a (x, y) tuple table."""
        return piecewise_linear([a for a, _ in table], [b for _, b in table], x)

    def _gpu_share(self, step_tokens: int) -> float:
        return self.gpu_share_decode if step_tokens <= self.decode_tokens_max else 1.0

    def layer(self, tokens: int) -> float:
        """GPU time of one layer's non-expert part for a step of `tokens` tokens."""
        return self._interp(self.layer_ms, tokens) * self._gpu_share(tokens)

    def kernel(self, tokens: int, step_tokens: int | None = None) -> float:
        """GPU time of one expert's FFN over `tokens` tokens (in a step of `step_tokens`)."""
        share = self._gpu_share(tokens if step_tokens is None else step_tokens)
        return self._interp(self.kernel_ms, tokens) * share

    @classmethod
    def from_profile(cls, profile, bytes_per_expert: int, num_decoder_layers: int = 0) -> Costs:
        lt = profile.tables["layer"].sort_values("tokens")
        kt = profile.tables["kernel"].sort_values("tokens")
        layer = tuple(zip(lt["tokens"].astype(int), lt["median_ms"].astype(float)))
        kernel = tuple(zip(kt["tokens"].astype(int), kt["median_ms"].astype(float)))
        host = profile.runtime_value("decode_layer_ms", default=max(layer[0][1], 0.05))
        copy_ms = profile.copy_ms(bytes_per_expert)
        return cls(
            copy_ms=copy_ms, engine=EngineCosts.from_profile(profile, copy_ms),
            layer_ms=layer, kernel_ms=kernel, host_layer_ms=host,
            host_pre_fraction=profile.runtime_value("host_pre_fraction", default=0.6),
            sync_ms=profile.runtime_value("sync_ms", default=0.02),
            load_issue_ms=profile.runtime_value("load_issue_ms", default=0.02),
            step_overhead_ms=profile.runtime_value("step_overhead_ms", default=0.0),
            num_decoder_layers=num_decoder_layers,
            gpu_share_decode=profile.runtime_value("gpu_share_decode", default=0.25),
            predictor_host_ms=profile.runtime_value("predictor_host_ms", default=0.09),
            adaptive_host_ms=profile.runtime_value("adaptive_host_ms", default=0.15),
        )


@dataclass
class SimResult:
    metrics: dict[str, float]
    counters: Counters  # every step (for the runtime contract)
    decode_counters: dict[str, float] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)


class _EagerClocks:
    """The eager runtime's timeline: the host clock H, the compute stream's G and the copy
    stream's C (ms), and per GPU slot when its last reader finishes and its last load lands."""

    def __init__(self, costs: Costs, nslots: int):
        self.c = costs
        self.H = self.G = self.C = 0.0
        self.slot_free = [0.0] * nslots
        self.slot_ready = [0.0] * nslots
        self.host_pre = costs.host_layer_ms * costs.host_pre_fraction
        self.host_post = costs.host_layer_ms - self.host_pre

    def step_start(self) -> float:
        self.H = max(self.H, self.G)
        return self.H

    def layer_start(self, layer_gpu: float, extra_host: float) -> None:
        """The host launches the layer's kernels; the router ids reach it (the layer's sync)."""
        self.H += self.host_pre + extra_host
        # The GPU runs the kernels as they are launched over host_pre: it ends at the host's last
        # launch unless it had a backlog (prefill, or a stall) to work off.
        self.G = max(self.G + layer_gpu, self.H)
        self.H = max(self.H, self.G) + self.c.sync_ms

    def copy(self, slot: int) -> None:
        self.H, self.C = _issue_copy(slot, self.H, self.C, self.c.load_issue_ms, self.c.copy_ms,
                                     self.slot_free, self.slot_ready)

    def wave(self, slots: list[int], kernels_ms: float) -> float:
        """The wave's experts run once their slots have landed; returns the stall (ms)."""
        ready = max(self.slot_ready[s] for s in slots)
        begin = max(self.G, self.H)
        stall = ready - begin if ready > begin else 0.0
        self.G = max(ready, begin) + kernels_ms
        for s in slots:
            self.slot_free[s] = self.G
        return stall

    def step_end(self, dense_layers: int, layer_gpu: float) -> None:
        """The dense (non-MoE) layers and the step's overhead; the next token needs the logits."""
        self.H += dense_layers * self.c.host_layer_ms + self.c.step_overhead_ms
        self.G = max(self.G + dense_layers * layer_gpu, self.H - self.c.step_overhead_ms)
        self.H = max(self.H, self.G)


DECODE_KEYS = ("hits", "misses", "activated", "tokens", "prefetch_issued", "prefetch_used", "dropped_mass")


def simulate(trace: RoutingTrace, costs: Costs, config, *, schedule: str = "decode",
             prompt_tokens: int = 16, max_decode_tokens: int | None = None,
             quality_table: dict[float, float] | None = None) -> SimResult:
    """Replay `trace` under `config` (a RuntimeConfig) and predict its metrics.

    schedule: "decode" (re-batched as prefill + one-token decode steps, batch =
    config.memory.max_batch) or "recorded" (the trace's own steps, as the runtime ran them).
    """
    if trace.num_layers != config.model.num_moe_layers or trace.num_experts != config.model.num_experts:
        raise DataError(f"trace has {trace.num_layers} layers x {trace.num_experts} experts but the config "
                        f"is for {config.model.num_moe_layers} x {config.model.num_experts}; profile this model")
    if costs.engine is not None and resolved_engine(config) == "graph":
        return _simulate_on_engine(trace, costs, config, schedule, prompt_tokens, max_decode_tokens,
                                   quality_table)
    params = SchedulerParams.from_config(config)
    sched = Scheduler(params)
    depth = min(params.prefetch_depth, trace.lookahead)
    steps = schedule_steps(trace, config, schedule, prompt_tokens, max_decode_tokens)
    L, E = trace.num_layers, trace.num_experts
    clocks = _EagerClocks(costs, sched.num_slots)
    dense_layers = max(0, costs.num_decoder_layers - L)
    sched.warm_start_loads()  # before the first token (attach time): costs no step time
    kernel_decode, kernel_ms, extra_host = _kernel_costs(costs, params, steps)
    tally = {"decode_ms": 0.0, "prefill_ms": 0.0, "decode_tokens": 0, "prefill_steps": 0, "stall_ms": 0.0,
             "loads": 0, **dict.fromkeys(DECODE_KEYS, 0.0)}
    counters = sched.counters
    ids_all, w_all, pred_all = trace.ids, trace.weights, trace.pred
    adaptive = params.threshold < 1.0
    if adaptive:  # adaptive-k depends on the weights only: decide every replayed row at once
        ak_keep, ak_w, ak_dropped = _adaptive_rows(params, w_all, steps)
    offset = 0
    for tok, kind in steps:
        T = len(tok)
        t_start = clocks.step_start()
        layer_gpu = costs.layer(T)
        ids_step, w_step = ids_all[tok], w_all[tok]  # [T, L, k]
        pred_step = pred_all[tok, :, :depth].transpose(1, 2, 0, 3) if depth else None  # [L, D, T, k]
        before = counters.sums() if kind == DECODE else None
        step_stall = 0.0
        step_loads = 0
        for m in range(L):
            clocks.layer_start(layer_gpu, extra_host)
            ids_m = ids_step[:, m]
            decided = None
            if adaptive:
                rs = slice(offset, offset + T)
                decided = (ak_keep[rs, m], ak_w[rs, m], float(ak_dropped[rs, m].sum()))
            plan = sched.visit(m, ids_m, w_step[:, m], pred_step[m] if pred_step is not None else None, decided)
            counts = None if T == 1 else np.bincount(ids_m[plan.route.keep], minlength=E)
            for wave in plan.route.waves:
                for ld in wave.loads:
                    clocks.copy(ld.slot)
                step_loads += len(wave.loads)
                run_ms = (kernel_decode * len(wave.experts) if counts is None
                          else sum(kernel_ms[counts[e]] for e in wave.experts))
                stall = clocks.wave(wave.slots, run_ms)
                step_stall += stall
                counters.stall_ms[m] += stall
            clocks.H += clocks.host_post
            for ld in plan.prefetches:
                clocks.copy(ld.slot)
            step_loads += len(plan.prefetches)
        offset += T
        clocks.step_end(dense_layers, layer_gpu)
        elapsed = clocks.H - t_start
        if kind == DECODE:
            tally["decode_ms"] += elapsed
            tally["decode_tokens"] += T
            tally["stall_ms"] += step_stall
            tally["loads"] += step_loads
            after = counters.sums()
            for key in DECODE_KEYS:
                tally[key] += after[key] - before[key]
        else:
            tally["prefill_ms"] += elapsed
            tally["prefill_steps"] += 1
    metrics = _eager_metrics(tally, counters.totals(), config, sched.num_slots, quality_table)
    return SimResult(metrics=metrics, counters=sched.counters,
                     timeline={"decode_ms": tally["decode_ms"], "prefill_ms": tally["prefill_ms"],
                               "decode_tokens": float(tally["decode_tokens"])})


def _kernel_costs(costs: Costs, params: SchedulerParams, steps) -> tuple[float, list[float], float]:
    """(one expert at one token in a decode step, one expert at n tokens [n], the host's extra
    per-layer time for the predictor and adaptive-k) (ms)."""
    max_t = max((len(t) for t, _ in steps), default=1)
    extra = ((costs.predictor_host_ms if params.prefetch_depth > 0 else 0.0)
             + (costs.adaptive_host_ms if params.threshold < 1.0 else 0.0))
    return costs.kernel(1, 1), [costs.kernel(n, max_t) for n in range(max_t + 1)], extra


def _adaptive_rows(params: SchedulerParams, weights: np.ndarray, steps):
    """adaptive-k's (keep, weights, dropped mass) for every replayed row, in replay order."""
    rows = np.concatenate([t for t, _ in steps]) if steps else np.zeros(0, dtype=np.int64)
    return decide(weights[rows], params.threshold, params.min_k, params.renormalize)


def _eager_metrics(t: dict, totals: dict, config, nslots: int, quality_table) -> dict[str, float]:
    """The predicted metrics from the decode steps' tally (`totals`: every step's counters)."""
    n = t["decode_tokens"]
    lookups = t["hits"] + t["misses"]
    mem = config.memory
    peak = mem.non_expert_bytes + mem.kv_cache_bytes + mem.workspace_bytes + nslots * mem.bytes_per_expert
    dropped = t["dropped_mass"] / t["tokens"] if t["tokens"] else totals["dropped_mass_per_token"]
    metrics = {
        "decode_tokens_per_s": n / (t["decode_ms"] / 1000.0) if t["decode_ms"] > 0 else 0.0,
        "prefill_ms": t["prefill_ms"] / t["prefill_steps"] if t["prefill_steps"] else 0.0,
        "stall_ms_per_token": t["stall_ms"] / n if n else 0.0,
        "hit_rate": t["hits"] / lookups if lookups else totals["hit_rate"],
        "bytes_per_token": t["loads"] * mem.bytes_per_expert / n if n else 0.0,
        "peak_gpu_bytes": float(peak),
        "activated_per_token": t["activated"] / n if n else 0.0,
        "dropped_mass_per_token": dropped,
        "prefetch_precision": t["prefetch_used"] / t["prefetch_issued"] if t["prefetch_issued"] else 0.0,
    }
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["quality_loss"] = quality_loss(config.adaptive_k.threshold, dropped, quality_table)
    return metrics


def _simulate_on_engine(trace, costs, config, schedule, prompt_tokens, max_decode_tokens,
                        quality_table) -> SimResult:
    """simulate() for a config that runs on the graph engine (tuner.engine_sim's timeline)."""
    mem = config.memory
    r = simulate_engine(trace, costs.engine, config, schedule_steps(trace, config, schedule, prompt_tokens,
                                                                     max_decode_tokens), mem.bytes_per_expert)
    sched = r.pop("sched")
    peak = mem.non_expert_bytes + mem.kv_cache_bytes + mem.workspace_bytes + sched.num_slots * mem.bytes_per_expert
    metrics = {k: float(r[k]) for k in ("decode_tokens_per_s", "prefill_ms", "stall_ms_per_token", "hit_rate",
                                        "bytes_per_token", "activated_per_token", "dropped_mass_per_token",
                                        "misses_per_token", "admitted_per_token")}
    metrics.update(peak_gpu_bytes=float(peak), prefetch_precision=0.0)
    metrics["quality_loss"] = quality_loss(config.adaptive_k.threshold, metrics["dropped_mass_per_token"],
                                           quality_table)
    return SimResult(metrics=metrics, counters=sched.counters, decode_counters=dict(sched.decode),
                     timeline={"decode_ms": r["decode_ms"], "decode_tokens": r["decode_tokens"],
                               "engine": 1.0})


def _issue_copy(slot: int, H: float, C: float, issue_ms: float, copy_ms: float, slot_free: list,
                slot_ready: list) -> tuple[float, float]:
    """The host issues one expert copy (issue_ms); the copy stream starts it when it is free and
    the slot's last reader is done, and it lands copy_ms later. Returns (host, copy) clocks."""
    H += issue_ms
    C = max(C, H, slot_free[slot]) + copy_ms
    slot_ready[slot] = C
    return H, C


def engine_decisions(trace: RoutingTrace, config, *, schedule: str = "decode", prompt_tokens: int = 16,
                     max_decode_tokens: int | None = None) -> EngineScheduler:
    """Replay `trace` through the graph engine's own one-step-behind decisions
    (expertflow.core.engine_cache.EngineScheduler) under `config`; the scheduler holds the
    counters (hits, misses, read-through admissions, evictions) and its decode-only totals."""
    return replay_engine(trace, config, schedule_steps(trace, config, schedule, prompt_tokens, max_decode_tokens))


def quality_loss(threshold: float, dropped_mass: float, table: dict[float, float] | None) -> float:
    """Quality cost of adaptive-k: the measured relative perplexity increase interpolated at
    `threshold` when a table from real weights exists, else the mean dropped gate mass."""
    if threshold >= 1.0:
        return 0.0
    if not table:
        return float(dropped_mass)
    xs = np.array(sorted(table), dtype=np.float64)
    ys = np.array([table[x] for x in sorted(table)], dtype=np.float64)
    return float(max(0.0, np.interp(threshold, xs, ys)))


def whole_layer_offload(trace: RoutingTrace, costs: Costs, num_experts: int, bytes_per_expert: int,
                        prompt_tokens: int = 16, max_decode_tokens: int | None = None) -> dict[str, float]:
    """Reference point: no expert cache; every layer's experts are copied in for every token
    (what accelerate's offload does), overlapping the copy of layer l+1 with compute of l."""
    steps = decode_schedule(trace, prompt_tokens, 1, max_decode_tokens)
    L = trace.num_layers
    if costs.engine is not None:  # on the graph engine: the resident step plus every copy
        ms = whole_layer_offload_ms(costs.engine, L, num_experts)
        return {"decode_tokens_per_s": 1000.0 / ms, "hit_rate": 0.0,
                "stall_ms_per_token": L * num_experts * costs.copy_ms,
                "bytes_per_token": float(L * num_experts * bytes_per_expert)}
    layer_copy = num_experts * costs.copy_ms
    decode_time = 0.0
    n = 0
    for tok, kind in steps:
        if kind != DECODE:
            continue
        T = len(tok)
        per_layer = max(costs.host_layer_ms, costs.layer(T) + layer_copy)
        decode_time += L * per_layer + costs.step_overhead_ms
        n += T
    tps = n / (decode_time / 1000.0) if decode_time else 0.0
    return {"decode_tokens_per_s": tps, "hit_rate": 0.0,
            "stall_ms_per_token": max(0.0, L * (layer_copy - costs.host_layer_ms)),
            "bytes_per_token": float(L * num_experts * bytes_per_expert)}


def predicted_floor_tokens_per_s(costs: Costs, num_layers: int) -> float:
    """Upper bound with every expert resident (host-bound decode)."""
    per_token = num_layers * max(costs.host_layer_ms + costs.sync_ms, costs.layer(1)) + costs.step_overhead_ms
    return 1000.0 / per_token if per_token > 0 else math.inf
