"""Timing on the target device: host->device transfer, the runtime's expert kernel, the
non-expert part of a decoder layer, and the real offloaded runtime's decode step.

Method. Random weights at the real dims (exact for copy and kernel cost). Every measurement is
warmed up, then repeated; tables keep the median and the 10th/90th percentiles (ms). On CUDA
each repetition starts from an idle device (synchronize), is bracketed by CUDA events on the
current stream, and is read only after the end event has completed; wall-clock figures of the
runtime (decode step, sync) use perf_counter around a synchronized region. On the CPU the same
code runs with perf_counter and the profile is labelled "measured-cpu"; there, where other
work shares the cores, the kernel, layer and decode-step figures are taken in rounds, the token
tables get a monotone fit (raw medians kept in `raw_median_ms`), and `TimingResult.noise` says
whether the timing is quiet enough to rank configs (tuner/profiler/robust.py: the criterion).

Tables (tuner/profile.py names; extra columns are additive):
* transfer: bytes x pinned x concurrency. `concurrency` c = c copies of `bytes` in flight at
  once, each on its own CUDA stream; median_ms = time until all c are done; gbps = c x bytes /
  time (10^9 bytes/s). On the CPU a "copy" is the host memcpy the CPU runtime does (pinning
  needs CUDA, so the pinned and pageable rows are the same measurement).
* kernel: the runtime's own experts kernel call (`OffloadHandle.run_experts`, the kernel that
  `OffloadHandle.kernel_name` names: transformers' batched_mm_experts_forward for <= 64
  token-expert pairs on CUDA, grouped_mm_experts_forward above; the model's default on the
  CPU) over the GPU slot pool, `tokens` tokens all routed to one expert; column `kernel` names it.
* layer: one MoE decoder layer with the routed experts replaced by a zero-cost stub (attention,
  norms, router, shared expert), on [1, tokens, H] hidden states, no KV cache.
* runtime (name, value): decode_layer_ms (wall time per MoE layer of the offloaded runtime
  decoding at batch 1 with every expert resident = the slope between reduced-depth models of
  two depths), step_overhead_ms (the intercept: embeddings, LM head, argmax), predictor_host_ms
  and adaptive_host_ms (extra host time per MoE layer with prefetch on / adaptive-k on), sync_ms (one
  small device->host read), load_issue_ms (host time to issue one expert's copies; CUDA only),
  pinned_1gib_gbps (one 1 GiB pinned copy), decode_step_ms_<n>moe (the raw steps).

Reduced-depth models keep the real dims and drop layers (first_k_dense_replace kept for
DeepSeek; decoder_sparse_step/mlp_only_layers reset so every kept layer is MoE).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.registry import ModelSpec
from tuner.profile import interpolate as _interp

from ..progress import NULL, Reporter
from .engine_timing import measure_engine
from .reduced import build_random, free_memory, reduced_spec, timing_depths
from .robust import LoadMeter, fit_cpu_tables, noise_verdict, slope_spread, summarize

log = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
SIZES_BYTES = (1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB)
SIZES_BYTES_QUICK = (1 * MIB, 16 * MIB)
CONCURRENCY = (1, 2, 4)
CONCURRENCY_QUICK = (1, 2)
KERNEL_TOKENS = tuple(2 ** i for i in range(11))  # 1..1024
KERNEL_TOKENS_QUICK = (1, 4, 16, 64, 256, 1024)
LAYER_TOKENS = tuple(2 ** i for i in range(10))  # 1..512
LAYER_TOKENS_QUICK = (1, 8, 64, 512)
NULL_BACKEND = "expertflow_profile_null"


@dataclasses.dataclass
class TimingResult:
    tables: dict[str, pd.DataFrame]
    kind: str  # measured-gpu | measured-cpu
    note: str
    noise: dict | None = None  # CPU: profiler.robust.noise_verdict (profile.yaml timing.noise)


class _Clock:
    def __init__(self, dev: torch.device):
        self.dev = dev
        self.cuda = dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def times_ms(self, fn: Callable[[], object], *, warmup: int, reps: int) -> np.ndarray:
        """Device time of `fn` per repetition (CUDA events), or wall time on the CPU."""
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(reps):
            if self.cuda:
                self.sync()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return np.asarray(out, dtype=np.float64)

    def wall_ms(self, fn: Callable[[], object], *, warmup: int, reps: int) -> np.ndarray:
        """Host wall time of `fn` with the device drained before and after each repetition."""
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append((time.perf_counter() - t0) * 1e3)
        return np.asarray(out, dtype=np.float64)


def _row(times_ms: np.ndarray | None = None, rounds: list | None = None) -> dict:
    """median_ms, p10_ms, p90_ms, rel_iqr and samples of one measurement (profiler.robust):
    with `rounds` (per-round samples) median_ms is the least-loaded round's median."""
    return summarize(times_ms, rounds)


# ---- transfer --------------------------------------------------------------------------------
def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    t.fill_(1)  # touch every page before timing
    return t


def _copy_fn(dsts, srcs, streams, c: int, dev: torch.device) -> Callable[[], None]:
    if streams is None:  # CPU: the runtime copies one expert after the other
        def run_cpu() -> None:
            for i in range(c):
                dsts[i].copy_(srcs[i])
        return run_cpu

    def run_cuda() -> None:
        cur = torch.cuda.current_stream(dev)
        for i in range(c):
            streams[i].wait_stream(cur)  # start after the start event
            with torch.cuda.stream(streams[i]):
                dsts[i].copy_(srcs[i], non_blocking=True)
        for i in range(c):
            cur.wait_stream(streams[i])  # the end event follows every copy
    return run_cuda


def measure_transfer(dev: torch.device, sizes_bytes, concurrency, *, reps: int,
                     progress: Reporter = NULL) -> pd.DataFrame:
    clock = _Clock(dev)
    sizes = sorted({int(s) for s in sizes_bytes})
    cmax = max(concurrency)
    streams = [torch.cuda.Stream(device=dev) for _ in range(cmax)] if clock.cuda else None
    pin_modes = (True, False) if clock.cuda else (False,)
    task = progress.task("host->device copies", len(sizes) * len(pin_modes) * len(concurrency))
    rows = []
    for nbytes in sizes:
        n_reps = reps if nbytes < 64 * MIB else max(3, reps // 2)
        dsts = [torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(cmax)]
        for pinned in pin_modes:
            srcs = [_host_buffer(nbytes, pinned) for _ in range(cmax)]
            for c in concurrency:
                t = clock.times_ms(_copy_fn(dsts, srcs, streams, c, dev), warmup=2, reps=n_reps)
                r = _row(t)
                gbps = c * nbytes / (r["median_ms"] * 1e6)
                pins = (True, False) if not clock.cuda else (pinned,)
                for pin in pins:
                    rows.append({"bytes": nbytes, "pinned": pin, "concurrency": c, **r, "gbps": gbps})
                task.advance()
            del srcs
        del dsts
    return pd.DataFrame(rows).sort_values(["pinned", "concurrency", "bytes"], ignore_index=True)


def measure_big_copy_gbps(dev: torch.device, nbytes: int = GIB, reps: int = 3) -> float:
    """Bandwidth of one `nbytes` pinned host->device copy (a plain memcpy on the CPU)."""
    clock = _Clock(dev)
    src = _host_buffer(nbytes, pinned=clock.cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def copy() -> None:
        dst.copy_(src, non_blocking=clock.cuda)

    t = clock.times_ms(copy, warmup=1, reps=reps)
    return float(nbytes / (np.median(t) * 1e6))


def _attach(model, spec: ModelSpec, dev: torch.device, dtype: str, **values):
    """The real runtime with every expert resident (warm start from uniform priors); `values`
    override dotted config keys (e.g. prefetch.depth to time the predictor's host cost)."""
    from expertflow.runtime.offload import offload  # noqa: PLC0415 - torch, only when it runs

    plan = plan_memory(spec, 2 ** 50, dtype=dtype, max_context_tokens=512)
    priors = [[1.0 / spec.num_experts] * spec.num_experts for _ in range(spec.num_moe_layers)]
    config = default_config(spec, plan, priors=priors, device=str(dev), dtype=dtype).with_values(
        {"prefetch.depth": 0, "cache.warm_start": True, "runtime.record_trace": False, **values})
    return offload(model, config, device=str(dev), record_trace=False)


# ---- layer, kernel, decode -------------------------------------------------------------------
def _null_experts(self, hidden_states, top_k_index, top_k_weights):
    return torch.zeros_like(hidden_states)


def measure_layer(model, dev: torch.device, tokens, *, reps: int, progress: Reporter = NULL,
                  rounds: int = 1) -> pd.DataFrame:
    from transformers.integrations.moe import ExpertsInterface

    from expertflow.runtime.adapters import find_moe_blocks  # noqa: PLC0415 - torch, only when it runs

    clock = _Clock(dev)
    block = find_moe_blocks(model)[0]
    layer = model.model.layers[block.decoder_index]
    hidden_size = model.config.hidden_size
    dtype = next(p.dtype for p in layer.parameters() if p.is_floating_point())
    prev = model.get_experts_implementation()
    ExpertsInterface.register(NULL_BACKEND, _null_experts)
    model.set_experts_implementation(NULL_BACKEND)
    task = progress.task("decoder layer (non-expert)", len(tokens) * rounds)
    samples: dict[int, list] = {t: [] for t in tokens}
    try:
        with torch.inference_mode():
            for _ in range(rounds):  # rounds over every size: a burst of load spoils few samples of each
                for t in tokens:
                    h = torch.randn(1, t, hidden_size, device=dev, dtype=dtype)
                    pid = torch.arange(t, device=dev)[None]
                    pe = model.model.rotary_emb(h, pid)
                    fn = partial(layer, h, attention_mask=None, position_ids=pid, position_embeddings=pe)
                    samples[t].append(clock.times_ms(fn, warmup=2, reps=reps))
                    task.advance()
    finally:
        model.set_experts_implementation(prev if len(prev) > 1 else prev.get("") or "grouped_mm")
    return pd.DataFrame([{"tokens": t, **_row(rounds=x)} for t, x in samples.items()])


def measure_kernel(handle, dev: torch.device, tokens, *, reps: int, progress: Reporter = NULL,
                   rounds: int = 1) -> pd.DataFrame:
    clock = _Clock(dev)
    H = handle.gate_up_shape[-1]
    task = progress.task("expert kernel", len(tokens) * rounds)
    samples: dict[int, list] = {t: [] for t in tokens}
    with torch.inference_mode():
        for _ in range(rounds):
            for t in tokens:
                h = torch.randn(t, H, device=dev, dtype=handle.dtype)
                w = torch.ones(t, 1, device=dev, dtype=handle.dtype)
                slots = np.zeros((t, 1), dtype=np.int64)  # every token -> slot 0 (layer 0's expert)
                fn = partial(handle.run_experts, 0, h, slots, w)
                samples[t].append(clock.times_ms(fn, warmup=2, reps=reps))
                task.advance()
    # the runtime's own kernel choice for t token-expert pairs
    return pd.DataFrame([{"tokens": t, **_row(rounds=x), "kernel": handle.kernel_name(t)}
                         for t, x in samples.items()])


def measure_decode_step_ms(model, vocab_size: int, dev: torch.device, *, steps: int, seed: int) -> float:
    """Median wall time of one batch-1 decode step: an 8-token prefill, then `steps` greedy steps.

    The same sequence runs twice and only the second pass is timed: every shape (cache length)
    then has been seen once, so first-call costs (cuDNN attention plans, allocator growth) are
    not charged to decoding.
    """
    return float(measure_decode_rounds(model, vocab_size, dev, steps=steps, seed=seed, rounds=1)[0])


def measure_decode_rounds(model, vocab_size: int, dev: torch.device, *, steps: int, seed: int,
                          rounds: int) -> list[float]:
    """The median decode-step time (ms) of each of `rounds` timed passes over the same sequence
    (an 8-token prefill, then `steps` greedy steps), after one untimed pass."""
    import inspect

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, 8), generator=g).to(dev)
    # transformers renamed `past_key_values` to `cache` during 5.x: pass whichever forward takes
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    medians: list[float] = []
    with torch.inference_mode():
        for timed in [False] + [True] * rounds:
            times: list[float] = []
            out = model(input_ids=ids, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                out = model(input_ids=nxt, use_cache=True, **{key: cache})
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                nxt = out.logits[:, -1:].argmax(-1)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append((time.perf_counter() - t0) * 1e3)
            if timed:
                medians.append(float(np.median(times)))
    return medians


def measure_sync_ms(dev: torch.device, reps: int) -> float:
    clock = _Clock(dev)
    x = torch.zeros(16, device=dev)
    return float(np.median(clock.wall_ms(lambda: (x + 1).cpu(), warmup=3, reps=reps)))


def measure_load_issue_ms(handle, dev: torch.device, reps: int) -> float:
    """Host time to issue one expert's two copies and its ready event on a copy stream."""
    stream = torch.cuda.Stream(device=dev)
    src_gu, src_dn = handle.host_gate_up[0][0], handle.host_down[0][0]
    dst_gu, dst_dn = handle.pool_gate_up[0], handle.pool_down[0]
    out = []
    for i in range(reps + 2):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            dst_gu.copy_(src_gu, non_blocking=True)
            dst_dn.copy_(src_dn, non_blocking=True)
            torch.cuda.Event().record(stream)
        t1 = time.perf_counter()
        if i >= 2:
            out.append((t1 - t0) * 1e3)
    torch.cuda.synchronize(dev)
    return float(np.median(out))


# ---- all of it -------------------------------------------------------------------------------
def measure_timing(spec: ModelSpec, *, device, dtype: str, quick: bool = False, seed: int = 0,
                   progress: Reporter = NULL, base_transfer: pd.DataFrame | None = None,
                   pinned_1gib_gbps: float | None = None) -> TimingResult:
    """Transfer, kernel, layer and runtime tables for `spec` on `device` (see module docstring).

    `base_transfer` / `pinned_1gib_gbps`: reuse a size sweep already measured on this device
    (bench/bundle_hardware.py measures it once for all models); only the model's own expert
    size is then measured.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    bpe = spec.bytes_per_expert(dtype)
    reps = (5 if quick else 15) if cuda else (3 if quick else 7)
    rounds = 1 if cuda else (5 if quick else 7)  # CPU: rounds over all sizes (profiler.robust)
    load = LoadMeter()
    conc = CONCURRENCY_QUICK if quick else CONCURRENCY
    if base_transfer is None:
        sizes = list(SIZES_BYTES_QUICK if quick else SIZES_BYTES) + [bpe]
        transfer = measure_transfer(dev, sizes, conc, reps=reps, progress=progress)
    else:
        own = measure_transfer(dev, [bpe], sorted(set(base_transfer["concurrency"])), reps=reps,
                               progress=progress)
        transfer = pd.concat([base_transfer[base_transfer["bytes"] != bpe], own], ignore_index=True) \
            .sort_values(["pinned", "concurrency", "bytes"], ignore_index=True)
    if pinned_1gib_gbps is None:
        pinned_1gib_gbps = measure_big_copy_gbps(dev, GIB, reps=2 if quick else 3)
    runtime: dict[str, float] = {"pinned_1gib_gbps": pinned_1gib_gbps}
    free_memory(dev)

    small, deep = timing_depths(spec, dtype)
    decode_steps = (6 if quick else 24) if cuda else (8 if quick else 16)
    task = progress.task("runtime decode step", 2)
    model = build_random(reduced_spec(spec, small), dev, dtype, seed)
    layer = measure_layer(model, dev, LAYER_TOKENS_QUICK if quick else LAYER_TOKENS, reps=reps,
                          progress=progress, rounds=rounds)
    handle = _attach(model, reduced_spec(spec, small), dev, dtype)
    kernel = measure_kernel(handle, dev, KERNEL_TOKENS_QUICK if quick else KERNEL_TOKENS, reps=reps,
                            progress=progress, rounds=rounds)
    small_r = measure_decode_rounds(model, spec.vocab_size, dev, steps=decode_steps, seed=seed, rounds=rounds)
    step_small = min(small_r)  # the least-loaded round (profiler.robust)
    task.advance()
    runtime["sync_ms"] = measure_sync_ms(dev, reps=20 if quick else 50)
    if cuda:
        runtime["load_issue_ms"] = measure_load_issue_ms(handle, dev, reps=10 if quick else 30)
    handle.detach()
    del handle, model
    free_memory(dev)
    model = build_random(reduced_spec(spec, deep), dev, dtype, seed)
    handle = _attach(model, reduced_spec(spec, deep), dev, dtype)
    deep_r = measure_decode_rounds(model, spec.vocab_size, dev, steps=decode_steps, seed=seed, rounds=rounds)
    step_deep = min(deep_r)
    task.advance()
    handle.detach()
    # Host cost per MoE layer of the predictor (prefetch on, nothing to fetch: every expert is
    # resident) and of adaptive-k (weights to the host, kept weights uploaded), for the simulator.
    extras = {}
    for name, values in (("predictor_host_ms", {"prefetch.depth": 1}),
                         ("adaptive_host_ms", {"adaptive_k.threshold": 0.9})):
        handle = _attach(model, reduced_spec(spec, deep), dev, dtype, **values)
        step = min(measure_decode_rounds(model, spec.vocab_size, dev, steps=decode_steps, seed=seed,
                                         rounds=rounds))
        handle.detach()
        extras[name] = max(0.0, (step - step_deep) / deep)
    del handle, model
    free_memory(dev)

    tables_engine = None
    if cuda:  # the graph engine (runtime.engine auto = graph on CUDA): its own step and kernel
        engine_values, tables_engine = measure_engine(spec, device=dev, dtype=dtype, quick=quick,
                                                      seed=seed, progress=progress)
        runtime.update(engine_values)
    slope = (step_deep - step_small) / (deep - small)
    if slope <= 0:  # noise swamped the difference: fall back to the deeper model's average
        log.warning("decode step did not grow with depth (%.3f ms at %d MoE layers, %.3f ms at %d); "
                    "using the average per layer", step_small, small, step_deep, deep)
        slope = step_deep / deep
    runtime["decode_layer_ms"] = slope
    runtime["step_overhead_ms"] = max(0.0, step_small - small * slope)
    runtime.update(extras)
    runtime[f"decode_step_ms_{small}moe"] = step_small
    runtime[f"decode_step_ms_{deep}moe"] = step_deep
    rt = pd.DataFrame({"name": list(runtime), "value": [float(v) for v in runtime.values()]})
    tables = {"transfer": transfer, "kernel": kernel, "layer": layer, "runtime": rt}
    noise = None
    if not cuda:  # a shared CPU: monotone fit of the token tables, and the noise verdict
        tables = fit_cpu_tables(tables)
        noise = noise_verdict(tables, decode_spread=slope_spread(small_r, deep_r, (small, deep))[1],
                              others_cpu=load.others_share())
    if cuda:
        kind = "measured-gpu"
        note = (f"measured on {torch.cuda.get_device_name(dev)} with random weights at the real dims "
                f"({dtype}); exact for copy and kernel cost")
    else:
        kind = "measured-cpu"
        note = ("measured on this machine's CPU (no GPU used): copies are host memcpy, kernel and "
                "layer times are CPU times; not representative of a GPU. Tune for a GPU with "
                "--hardware h200 or profile on the GPU machine")
    if tables_engine is not None:
        tables["engine"] = tables_engine
    return TimingResult(tables, kind, note, noise)


def timing_summary(tables: dict[str, pd.DataFrame], bytes_per_expert: int) -> dict:
    """Headline timing numbers for profile.yaml `summary` (plain floats)."""
    t = tables["transfer"]
    rt = dict(zip(tables["runtime"]["name"], tables["runtime"]["value"].astype(float)))

    def at(pinned: bool) -> pd.DataFrame:
        return t[(t["pinned"] == pinned) & (t["concurrency"] == 1)]

    pin, page = at(True), at(False)
    out = {
        # sustained pinned bandwidth: the largest size swept, one copy in flight
        "pinned_gbps": float(pin.sort_values("bytes")["gbps"].iloc[-1]),
        "pageable_gbps": float(page.sort_values("bytes")["gbps"].iloc[-1]),
        "expert_copy_ms": _interp(pin, "bytes", float(bytes_per_expert)),
        "expert_pinned_gbps": bytes_per_expert / (_interp(pin, "bytes", float(bytes_per_expert)) * 1e6),
        "expert_pageable_gbps": bytes_per_expert / (_interp(page, "bytes", float(bytes_per_expert)) * 1e6),
        "expert_kernel_ms": _interp(tables["kernel"], "tokens", 1.0),
        "layer_ms": _interp(tables["layer"], "tokens", 1.0),
    }
    for key in ("pinned_1gib_gbps", "decode_layer_ms", "step_overhead_ms", "sync_ms", "load_issue_ms"):
        if key in rt:
            out[key] = rt[key]
    return {k: round(float(v), 6) for k, v in out.items()}
