"""The engine's kernel-count fusions (expertflow/engine/fusion.py): fewer ops per decode step,
the same arithmetic, and the model restored by detach.

The Triton kernels run under Triton's CPU interpreter in a subprocess (_fusion_check.py); the
one-GEMM projections are plain torch and are checked here in-process too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from expertflow.engine import attach
from expertflow.engine.fused_linear import FusedLinears
from expertflow.engine.fusion import ENV_FUSE, FusedRotary
from expertflow.registry import resolve_model
from expertflow.runtime.generate import greedy_generate

from ._exact import configs, reference

HERE = Path(__file__).resolve().parent
GEMMS = ("aten.mm.default", "aten.addmm.default")


def _check(*args):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(ENV_FUSE, None)
    proc = subprocess.run([sys.executable, str(HERE / "_fusion_check.py"), *args], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fused_kernels_match_torch():
    res = _check("kernels")
    for ud in (1, 2):  # q/k as [B, heads, T, D] (unsqueeze_dim 1) and [B, T, heads, D] (2)
        assert res[f"rotary_float32_ud{ud}"] <= 1e-6, res
        assert res[f"rotary_float32_ud{ud}_strides"] and res[f"rotary_bfloat16_ud{ud}_strides"], res
        # bf16: bit for bit the formula with a rounding after each op, rounded the way the
        # interpreter casts (truncation); against transformers' round-to-nearest, within that
        assert res[f"rotary_bf16_ud{ud}_vs_truncating"] == 0.0, res
        assert res[f"rotary_bfloat16_ud{ud}"] <= 0.07, res
    assert res["silu_mul_float32"] <= 1e-6 and res["gated_add_float32"] <= 1e-6, res
    assert res["silu_mul_bfloat16"] <= 5e-2 and res["gated_add_bfloat16"] <= 5e-2, res
    assert res["gated_add_residual_float32"] <= 1e-6 and res["gated_add_residual_bfloat16"] <= 5e-2, res
    for name in ("float32", "bfloat16"):  # residual add + RMSNorm: the sum, then rms_norm's arithmetic
        assert res[f"add_rms_norm_sum_equal_{name}"] and res[f"add_rms_norm_equal_rms_norm_{name}"], res
    assert res["add_rms_norm_float32"] <= 1e-6 and res["add_rms_norm_bfloat16"] <= 2e-2, res  # relative
    assert res["rotary_fallback_partial"] and res["rotary_fallback_dtypes"], res  # not its formula
    assert res["kv_write_done"] and res["kv_write_equal"], res  # both index_copy_, byte for byte


def _assert_fusions(name, r, rotary=True):
    spec = resolve_model(name)
    L, M = spec.num_layers, spec.num_moe_layers  # decoder layers, MoE layers among them
    fused, unfused = r["fused"], r["unfused"]
    s = fused["summary"]
    assert fused["ops"] < unfused["ops"], (name, fused["ops"], unfused["ops"])
    assert unfused["summary"]["linear_groups"] == 0 and s["linear_groups"] > 0, (name, s)
    # each group of n projections is one GEMM: n - 1 fewer per group, every step
    saved = sum(unfused["by_op"].get(g, 0) for g in GEMMS) - sum(fused["by_op"].get(g, 0) for g in GEMMS)
    assert saved == s["linear_members"] - s["linear_groups"], (name, saved, s)
    if rotary:  # rotate_half's neg and cat are gone: one rotary kernel per layer instead
        assert fused["by_op"].get("triton:_rotary_kernel") == L, (name, fused["by_op"])
        assert "aten.neg.default" not in fused["by_op"] and unfused["by_op"]["aten.neg.default"] == 2 * L
    # the KV cache's two index_copy_ are one kernel; the experts kernel writes the routing record
    assert fused["by_op"].get("triton:_kv_write_kernel") == L, (name, fused["by_op"])
    assert unfused["by_op"]["aten.index_copy_.default"] - fused["by_op"].get("aten.index_copy_.default", 0) == 2 * L
    assert unfused["by_op"]["aten.copy_.default"] - fused["by_op"].get("aten.copy_.default", 0) == 2 * M
    # the residual add after attention and the RMSNorm after it: one kernel per layer
    assert fused["by_op"].get("triton:_add_rmsnorm_kernel") == L, (name, fused["by_op"])
    assert fused["tokens_equal_ref"] and unfused["tokens_equal_ref"], name
    assert r["logit_diff_fused_unfused"] < 1e-4 and r["logit_diff_fused_ref"] < 1e-4, (name, r)
    assert all(r["restored"].values()), (name, r["restored"])


def test_fusions_cut_ops_per_step_qwen2_moe():
    res = _check("engine", "tiny-qwen2-moe")["tiny-qwen2-moe"]
    L = resolve_model("tiny-qwen2-moe").num_moe_layers
    _assert_fusions("tiny-qwen2-moe", res)
    fused, unfused = res["fused"]["by_op"], res["unfused"]["by_op"]
    # the shared expert's silu * up and its sigmoid-gated sum are one kernel each
    assert fused.get("triton:_silu_mul_kernel") == L and fused.get("triton:_gated_add_kernel") == L, fused
    assert "aten.silu.default" not in fused and "aten.sigmoid.default" not in fused, fused
    assert unfused["aten.silu.default"] == L and unfused["aten.sigmoid.default"] == L, unfused
    # and no add is left per layer: rotary, both residual adds and the gated sum are in kernels
    assert fused.get("aten.add.Tensor", 0) < L <= unfused["aten.add.Tensor"] // 5, (fused, unfused)
    # shared expert gate/up + router + shared-expert gate: one GEMM per layer, not four
    assert res["fused"]["summary"]["linear_members"] == 7 * L, res["fused"]["summary"]


@pytest.mark.slow
def test_fusions_cut_ops_per_step_other_architectures():
    names = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2"]
    res = _check("engine", *names)
    for name in names:
        _assert_fusions(name, res[name], rotary=name != "tiny-deepseek-v2")


# ---- in-process: one GEMM for sibling projections ------------------------------------------------
def _qwen2():
    spec = resolve_model("tiny-qwen2-moe")
    model, ids, ref = reference(spec, "cpu", "float32", batch=1, prompt=4, new=2)
    return spec, model, ids, ref


def _storages(model):
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def test_sibling_projections_one_gemm_equal_separate_linears():
    _, model, _, _ = _qwen2()
    attn = model.model.layers[0].self_attn
    moe = model.model.layers[0].mlp
    x = torch.randn(3, attn.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = [F.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        want_router = moe.gate(x)
        want_seg = moe.shared_expert_gate(x)
        params = {n: p for n, p in model.named_parameters()}
        bytes_before = sum(_storages(model).values())
        fused = FusedLinears(model)
        try:
            assert sum(_storages(model).values()) == bytes_before  # no second copy of any weight
            assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
            got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
            assert all((g - w).abs().max() <= 1e-5 for g, w in zip(got, want))
            assert got[0].untyped_storage().data_ptr() == got[2].untyped_storage().data_ptr()  # one GEMM
            moe.shared_expert(x)  # computes the block's one GEMM (gate/up, router, shared gate)
            got_router = moe.gate(x.view(-1, x.shape[-1]))  # a view of the same tensor counts
            assert all((g.float() - w.float()).abs().max() <= 1e-5 for g, w in zip(got_router, want_router))
            assert (moe.shared_expert_gate(x) - want_seg).abs().max() <= 1e-5
            x2 = x + 1  # another input: computed afresh, and still right for a lone sibling
            assert (attn.k_proj(x2) - F.linear(x2, attn.k_proj.weight, attn.k_proj.bias)).abs().max() <= 1e-5
            with torch.inference_mode():  # inference tensors carry no version counter
                x3 = x * 2
                q3, v3 = attn.q_proj(x3), attn.v_proj(x3)
                assert q3.untyped_storage().data_ptr() == v3.untyped_storage().data_ptr()
                assert (v3 - F.linear(x3, attn.v_proj.weight, attn.v_proj.bias)).abs().max() <= 1e-5
        finally:
            fused.restore()
        after = dict(model.named_parameters())
        assert all(after[n] is p for n, p in params.items())
        assert len(_storages(model)) == len(after) and sum(_storages(model).values()) == bytes_before
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(attn.q_proj(x), want[0])  # its own weight again, the same values


def test_fuse_flag_and_env_var(monkeypatch):
    spec, model, ids, ref = _qwen2()
    L = spec.num_moe_layers
    (_, cfg), = configs(spec, "cpu", "float32", policies=("lru",), capacities=(L,))
    runs = {}
    for label, fuse, env in (("on", True, None), ("flag off", False, None), ("env off", True, "0"),
                             ("env others", True, "rotary,kv"), ("env linear", True, "linear")):
        if env is None:
            monkeypatch.delenv(ENV_FUSE, raising=False)
        else:
            monkeypatch.setenv(ENV_FUSE, env)
        with attach(model, cfg, device="cpu", kernel="torch", fuse=fuse) as eng:
            runs[label] = (eng.fusions.summary(), eng.generate(ids, 2, keep_logits=True))
    assert runs["on"][0]["linear_groups"] > 0  # the GEMM fusion needs no Triton
    assert runs["on"][0]["rotary_modules"] == runs["on"][0]["blocks"] == 0  # Triton ones: kernel torch
    for label in ("flag off", "env off", "env others"):
        assert runs[label][0]["linear_groups"] == 0, label
    assert runs["env linear"][0] == runs["on"][0]
    monkeypatch.setenv(ENV_FUSE, "rotary,typo")
    with pytest.raises(ValueError, match="typo"):
        attach(model, cfg, device="cpu", kernel="torch")
    monkeypatch.delenv(ENV_FUSE)
    assert torch.equal(greedy_generate(model, ids, 2).sequences, ref.sequences)  # refused untouched
    for label, (_, out) in runs.items():
        assert torch.equal(out.sequences, ref.sequences), label


def test_rotary_swapped_only_while_active():
    _, model, _, _ = _qwen2()
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    own = mod.apply_rotary_pos_emb
    a, b = FusedRotary(model), FusedRotary(model)
    assert a.modules == [mod]
    with a.active():
        assert mod.apply_rotary_pos_emb is not own and mod.apply_rotary_pos_emb.expertflow_fused is own
        with b.active():  # two engines of one class: the inner exit leaves the outer one's swap
            pass
        assert mod.apply_rotary_pos_emb.expertflow_fused is own
    assert mod.apply_rotary_pos_emb is own
