"""Shared exactness check: the graph engine against the un-offloaded model (CPU and GPU tests)."""

from __future__ import annotations

import numpy as np
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.core import policy_names
from expertflow.engine import attach
from expertflow.runtime.generate import greedy_generate
from expertflow.runtime.loading import build_model

ARCHS = ["tiny-qwen2-moe", "tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2"]


def reference(spec, device, dtype, batch=2, prompt=10, new=8, seed=0):
    model = build_model(spec, device=device, dtype=dtype, seed=seed)
    ids = torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    ref = greedy_generate(model, ids, new, keep_logits=True)
    return model, ids, ref


def configs(spec, device, dtype, policies=None, capacities=None, threshold=1.0):
    """Every policy x capacities {1 slot per layer, half, all}, random priors (warm start)."""
    L, E = spec.num_moe_layers, spec.num_experts
    plan = plan_memory(spec, "1GB", dtype=dtype, max_context_tokens=64)
    priors = np.random.default_rng(1).random((L, E))
    for cap in capacities or (L, L * E // 2, L * E):
        for policy in policies or policy_names():
            yield (cap, policy), default_config(spec, plan, device=device, dtype=dtype, priors=priors).with_values({
                "cache.capacity_experts": cap, "cache.policy": policy, "adaptive_k.threshold": threshold})


def run_engine(model, cfg, ids, new, device, **kw):
    """Two generations on one attached engine (the second starts with a warm cache)."""
    with attach(model, cfg, device=device, **kw) as eng:
        outs = [eng.generate(ids, new, keep_logits=True) for _ in range(2)]
        stats = eng.stats["total"]
        invariant = resident_bytes_equal(eng)
    return outs, stats, invariant


def resident_bytes_equal(eng) -> bool:
    """Every expert the host thinks resident sits, byte for byte, in its GPU slot."""
    loc = eng.sched.table()
    for layer, row in enumerate(loc):
        for e, s in enumerate(row):
            if s >= 0 and not (torch.equal(eng.pool.gate_up[s].cpu(), eng.store.gate_up[layer][e])
                               and torch.equal(eng.pool.down[s].cpu(), eng.store.down[layer][e])):
                return False
    # the device tables say what the host says
    return bool((eng.loc_table.cpu().numpy() == loc).all())


def max_logit_diff(outs, ref) -> float:
    r = torch.stack(ref.step_logits).float()
    return max((torch.stack(o.step_logits).float() - r).abs().max().item() for o in outs)


def agreement(out, ref) -> tuple[int, float, float | None]:
    """Free-running greedy runs of batch 1 compared step by step: (steps whose tokens agree
    from the start, max |logit diff| over those steps, the reference's top-1 minus top-2
    logit margin at the first step where the tokens differ, or None when all agree)."""
    P = ref.sequences.shape[1] - len(ref.step_logits)
    same, worst = 0, 0.0
    for i, (a, b) in enumerate(zip(out.step_logits, ref.step_logits)):
        worst = max(worst, (a.float() - b.float()).abs().max().item())
        if out.sequences[0, P + i] != ref.sequences[0, P + i]:
            top = torch.topk(b.float()[0], 2).values
            return same, worst, (top[0] - top[1]).item()
        same += 1
    return same, worst, None
