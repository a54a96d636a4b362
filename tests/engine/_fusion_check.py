"""The engine's fusions under TRITON_INTERPRET=1 (CPU tensors); prints one JSON line (test_fusion.py).

    _fusion_check.py kernels          the fused kernels against transformers' / torch's own ops
    _fusion_check.py engine ARCH...   per tiny architecture: ops per decode step with and without
                                      the fusions, tokens and logits of both, and detach's restore
"""

import importlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.engine._opcount import count_decode_step, count_triton_launches  # noqa: E402

count_triton_launches()

from expertflow.engine import attach, fused_kernels, kernels  # noqa: E402
from expertflow.registry import resolve_model  # noqa: E402
from tests.engine._exact import configs, reference  # noqa: E402


def trunc_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 -> float32 by truncation, the interpreter's cast."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


def _qkv(layout, dtype, g):
    """q, k (GQA) as slices of one fused projection output, like the engine's; cos, sin."""
    B, T, H, Hk, D = 2, 3, 4, 2, 16
    y = torch.randn(B, T, (H + 2 * Hk) * D, generator=g).to(dtype)
    q = y[..., :H * D].view(B, T, H, D)
    k = y[..., H * D:(H + Hk) * D].view(B, T, Hk, D)
    if layout == 1:  # [B, heads, T, D], cos unsqueezed at dim 1 (every supported architecture)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos = torch.randn(B, T, D, generator=g).to(dtype)
    sin = torch.randn(B, T, D, generator=g).to(dtype)
    return q, k, cos, sin


def check_kernels():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        for ud in (1, 2):
            q, k, cos, sin = _qkv(ud, dtype, g)
            ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=ud)
            out = fused_kernels.rotary(q, k, cos, sin, ud)
            res[f"rotary_{name}_ud{ud}"] = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
            res[f"rotary_{name}_ud{ud}_strides"] = all(o.stride() == r.stride() for o, r in zip(out, ref))
            if dtype == torch.bfloat16:  # the same formula, each op rounded by the interpreter's cast
                c, s = cos.float().unsqueeze(ud), sin.float().unsqueeze(ud)
                emu = [trunc_bf16(trunc_bf16(x.float() * c) + trunc_bf16(_rotate_half(x.float()) * s))
                       for x in (q, k)]
                res[f"rotary_bf16_ud{ud}_vs_truncating"] = max((o.float() - e).abs().max().item()
                                                               for o, e in zip(out, emu))
        gu = torch.randn(5, 2 * 40 + 1, generator=g).to(dtype)  # gate, up, gate of one row: slices
        gate, up, seg = gu[:, :40], gu[:, 40:80], gu[:, 80:]
        res[f"silu_mul_{name}"] = (fused_kernels.silu_mul(gate, up).float()
                                   - (F.silu(gate) * up).float()).abs().max().item()
        e, s = torch.randn(5, 40, generator=g).to(dtype), torch.randn(5, 40, generator=g).to(dtype)
        res[f"gated_add_{name}"] = (fused_kernels.gated_add(e, seg, s).float()
                                    - (e + torch.sigmoid(seg) * s).float()).abs().max().item()
        r = torch.randn(1, 5, 40, generator=g).to(dtype)  # the layer's residual, [B, T, H]
        res[f"gated_add_residual_{name}"] = (fused_kernels.gated_add(e, seg, s, r).float() - (
            r + (e + torch.sigmoid(seg) * s).view(1, 5, 40)).float()).abs().max().item()
        x = gu[:, :40].unsqueeze(0)  # strided rows
        w = torch.randn(40, generator=g).to(dtype)
        normed, total = fused_kernels.add_rms_norm(r, x, w, 1e-6)
        want_sum = r + x if dtype == torch.float32 else trunc_bf16(r.float() + x.float()).to(dtype)
        res[f"add_rms_norm_sum_equal_{name}"] = torch.equal(total, want_sum)  # bf16: the interpreter's cast
        res[f"add_rms_norm_equal_rms_norm_{name}"] = torch.equal(normed, kernels.rms_norm(total, w, 1e-6))
        v = (r + x).float()
        want = w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)  # transformers'
        res[f"add_rms_norm_{name}"] = ((normed.float() - want.float()).abs().max() / want.float().abs().max()).item()
    q, k, _, _ = _qkv(1, torch.bfloat16, g)  # strided, GQA: keys [2, 2, 3, 16], values as keys
    bufs = [torch.randn(2, 2, 12, 16, generator=g).to(torch.bfloat16) for _ in range(2)]
    want = [b.clone() for b in bufs]
    pos = torch.tensor([3, 7, 8])
    want[0].index_copy_(2, pos, k)
    want[1].index_copy_(2, pos, q[:, :2])
    res["kv_write_done"] = fused_kernels.kv_write(bufs[0], bufs[1], k, q[:, :2], pos)
    res["kv_write_equal"] = all(torch.equal(b, w) for b, w in zip(bufs, want))
    res["rotary_fallback_partial"] = fused_kernels.rotary(q, k, cos[..., :8], sin[..., :8]) is None
    res["rotary_fallback_dtypes"] = fused_kernels.rotary(q, k, cos.float(), sin.float()) is None
    print(json.dumps(res))


def _params(model):
    return {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}


def restored(model, before, rotary_globals, logits_before, ids) -> dict:
    """After detach: every parameter the same object, equal, in storage of its own; every forward
    the class's; the modeling module's apply_rotary_pos_emb the original; model(ids) unchanged."""
    after = dict(model.named_parameters())
    ptrs = [p.untyped_storage().data_ptr() for p in after.values()]
    experts = {n for n in after if ".experts." in n}  # the host store gives experts back as before
    return {
        "same_objects": all(after[n] is before[n][0] for n in before if n not in experts),
        "equal": all(torch.equal(after[n], before[n][2]) for n in before),
        "own_storage": len(set(ptrs)) == len(ptrs),
        "forwards": not any("forward" in m.__dict__ for m in model.modules()),
        "rotary_global": all(importlib.import_module(mod).__dict__.get("apply_rotary_pos_emb") is fn
                             for mod, fn in rotary_globals.items()),
        "model_call_equal": torch.equal(model(ids).logits, logits_before),
    }


def check_engine(names):
    res = {}
    for name in names:
        spec = resolve_model(name)
        model, ids, ref = reference(spec, "cpu", "float32", batch=1, prompt=5, new=3)
        L, E = spec.num_moe_layers, spec.num_experts
        _, cfg = next(iter(configs(spec, "cpu", "float32", policies=("lru",), capacities=(L * E // 2,))))
        mod = type(model).__module__
        rotary_globals = {mod: importlib.import_module(mod).__dict__.get("apply_rotary_pos_emb")}
        with torch.no_grad():
            logits_before = model(ids).logits
        before = _params(model)
        r = {}
        for fuse in (False, True):
            with attach(model, cfg, device="cpu", kernel="triton", fuse=fuse) as eng:
                ops, out = count_decode_step(eng, ids, 3)
                summary = eng.fusions.summary()
            tag = "fused" if fuse else "unfused"
            r[tag] = {"ops": sum(ops.values()), "by_op": dict(ops), "summary": summary,
                      "tokens_equal_ref": torch.equal(out.sequences, ref.sequences),
                      "logits": torch.stack(out.step_logits)}
        with torch.no_grad():
            r["restored"] = restored(model, before, rotary_globals, logits_before, ids)
        r["logit_diff_fused_unfused"] = (r["fused"]["logits"] - r["unfused"]["logits"]).abs().max().item()
        r["logit_diff_fused_ref"] = (r["fused"]["logits"] - torch.stack(ref.step_logits)).abs().max().item()
        for tag in ("fused", "unfused"):
            del r[tag]["logits"]
        res[name] = r
    print(json.dumps(res))


if __name__ == "__main__":
    if sys.argv[1] == "kernels":
        check_kernels()
    else:
        check_engine(sys.argv[2:])
