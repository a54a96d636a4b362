"""Small Triton kernels that replace chains of elementwise torch ops in the decode step, each with
torch's arithmetic: the same roundings to the tensor's dtype after every op that torch rounds.

* `rotary(q, k, cos, sin)`: transformers' `apply_rotary_pos_emb` (q*cos + rotate_half(q)*sin, and
  the same for k: ten kernels) in one kernel.
* `silu_mul(g, u)`: `silu(g) * u` (the gated MLP's two kernels) in one.
* `gated_add(e, g, s)`: `e + sigmoid(g) * s` (Qwen2-MoE's shared-expert gate: three kernels) in one.
* `add_rms_norm(r, x, w, eps)`: the decoder layer's residual add and the RMSNorm after it in one.
* `kv_write(k_buf, v_buf, key, value, positions)`: the static KV cache's two index_copy_ in one.

Exactness on the GPU: products and sums are IEEE round-to-nearest with no contraction into FMAs
(`enable_fp_fusion=False`), exp is libdevice's expf and division is div.rn, as torch's CUDA kernels
compute them (in float32, "opmath", rounded to the dtype after each op). Under Triton's CPU
interpreter (TRITON_INTERPRET=1, how CI runs them) exp is numpy's, and float32 -> bfloat16 casts
truncate instead of rounding (see tests/engine/test_kernels.py).

Every wrapper takes strided inputs (slices of a fused GEMM's output) without copying them.
"""

from __future__ import annotations

import torch

from .kernels import _next_pow2, interpreter_on, row_layout, tl, triton

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.exp(x)
        return tl.exp(x)

    @triton.jit
    def _rope_rows(x_ptr, c_ptr, s_ptr, o_ptr, r, A1, A2, xs0, xs1, xs2, xs3, cs0, cs1, cs2, cs3,
                   os0, os1, os2, os3, D: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of x [A0, A1, A2, D]: round(round(x*cos) + round(rotate_half(x)*sin))."""
        i2 = r % A2
        i1 = (r // A2) % A1
        i0 = r // (A2 * A1)
        dt = o_ptr.dtype.element_ty
        d = tl.arange(0, BLOCK)
        m = d < D
        half = D // 2
        partner = tl.where(d < half, d + half, d - half)
        xb = x_ptr + i0 * xs0 + i1 * xs1 + i2 * xs2
        x = tl.load(xb + d * xs3, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(xb + partner * xs3, mask=m, other=0.0).to(tl.float32)
        rot = tl.where(d < half, -xp, xp)
        cb = i0 * cs0 + i1 * cs1 + i2 * cs2 + d * cs3
        c = tl.load(c_ptr + cb, mask=m, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + cb, mask=m, other=0.0).to(tl.float32)
        a = (x * c).to(dt).to(tl.float32)
        b = (rot * s).to(dt).to(tl.float32)
        tl.store(o_ptr + i0 * os0 + i1 * os1 + i2 * os2 + d * os3, (a + b).to(dt), mask=m)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cq_ptr, sq_ptr, ck_ptr, sk_ptr, qo_ptr, ko_ptr, RQ,
                       qa1, qa2, qs0, qs1, qs2, qs3, qcs0, qcs1, qcs2, qcs3, qos0, qos1, qos2, qos3,
                       ka1, ka2, ks0, ks1, ks2, ks3, kcs0, kcs1, kcs2, kcs3, kos0, kos1, kos2, kos3,
                       D: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        if r < RQ:
            _rope_rows(q_ptr, cq_ptr, sq_ptr, qo_ptr, r, qa1, qa2, qs0, qs1, qs2, qs3,
                       qcs0, qcs1, qcs2, qcs3, qos0, qos1, qos2, qos3, D, BLOCK)
        else:
            _rope_rows(k_ptr, ck_ptr, sk_ptr, ko_ptr, r - RQ, ka1, ka2, ks0, ks1, ks2, ks3,
                       kcs0, kcs1, kcs2, kcs3, kos0, kos1, kos2, kos3, D, BLOCK)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, gs, us, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
        """o[t] = round(round(g / (1 + exp(-g))) * u), torch's silu then mul."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        dt = o_ptr.dtype.element_ty
        g = tl.load(g_ptr + t * gs + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + t * us + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.math.div_rn(g, 1.0 + _exp(-g, LIBDEVICE)).to(dt).to(tl.float32)
        tl.store(o_ptr + t * N + offs, (a * u).to(dt), mask=m)

    @triton.jit
    def _gated_add_kernel(e_ptr, g_ptr, s_ptr, r_ptr, o_ptr, N, es, gs, ss, rs, LIBDEVICE: tl.constexpr,
                          HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        """o[t] = round(e + round(round(1 / (1 + exp(-g[t]))) * s)), torch's sigmoid, mul, add;
        with HAS_RES, round(r + that) (the decoder layer's residual add)."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        dt = o_ptr.dtype.element_ty
        g = tl.load(g_ptr + t * gs).to(tl.float32)
        sig = tl.math.div_rn(1.0, 1.0 + _exp(-g, LIBDEVICE)).to(dt).to(tl.float32)
        s = tl.load(s_ptr + t * ss + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + t * es + offs, mask=m, other=0.0).to(tl.float32)
        p = (sig * s).to(dt).to(tl.float32)
        o = (e + p).to(dt)
        if HAS_RES:
            r = tl.load(r_ptr + t * rs + offs, mask=m, other=0.0).to(tl.float32)
            o = (r + o.to(tl.float32)).to(dt)
        tl.store(o_ptr + t * N + offs, o, mask=m)

    @triton.jit
    def _add_rmsnorm_kernel(r_ptr, x_ptr, w_ptr, sum_ptr, out_ptr, N, RS, XS, eps, BLOCK: tl.constexpr):
        """sum = round(r + x); out = kernels.rms_norm(sum) with the same arithmetic, per row."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        sdt = sum_ptr.dtype.element_ty
        r = tl.load(r_ptr + row * RS + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * XS + offs, mask=m, other=0.0).to(tl.float32)
        sm = (r + x).to(sdt)
        tl.store(sum_ptr + row * N + offs, sm, mask=m)
        x = sm.to(tl.float32)
        var = tl.sum(x * x, axis=0) / N
        y = (x * tl.math.rsqrt(var + eps)).to(sdt).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs, (w * y).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _kv_row(x_ptr, buf_ptr, pos_ptr, r, A1, A2, xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3,
                D: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of x [A0, A1, T, D] into buf[i0, i1, positions[t]]."""
        t = r % A2
        i1 = (r // A2) % A1
        i0 = r // (A2 * A1)
        d = tl.arange(0, BLOCK)
        m = d < D
        pos = tl.load(pos_ptr + t)
        x = tl.load(x_ptr + i0 * xs0 + i1 * xs1 + t * xs2 + d * xs3, mask=m)
        tl.store(buf_ptr + i0 * bs0 + i1 * bs1 + pos * bs2 + d * bs3, x, mask=m)

    @triton.jit
    def _kv_write_kernel(k_ptr, v_ptr, kb_ptr, vb_ptr, pos_ptr, RK,
                         ka1, ka2, ks0, ks1, ks2, ks3, kb0, kb1, kb2, kb3,
                         va1, va2, vs0, vs1, vs2, vs3, vb0, vb1, vb2, vb3,
                         DK: tl.constexpr, BK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
        r = tl.program_id(0)
        if r < RK:
            _kv_row(k_ptr, kb_ptr, pos_ptr, r, ka1, ka2, ks0, ks1, ks2, ks3, kb0, kb1, kb2, kb3, DK, BK)
        else:
            _kv_row(v_ptr, vb_ptr, pos_ptr, r - RK, va1, va2, vs0, vs1, vs2, vs3, vb0, vb1, vb2, vb3, DV, BV)


_ELEMENTWISE_BLOCK = 1024


def _launch_opts() -> dict:
    return {"num_warps": 4, "enable_fp_fusion": False}


def _strides4(t: torch.Tensor) -> list[int]:
    return list(t.stride())


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
           out_strides: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) in one kernel, or None where the call is
    not the standard one this kernel computes (then the caller runs transformers' own).
    `out_strides`: the (q, k) output strides (default: empty_like's)."""
    if not _rotary_fits(q, k, cos, sin):
        return None
    try:
        cq = cos.unsqueeze(unsqueeze_dim).expand(q.shape)
        sq = sin.unsqueeze(unsqueeze_dim).expand(q.shape)
        ck = cos.unsqueeze(unsqueeze_dim).expand(k.shape)
        sk = sin.unsqueeze(unsqueeze_dim).expand(k.shape)
    except RuntimeError:  # shapes that do not broadcast the standard way
        return None
    if cq.stride() != sq.stride() or ck.stride() != sk.stride():
        return None
    if out_strides is None:
        qo, ko = torch.empty_like(q), torch.empty_like(k)
    else:
        qo = torch.empty_strided(q.shape, out_strides[0], dtype=q.dtype, device=q.device)
        ko = torch.empty_strided(k.shape, out_strides[1], dtype=k.dtype, device=k.device)
    D = q.shape[-1]
    rq = q.numel() // D
    rk = k.numel() // D
    _rotary_kernel[(rq + rk,)](
        q, k, cq, sq, ck, sk, qo, ko, rq,
        q.shape[1], q.shape[2], *_strides4(q), *_strides4(cq), *_strides4(qo),
        k.shape[1], k.shape[2], *_strides4(k), *_strides4(ck), *_strides4(ko),
        D=D, BLOCK=_next_pow2(D), **_launch_opts())
    return qo, ko


def _rotary_fits(q, k, cos, sin) -> bool:
    tensors = (q, k, cos, sin)
    if triton is None or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[-1] % 2:
        return False
    if cos.shape != sin.shape or cos.shape[-1] != q.shape[-1]:  # partial rotary: not this formula
        return False
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        return False  # mixed dtypes promote in torch; keep torch's own arithmetic there
    return q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.numel() > 0 and k.numel() > 0


def _pointwise_fits(*ts: torch.Tensor) -> bool:
    if triton is None or len({t.dtype for t in ts}) != 1 or len({t.device for t in ts}) != 1:
        return False
    return ts[0].dtype in (torch.float32, torch.float16, torch.bfloat16) and ts[0].numel() > 0


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """silu(g) * u in one kernel (g, u [..., N], same shape), or None (the caller runs torch's)."""
    rg, ru = row_layout(g), row_layout(u)
    if g.shape != u.shape or rg is None or ru is None or not _pointwise_fits(g, u):
        return None
    (T, gs), (_, us) = rg, ru
    N = g.shape[-1]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    _silu_mul_kernel[(T, triton.cdiv(N, _ELEMENTWISE_BLOCK))](
        g, u, out, N, gs, us, LIBDEVICE=not interpreter_on(), BLOCK=_ELEMENTWISE_BLOCK, **_launch_opts())
    return out


def gated_add(e: torch.Tensor, g: torch.Tensor, s: torch.Tensor,
              residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """e + sigmoid(g) * s in one kernel (e, s [..., N]; g [..., 1]), and `residual + that` with a
    residual of e's shape (rows may be viewed [T, N] differently), or None (torch's then)."""
    r = e if residual is None else residual
    re_, rg, rs, rr = row_layout(e), row_layout(g), row_layout(s), row_layout(r)
    if e.shape != s.shape or g.shape != (*e.shape[:-1], 1) or None in (re_, rg, rs, rr) \
            or r.numel() != e.numel() or r.shape[-1] != e.shape[-1] or not _pointwise_fits(e, g, s, r):
        return None
    (T, es), (_, gs), (_, ss), (_, rstride) = re_, rg, rs, rr
    N = e.shape[-1]
    out = torch.empty(r.shape, dtype=e.dtype, device=e.device)
    _gated_add_kernel[(T, triton.cdiv(N, _ELEMENTWISE_BLOCK))](
        e, g, s, r, out, N, es, gs, ss, rstride, LIBDEVICE=not interpreter_on(), HAS_RES=residual is not None,
        BLOCK=_ELEMENTWISE_BLOCK, **_launch_opts())
    return out


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(residual + x), residual + x) in one kernel (`kernels.rms_norm`'s arithmetic on the
    rounded sum), or None (the caller adds and norms)."""
    rr, rx = row_layout(residual), row_layout(x)
    if residual.shape != x.shape or rr is None or rx is None or not _pointwise_fits(residual, x) \
            or weight.shape != (x.shape[-1],) or weight.device != x.device:
        return None
    (rows, rs), (_, xs) = rr, rx
    N = x.shape[-1]
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _add_rmsnorm_kernel[(rows,)](residual, x, weight, total, out, N, rs, xs, eps, BLOCK=_next_pow2(N),
                                 num_warps=4 if N <= 4096 else 8)
    return out, total


def kv_write(k_buf: torch.Tensor, v_buf: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             positions: torch.Tensor) -> bool:
    """k_buf.index_copy_(2, positions, key) and the same for v in one kernel (False: not done,
    the caller copies). Buffers [B, heads, max_len, D]; key / value [B, heads, T, D]."""
    pairs = ((k_buf, key), (v_buf, value))
    if triton is None or any(x.dim() != 4 or b.dim() != 4 or x.dtype != b.dtype or x.device != b.device
                             or x.shape[:2] != b.shape[:2] or x.shape[3] != b.shape[3] for b, x in pairs):
        return False
    if positions.dim() != 1 or positions.shape[0] != key.shape[2] or value.shape[2] != key.shape[2] \
            or positions.device != key.device or key.numel() == 0 or value.numel() == 0:
        return False
    DK, DV = key.shape[3], value.shape[3]
    rk = key.numel() // DK
    _kv_write_kernel[(rk + value.numel() // DV,)](
        key, value, k_buf, v_buf, positions, rk,
        key.shape[1], key.shape[2], *key.stride(), *k_buf.stride(),
        value.shape[1], value.shape[2], *value.stride(), *v_buf.stride(),
        DK=DK, BK=_next_pow2(DK), DV=DV, BV=_next_pow2(DV), num_warps=4)
    return True
