"""Graph engine on a CUDA GPU (device machine: pytest -m gpu tests/engine).

Exactness against the un-offloaded model with the decode step captured as CUDA graphs: fp32 on
every tiny architecture x policy x capacity {1 slot/layer, half, all} (misses read zero-copy from
pinned host memory); bf16 at the real qwen2-moe dims within bf16's own rounding (transformers'
backends agree bit for bit there, see the test); graphs captured again after a batch change; 128 identical greedy tokens on the trained pydocs-moe; the
fused step's kernels bit for bit against torch's own ops.
"""

import pytest
import torch

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.registry import resolve_model
from expertflow.runtime.generate import greedy_generate
from expertflow.runtime.loading import build_model, experts_to_host

from ._exact import ARCHS, agreement, configs, max_logit_diff, reference, run_engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", ARCHS)
def test_fp32_graphs_exact_every_policy_and_capacity(name):
    spec = resolve_model(name)
    model, ids, ref = reference(spec, "cuda", "float32")
    worst = 0.0
    for key, cfg in configs(spec, "cuda", "float32"):
        outs, stats, invariant = run_engine(model, cfg, ids, 8, "cuda")
        d = max_logit_diff(outs, ref)
        worst = max(worst, d)
        assert all(torch.equal(o.sequences, ref.sequences) for o in outs), (name, key)
        assert d < 1e-4, (name, key, d)
        assert invariant, (name, key)
        if key[0] == spec.num_moe_layers:
            assert stats["misses"] > 0, key  # 1 slot per layer: misses are read zero-copy
    print(f"{name}: max |logit diff| {worst:.2e}")


def test_bf16_qwen2_moe_dims_within_bf16_rounding():
    """bf16 rounding differs between any two kernels that reduce in another order. On the H200
    transformers' batched_mm and grouped_mm give bit-identical logits at these dims (measured
    2026-12-03: 0.0), so their difference bounds nothing; the bound is bf16 itself: against the
    same model in fp32, the engine's bf16 logits (over the steps whose tokens agree) may differ by
    no more than twice what transformers' own bf16 forward does, and where its greedy tokens part
    from the fp32 model's, the fp32 top-2 margin must be a near-tie of that size (random weights
    predict with tiny margins)."""
    spec = resolve_model("qwen2-moe")
    ids = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model = build_model(spec, device="cuda", dtype="float32", seed=0)
    ref32 = greedy_generate(model, ids, 8, keep_logits=True)
    del model
    torch.cuda.empty_cache()
    model = build_model(spec, device="cuda", dtype="bfloat16", seed=0)
    refs = {}
    for backend in ("batched_mm", "grouped_mm"):
        model.set_experts_implementation(backend)
        refs[backend] = greedy_generate(model, ids, 8, keep_logits=True)
    _, backends, _ = agreement(refs["grouped_mm"], refs["batched_mm"])
    _, bf16, _ = agreement(refs["batched_mm"], ref32)
    bound = 2 * max(bf16, 1e-3)
    experts_to_host(model)
    L, E = spec.num_moe_layers, spec.num_experts
    plan = plan_memory(spec, "40GB")
    for cap in (L, L * E // 2, L * E):
        cfg = default_config(spec, plan).with_values({"cache.capacity_experts": cap})
        outs, stats, _ = run_engine(model, cfg, ids, 8, "cuda")
        for out in outs:
            same, d, margin = agreement(out, ref32)
            print(f"qwen2-moe bf16 cap {cap}: {same}/8 steps agree with fp32, max |logit diff| {d:.3e} "
                  f"(transformers bf16 vs fp32 {bf16:.3e}; grouped_mm vs batched_mm {backends:.3e}), "
                  f"fp32 margin at divergence {margin}")
            assert d <= bound, (cap, d, bf16)
            assert margin is None or margin <= bound, (cap, margin, bf16)


def test_batch_change_and_recapture():
    """Graphs are dropped when the batch changes (their memory handed back) and captured again
    from a fresh private pool: batch 1, then 2, then 1 again, each equal to the eager reference."""
    spec = resolve_model("tiny-qwen2-moe")
    model = build_model(spec, device="cuda", dtype="float32", seed=0)
    refs = {}
    for B in (1, 2):
        ids = torch.randint(0, spec.vocab_size, (B, 10), generator=torch.Generator().manual_seed(B))
        refs[B] = (ids, greedy_generate(model, ids, 6, keep_logits=True))
    plan = plan_memory(spec, "1GB", dtype="float32", max_context_tokens=64)
    cfg = default_config(spec, plan, device="cuda", dtype="float32")
    from expertflow.engine import attach

    with attach(model, cfg, device="cuda") as eng:
        for B in (1, 2, 1):
            ids, ref = refs[B]
            out = eng.generate(ids, 6)
            assert torch.equal(out.sequences, ref.sequences), B
            assert len(eng.graphs) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pydocs_128_tokens(pydocs, dtype):
    """The trained checkpoint has real logit margins: in fp32 all 128 greedy tokens equal the
    un-offloaded model's; in bf16 they may part only at a near-tie of bf16 rounding size."""
    spec = resolve_model(str(pydocs))
    import json

    from transformers import PreTrainedTokenizerFast

    prompts = [json.loads(x) for x in (pydocs / "prompts.jsonl").read_text().splitlines() if x.strip()]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(pydocs / "tokenizer.json"))
    L, E = spec.num_moe_layers, spec.num_experts
    plan = plan_memory(spec, "40GB", dtype=dtype, max_context_tokens=512)
    for prompt in prompts[:2]:
        ids = torch.tensor([tok.encode(prompt["prompt"])[:48]])
        model = build_model(spec, device="cuda", dtype=dtype)
        ref = greedy_generate(model, ids, 128, keep_logits=True)
        experts_to_host(model)
        for cap in (L, L * E // 2, L * E):
            cfg = default_config(spec, plan, dtype=dtype).with_values({"cache.capacity_experts": cap})
            outs, stats, _ = run_engine(model, cfg, ids, 128, "cuda")
            for out in outs:
                same, d, margin = agreement(out, ref)
                print(f"pydocs {dtype} cap {cap}: {same}/128 tokens agree, max |logit diff| {d:.3e}, "
                      f"margin at divergence {margin}, hit rate {stats['hit_rate']:.3f}")
                if dtype == "float32":
                    assert same == 128 and d < 1e-3, (cap, same, d)
                else:
                    assert margin is None or margin < 0.1, (cap, same, margin)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_kernels_bitwise_equal_torch(dtype):
    """The engine's fused kernels (expertflow/engine/fused_kernels.py) round like torch's CUDA
    kernels: bit for bit against transformers' rotary, silu * up, the shared-expert gated sum and
    residual add + RMSNorm, at qwen2-moe dims (slices of one fused projection, as in the step)."""
    import torch.nn.functional as F
    from transformers.models.qwen2_moe.modeling_qwen2_moe import apply_rotary_pos_emb

    from expertflow.engine import fused_kernels, kernels

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dt)

    for B in (1, 2):
        y = randn(B, 1, 3 * 2048)
        q = y[..., :2048].view(B, 1, 16, 128).transpose(1, 2)
        k = y[..., 2048:4096].view(B, 1, 16, 128).transpose(1, 2)
        cos, sin = randn(B, 1, 128), randn(B, 1, 128)
        ref, out = apply_rotary_pos_emb(q, k, cos, sin), fused_kernels.rotary(q, k, cos, sin)
        assert all(torch.equal(o, r) for o, r in zip(out, ref)), ("rotary", B)
        gu = randn(B, 2 * 5632 + 1)
        gate, up, seg = gu[:, :5632], gu[:, 5632:11264], gu[:, 11264:]
        assert torch.equal(fused_kernels.silu_mul(gate, up), F.silu(gate) * up), ("silu_mul", B)
        e, s, r = randn(B, 2048), randn(B, 2048), randn(B, 1, 2048)
        want = e + torch.sigmoid(seg) * s
        assert torch.equal(fused_kernels.gated_add(e, seg, s), want), ("gated_add", B)
        assert torch.equal(fused_kernels.gated_add(e, seg, s, r), r + want.view(B, 1, 2048)), ("residual", B)
        x, w = y[..., 4096:], randn(2048)
        normed, total = fused_kernels.add_rms_norm(r, x, w, 1e-6)
        assert torch.equal(total, r + x) and torch.equal(normed, kernels.rms_norm(r + x, w, 1e-6)), B
