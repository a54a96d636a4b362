"""The graph engine's costs on this device, for the simulator's engine timeline.

What `measure_engine` measures (random weights at the model's real dims; `tuner.simulator`'s
`EngineCosts` reads the results back from the profile):

* the captured decode step with every expert resident, at two reduced MoE depths and each batch
  bucket: its time per MoE layer (`engine_layer_ms_b<B>`) and the rest of the step
  (`engine_step_overhead_ms_b<B>`: embeddings, final norm, LM head, argmax, ring copies);
* the experts kernel of one layer with `hits` experts read from GPU slots and `misses` read
  zero-copy from pinned host memory, read-through staging writes on (the `engine` table:
  tokens, hits, misses, median_ms), at one token for every hits + misses <= top_k, and at the
  batch buckets' token counts along hits = 0 and misses = 0: a miss's cost is
  kernel(h, m) - kernel(h + m, 0), and several misses of a layer share the PCIe link;
* the host's decision time per MoE layer and step (`engine_host_layer_ms`: the one-step-behind
  EngineScheduler on random routing at the model's L, E, k), which runs beside the GPU and only
  matters when it is longer than a step;
* an eager prefill chunk with every expert resident (`engine_prefill_layer_ms_per_token`);
* adaptive-k's own kernels in the step, per MoE layer (`engine_adaptive_layer_ms`: the step at
  threshold 0.9 against 1.0).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.core import SchedulerParams
from expertflow.core.engine_cache import EngineScheduler
from expertflow.registry import DTYPE_BYTES, ModelSpec

from ..progress import NULL, Reporter
from .reduced import build_random, free_memory, reduced_spec, timing_depths

BATCHES = (1, 2, 4, 8)
BATCHES_QUICK = (1,)
PROMPT_TOKENS = 16
PREFILL_TOKENS = 64


def _resident_config(spec: ModelSpec, dev: torch.device, dtype: str, max_batch: int):
    plan = plan_memory(spec, 2 ** 50, dtype=dtype, max_context_tokens=512, max_batch=max_batch)
    priors = [[1.0 / spec.num_experts] * spec.num_experts for _ in range(spec.num_moe_layers)]
    return default_config(spec, plan, priors=priors, device=str(dev), dtype=dtype).with_values(
        {"cache.capacity_experts": spec.num_moe_layers * spec.num_experts, "cache.read_through_slots": 0,
         "runtime.engine": "graph"})


def measure_steps(spec: ModelSpec, dev: torch.device, dtype: str, *, depth: int, batches, new_tokens: int,
                  reps: int, seed: int) -> dict[int, float]:
    """Median decode ms per step of the engine, all experts resident, per batch size."""
    from expertflow.engine import attach  # noqa: PLC0415 - torch, only when it runs

    rs = reduced_spec(spec, depth)
    model = build_random(rs, dev, dtype, seed)
    out = {}
    eng = attach(model, _resident_config(rs, dev, dtype, max(batches)), device=str(dev))
    try:
        g = torch.Generator().manual_seed(seed)
        for B in batches:
            ids = torch.randint(0, spec.vocab_size, (B, PROMPT_TOKENS), generator=g)
            eng.capture(B, PROMPT_TOKENS + new_tokens + 1)
            eng.generate(ids, 3)  # warm
            times = [eng.generate(ids, new_tokens).decode_s / (new_tokens - 1) * 1e3 for _ in range(reps)]
            out[B] = float(np.median(times))
        pre = torch.randint(0, spec.vocab_size, (1, PREFILL_TOKENS), generator=g)
        eng.generate(pre, 2)
        prefill = [eng.generate(pre, 2, prefill_chunk=PREFILL_TOKENS).prefill_s * 1e3 for _ in range(reps)]
        out["prefill"] = float(np.median(prefill))
        eng.detach()
        # adaptive-k on the device (its top-k prefix rule runs in the step): batch 1, threshold 0.9
        eng = attach(model, _resident_config(rs, dev, dtype, 1).with_values({"adaptive_k.threshold": 0.9}),
                     device=str(dev))
        ids = torch.randint(0, spec.vocab_size, (1, PROMPT_TOKENS), generator=g)
        eng.capture(1, PROMPT_TOKENS + new_tokens + 1)
        eng.generate(ids, 3)
        out["adaptive"] = float(np.median([eng.generate(ids, new_tokens).decode_s / (new_tokens - 1) * 1e3
                                           for _ in range(reps)]))
    finally:
        eng.detach()
        del eng, model
        free_memory(dev)
    return out


def measure_kernel_grid(spec: ModelSpec, dev: torch.device, dtype: str, *, batches, reps: int,
                        seed: int) -> pd.DataFrame:
    """The experts kernel over one layer: `hits` experts in GPU slots, `misses` zero-copy from
    pinned host memory (the first miss also written to a staging slot), per token count."""
    from expertflow.engine import kernels  # noqa: PLC0415 - torch, only when it runs

    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    H, I, k = spec.hidden_size, spec.expert_intermediate_size, spec.top_k
    T_max = max(batches)
    n = min(spec.num_experts, k * T_max)
    g = torch.Generator().manual_seed(seed)
    host_gu = (torch.randn((n, 2 * I, H), generator=g) * 0.02).to(tdt)
    host_dn = (torch.randn((n, H, I), generator=g) * 0.02).to(tdt)
    cuda = dev.type == "cuda"
    if cuda:
        host_gu, host_dn = host_gu.pin_memory(), host_dn.pin_memory()
    pool_gu = torch.empty((n + 1, 2 * I, H), dtype=tdt, device=dev)
    pool_dn = torch.empty((n + 1, H, I), dtype=tdt, device=dev)
    pool_gu[:n].copy_(host_gu)
    pool_dn[:n].copy_(host_dn)
    spans = tuple((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (pool_gu, pool_dn))
    esize = DTYPE_BYTES[dtype]
    gub, dnb = 2 * I * H * esize, H * I * esize
    stage_gu = torch.tensor([[pool_gu.data_ptr() + n * gub]], dtype=torch.int64, device=dev)
    stage_dn = torch.tensor([[pool_dn.data_ptr() + n * dnb]], dtype=torch.int64, device=dev)
    points = [(1, h, m) for total in range(k + 1) for h in range(total + 1) for m in [total - h] if total > 0]
    for T in batches:
        if T > 1:
            e = min(n, k * T)
            points += [(T, e, 0), (T, 0, e)]
    rows = []
    for T, h, m in points:
        # experts 0..h-1 from slots, h..h+m-1 from the host; token t routes to a k-subset of them
        where = [pool_gu.data_ptr() + e * gub if e < h else host_gu.data_ptr() + e * gub for e in range(n)]
        where_dn = [pool_dn.data_ptr() + e * dnb if e < h else host_dn.data_ptr() + e * dnb for e in range(n)]
        gu_t = torch.tensor([where], dtype=torch.int64, device=dev)
        dn_t = torch.tensor([where_dn], dtype=torch.int64, device=dev)
        used = list(range(h + m))
        ids = torch.full((T, k), -1, dtype=torch.long)
        for t in range(T):
            for j in range(min(k, len(used))):
                ids[t, j] = used[(t * k + j) % len(used)]
        ids = ids.to(dev)
        x = (torch.randn((T, H), generator=g) * 0.5).to(tdt).to(dev)
        w = torch.rand((T, k), generator=g).to(tdt).to(dev)

        if cuda or kernels.interpreter_on():
            def run(x=x, ids=ids, w=w, gu_t=gu_t, dn_t=dn_t):
                return kernels.experts_through_table(x, ids, w, 0, gu_t, dn_t, stage_gu, stage_dn, spans, I)
        else:  # the engine's CPU path: the torch reference over the same slots / host rows
            pairs = [int(e) for e in ids.view(-1).tolist()]
            gus = [None if e < 0 else (pool_gu[e] if e < h else host_gu[e]) for e in pairs]
            dns = [None if e < 0 else (pool_dn[e] if e < h else host_dn[e]) for e in pairs]

            def run(x=x, ids=ids, w=w, gus=gus, dns=dns):
                return kernels.experts_reference(x, ids, w, gus, dns)

        rows.append({"tokens": T, "hits": h, "misses": m, **_time(run, dev, reps)})
    del pool_gu, pool_dn, host_gu, host_dn
    free_memory(dev)
    return pd.DataFrame(rows)


def _time(fn, dev: torch.device, reps: int) -> dict[str, float]:
    if dev.type == "cuda":
        import triton

        ms = triton.testing.do_bench(fn, warmup=10, rep=max(20, reps * 5), return_mode="all")
        ms = np.asarray(ms, dtype=np.float64)
    else:
        fn()
        ms = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        ms = np.asarray(ms)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90))}


def measure_host_layer_ms(spec: ModelSpec, *, steps: int = 64, seed: int = 0) -> float:
    """The host's one-step-behind decision per MoE layer and decode step (EngineScheduler with
    LRU and read-through at a third of the experts resident, random routing)."""
    L, E, k = spec.num_moe_layers, spec.num_experts, spec.top_k
    params = SchedulerParams(num_layers=L, num_experts=E, top_k=k, capacity=max(L, L * E // 3), policy="lru")
    sched = EngineScheduler(params, 1)
    sched.warm_start_loads()
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, k, replace=False)[None, :] for _ in range(L)]) for _ in range(steps)])
    w = np.full((L, 1, k), 1.0 / k)
    t0 = time.perf_counter()
    for s in range(steps):
        sched.decide(ids[s], w)
    return (time.perf_counter() - t0) * 1e3 / (steps * L)


def measure_engine(spec: ModelSpec, *, device, dtype: str, quick: bool = False, seed: int = 0,
                   progress: Reporter = NULL) -> tuple[dict[str, float], pd.DataFrame]:
    """(runtime values, `engine` kernel table) for `spec` on `device`; see the module docstring."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    batches = BATCHES_QUICK if quick or not cuda else BATCHES
    reps = 3 if quick or not cuda else 5
    new_tokens = 8 if not cuda else (24 if quick else 48)
    small, deep = timing_depths(spec, dtype)
    task = progress.task("graph engine", 3)
    s = measure_steps(spec, dev, dtype, depth=small, batches=batches, new_tokens=new_tokens, reps=reps, seed=seed)
    task.advance()
    d = measure_steps(spec, dev, dtype, depth=deep, batches=batches, new_tokens=new_tokens, reps=reps, seed=seed)
    task.advance()
    values: dict[str, float] = {}
    for B in batches:
        slope = max((d[B] - s[B]) / (deep - small), 1e-6)
        values[f"engine_layer_ms_b{B}"] = slope
        values[f"engine_step_overhead_ms_b{B}"] = max(0.0, s[B] - small * slope)
    values["engine_prefill_layer_ms_per_token"] = max((d["prefill"] - s["prefill"]) / (deep - small), 1e-6) \
        / PREFILL_TOKENS
    values["engine_prefill_overhead_ms"] = max(0.0, s["prefill"] - small * values[
        "engine_prefill_layer_ms_per_token"] * PREFILL_TOKENS)
    values["engine_host_layer_ms"] = measure_host_layer_ms(spec, seed=seed)
    # what adaptive-k adds per MoE layer (the rule's kernels; dropped experts save ~nothing here)
    values["engine_adaptive_layer_ms"] = max(0.0, (d["adaptive"] - s["adaptive"]) / (deep - small)
                                             - values["engine_layer_ms_b1"])
    grid = measure_kernel_grid(spec, dev, dtype, batches=batches, reps=reps, seed=seed)
    task.advance()
    return values, grid
