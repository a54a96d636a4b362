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
    if params.prefetch_depth > trace.lookahead:
        params_depth = trace.lookahead
    else:
        params_depth = params.prefetch_depth
    steps = schedule_steps(trace, config, schedule, prompt_tokens, max_decode_tokens)
    L = trace.num_layers
    nslots = sched.num_slots
    slot_free = [0.0] * nslots  # GPU time the slot's last reader finishes
    slot_ready = [0.0] * nslots  # time its last load lands
    H = G = C = 0.0  # host, compute-stream and copy-stream clocks (ms)
    bpe = config.memory.bytes_per_expert
    copy_ms = costs.copy_ms
    issue_ms = costs.load_issue_ms
    sync_ms = costs.sync_ms
    host_pre = costs.host_layer_ms * costs.host_pre_fraction
    host_post = costs.host_layer_ms - host_pre
    dense_layers = max(0, costs.num_decoder_layers - L)
    sched.warm_start_loads()  # before the first token (attach time): costs no step time
    max_t = max((len(t) for t, _ in steps), default=1)
    kernel_decode = costs.kernel(1, 1)  # one expert, one token, in a decode step
    kernel_ms = [costs.kernel(n, max_t) for n in range(max_t + 1)]  # one expert at n tokens (prefill)
    extra_host = ((costs.predictor_host_ms if params.prefetch_depth > 0 else 0.0)
                  + (costs.adaptive_host_ms if config.adaptive_k.threshold < 1.0 else 0.0))
    decode_time = prefill_time = 0.0
    decode_tokens = prefill_steps = 0
    decode_stall = 0.0
    decode_loads = 0
    keys = ("hits", "misses", "activated", "tokens", "prefetch_issued", "prefetch_used", "dropped_mass")
    dec = dict.fromkeys(keys, 0.0)
    counters = sched.counters
    stall_ms = counters.stall_ms
    ids_all, w_all, pred_all = trace.ids, trace.weights, trace.pred
    E = trace.num_experts
    adaptive = params.threshold < 1.0
    if adaptive:  # adaptive-k depends on the weights only: decide every replayed row at once
        rows = np.concatenate([t for t, _ in steps]) if steps else np.zeros(0, dtype=np.int64)
        ak_keep, ak_w, ak_dropped = decide(w_all[rows], params.threshold, params.min_k, params.renormalize)
    offset = 0
    for tok, kind in steps:
        T = len(tok)
        t_start = max(H, G)
        H = t_start
        layer_gpu = costs.layer(T)
        ids_step, w_step = ids_all[tok], w_all[tok]  # [T, L, k]
        pred_step = pred_all[tok, :, :params_depth].transpose(1, 2, 0, 3) if params_depth else None  # [L, D, T, k]
        before = counters.sums() if kind == DECODE else None
        step_stall = 0.0
        step_loads = 0
        for m in range(L):
            H += host_pre + extra_host
            # The GPU runs the layer's kernels as they are launched over host_pre: it ends at the
            # host's last launch unless it had a backlog (prefill, or a stall) to work off.
            G = max(G + layer_gpu, H)
            H = max(H, G) + sync_ms  # the router ids reach the host
            ids_m = ids_step[:, m]
            decided = None
            if adaptive:
                rs = slice(offset, offset + T)
                decided = (ak_keep[rs, m], ak_w[rs, m], float(ak_dropped[rs, m].sum()))
            plan = sched.visit(m, ids_m, w_step[:, m], pred_step[m] if pred_step is not None else None, decided)
            route = plan.route
            if T == 1:
                counts = None
            else:
                counts = np.bincount(ids_m[route.keep], minlength=E)
            for wave in route.waves:
                for ld in wave.loads:
                    H, C = _issue_copy(ld.slot, H, C, issue_ms, copy_ms, slot_free, slot_ready)
                    step_loads += 1
                ready = max(slot_ready[s] for s in wave.slots)
                begin = max(G, H)
                if ready > begin:
                    step_stall += ready - begin
                    stall_ms[m] += ready - begin
                    begin = ready
                if counts is None:
                    G = begin + kernel_decode * len(wave.experts)
                else:
                    G = begin + sum(kernel_ms[counts[e]] for e in wave.experts)
                for s in wave.slots:
                    slot_free[s] = G
            H += host_post
            for ld in plan.prefetches:
                H, C = _issue_copy(ld.slot, H, C, issue_ms, copy_ms, slot_free, slot_ready)
                step_loads += 1
        offset += T
        H += dense_layers * costs.host_layer_ms + costs.step_overhead_ms
        G = max(G + dense_layers * layer_gpu, H - costs.step_overhead_ms)
        H = max(H, G)  # the next token needs this step's logits
        elapsed = H - t_start
        if kind == DECODE:
            decode_time += elapsed
            decode_tokens += T
            decode_stall += step_stall
            decode_loads += step_loads
            after = counters.sums()
            for key in keys:
                dec[key] += after[key] - before[key]
        else:
            prefill_time += elapsed
            prefill_steps += 1
    c = counters.totals()
    lookups = dec["hits"] + dec["misses"]
    mem = config.memory
    peak = mem.non_expert_bytes + mem.kv_cache_bytes + mem.workspace_bytes + nslots * bpe
    dropped = dec["dropped_mass"] / dec["tokens"] if dec["tokens"] else c["dropped_mass_per_token"]
    metrics = {
        "decode_tokens_per_s": decode_tokens / (decode_time / 1000.0) if decode_time > 0 else 0.0,
        "prefill_ms": prefill_time / prefill_steps if prefill_steps else 0.0,
        "stall_ms_per_token": decode_stall / decode_tokens if decode_tokens else 0.0,
        "hit_rate": dec["hits"] / lookups if lookups else c["hit_rate"],
        "bytes_per_token": decode_loads * bpe / decode_tokens if decode_tokens else 0.0,
        "peak_gpu_bytes": float(peak),
        "activated_per_token": dec["activated"] / decode_tokens if decode_tokens else 0.0,
        "dropped_mass_per_token": dropped,
        "prefetch_precision": dec["prefetch_used"] / dec["prefetch_issued"] if dec["prefetch_issued"] else 0.0,
    }
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["quality_loss"] = quality_loss(config.adaptive_k.threshold, dropped, quality_table)
    return SimResult(metrics=metrics, counters=sched.counters,
                     timeline={"decode_ms": decode_time, "prefill_ms": prefill_time,
                               "decode_tokens": float(decode_tokens)})


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
