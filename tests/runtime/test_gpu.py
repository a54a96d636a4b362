"""GPU checks at the real qwen2-moe dims (run on the device machine: pytest -m gpu).

bf16 exactness against the un-offloaded model, and evidence that expert copies on the copy
stream overlap compute on the compute stream.
"""

import time

import pytest
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.core import policy_names
from expertflow.registry import resolve_model
from expertflow.runtime.generate import greedy_generate
from expertflow.runtime.loading import build_model, experts_to_host
from expertflow.runtime.offload import offload

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def qwen():
    spec = resolve_model("qwen2-moe")
    model = build_model(spec, device="cuda", dtype="bfloat16", seed=0)
    model.set_experts_implementation("batched_mm")
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = greedy_generate(model, ids, 8, keep_logits=True)
    experts_to_host(model)  # attach below without copying 23 GiB for every config
    return spec, model, ids, ref


def test_bf16_exact_at_qwen2_moe_dims(qwen):
    spec, model, ids, ref = qwen
    ref_logits = torch.stack(ref.step_logits)
    L, E = spec.num_moe_layers, spec.num_experts
    plan = plan_memory(spec, "40GB")
    worst = {}
    for cap in (L, L * E // 2, L * E):
        for policy in policy_names():
            for depth in (0, 1, 3):
                priors = torch.rand(L, E, generator=torch.Generator().manual_seed(1)).tolist()
                cfg = default_config(spec, plan, priors=priors).with_values({
                    "cache.capacity_experts": cap, "cache.policy": policy, "prefetch.depth": depth,
                    "runtime.experts_kernel": "batched_mm"})
                with offload(model, cfg) as handle:
                    out = greedy_generate(model, ids, 8, keep_logits=True)
                    misses = handle.stats["total"]["misses"]
                diff = (torch.stack(out.step_logits) - ref_logits).abs().max().item()
                worst[(cap, policy, depth)] = diff
                assert torch.equal(out.sequences, ref.sequences), (cap, policy, depth)
                assert diff == 0.0, f"cap={cap} {policy} depth={depth}: max |diff| {diff}"
                if cap == L:
                    assert misses > 0
    print("max |logit diff| per (capacity, policy, depth):", worst)


def test_copies_overlap_compute(qwen):
    spec, model, ids, ref = qwen
    L, E = spec.num_moe_layers, spec.num_experts
    cfg = default_config(spec, plan_memory(spec, "40GB")).with_values(
        {"cache.capacity_experts": L * E // 2, "cache.warm_start": False, "prefetch.depth": 0})
    with offload(model, cfg) as h:
        from expertflow.core import Load

        loads = [Load(layer=i % L, expert=i // L, slot=i, evicted=None) for i in range(48)]
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

        def compute(n):
            for _ in range(n):
                a @ a

        def timed(fn):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) * 1000

        timed(lambda: h._issue(loads))  # warm-up
        timed(lambda: compute(3))
        copy_ms = timed(lambda: h._issue(loads))
        one = min(timed(lambda: compute(1)) for _ in range(3))
        n = max(1, round(copy_ms / one))  # compute about as long as the copies
        compute_ms = timed(lambda: compute(n))
        both_ms = timed(lambda: (h._issue(loads), compute(n)))
    print(f"48 expert copies {copy_ms:.2f} ms, compute {compute_ms:.2f} ms, both {both_ms:.2f} ms")
    assert both_ms < 0.8 * (copy_ms + compute_ms), "copies did not overlap compute"
