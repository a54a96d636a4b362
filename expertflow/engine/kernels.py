"""Routed experts read through a device address table (Triton), and its torch reference.

`experts_through_table` computes, for every token t and each of its routed experts j,

    out[t] = sum_j w[t, j] * down_e( silu(gate_e x_t) * up_e x_t ),   e = ids[t, j]  (-1 = dropped)

reading expert e of MoE layer `layer` from the address in `gu_table[layer, e]` / `dn_table[layer,
e]`: an address inside the GPU slot pool (a hit) or inside the pinned host store (a miss, read
zero-copy over PCIe through unified addressing). No host sync, no copy, no graph break: the whole
layer is two kernels (gate_up + activation, then down x weight summed over k), so it can be
captured in a CUDA graph and still follow a cache that changes between replays.

Read-through: when `stage_gu`/`stage_dn` rows hold addresses (0 = none), the r-th missed expert
of the step (ascending expert id among the kept, non-resident ones; see
expertflow.core.engine_cache) is also written into the r-th staging slot while it is read, so
admitting it later costs no second transfer.

Numerics follow transformers' batched_mm backend: gate/up rounded to the model dtype before the
activation, the activation rounded, the down projection rounded, times the routing weight in the
model dtype, summed over k in float32 and rounded once. Accumulation is float32.

Runs on CUDA, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how CI
tests it. Shapes: T tokens, k top-k, P = T*k pairs, H hidden, I expert width, L layers, E experts.
"""

from __future__ import annotations

import functools

import torch

try:  # triton is optional on CPU (the engine's CPU path uses the torch reference)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


# Block shapes: (BLOCK_N output rows per program, BLOCK_K reduction chunk, warps). Decode is
# memory-bound: few rows per program keep many programs (and loads) in flight per SM. Measured on
# the H200 at qwen2-moe dims, 4 experts from HBM (bench/engine_kernels.py, 2026-12-02): (4, 512, 4)
# for both kernels 1424 GB/s, (16, 256, 4) 937 GB/s, (32, 256, 8) 662 GB/s; from pinned host
# memory every shape reads at 46-48 GB/s (PCIe-bound).
GATE_UP_BLOCKS = (4, 512, 4)
DOWN_BLOCKS = (4, 512, 4)


if triton is not None:

    @triton.jit
    def _stage_dst(ids_ptr, table_ptr, stage_ptr, layer, e, addr, pool_lo, pool_hi, E, R,
                   P: tl.constexpr, PB: tl.constexpr):
        """Staging address for expert e (0 = none): rank among the step's distinct kept
        non-resident experts, in ascending id order."""
        offs = tl.arange(0, PB)
        pm = offs < P
        all_ids = tl.load(ids_ptr + offs, mask=pm, other=-1)
        valid = all_ids >= 0
        all_addr = tl.load(table_ptr + layer * E + tl.where(valid, all_ids, 0), mask=pm & valid, other=0)
        nonres = valid & ((all_addr < pool_lo) | (all_addr >= pool_hi))
        eq = (all_ids[:, None] == all_ids[None, :]) & (offs[None, :] < offs[:, None])
        dup = tl.max(eq.to(tl.int32), axis=1) > 0
        lower = nonres & (dup == 0) & (all_ids < e)
        rank = tl.sum(lower.to(tl.int32), axis=0)
        me_nonres = (addr < pool_lo) | (addr >= pool_hi)
        ok = me_nonres & (rank < R)
        dst = tl.load(stage_ptr + layer * R + tl.minimum(rank, R - 1), mask=ok, other=0)
        return tl.where(ok, dst, 0)

    @triton.jit
    def _gate_up_kernel(x_ptr, ids_ptr, table_ptr, stage_ptr, act_ptr, layer, pool_lo, pool_hi,
                        E, I, H, R, K: tl.constexpr, P: tl.constexpr, PB: tl.constexpr,
                        WRITE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        p = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(ids_ptr + p)
        if e >= 0:
            dtype = act_ptr.dtype.element_ty
            t = p // K
            addr = tl.load(table_ptr + layer * E + e)
            w_ptr = addr.to(tl.pointer_type(dtype))
            rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < I
            ks = tl.arange(0, BLOCK_K)
            acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
            if WRITE:
                dst = _stage_dst(ids_ptr, table_ptr, stage_ptr, layer, e, addr, pool_lo, pool_hi, E, R, P, PB)
                d_ptr = dst.to(tl.pointer_type(dtype))
                wrows = rmask & (tl.zeros([BLOCK_N], dtype=tl.int64) + dst != 0)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + ks
                kmask = kk < H
                xv = tl.load(x_ptr + t * H + kk, mask=kmask, other=0.0).to(tl.float32)
                offs = rows[:, None] * H + kk[None, :]
                m2 = rmask[:, None] & kmask[None, :]
                wg = tl.load(w_ptr + offs, mask=m2, other=0.0)
                wu = tl.load(w_ptr + offs + I * H, mask=m2, other=0.0)
                if WRITE:
                    mw = wrows[:, None] & kmask[None, :]
                    tl.store(d_ptr + offs, wg, mask=mw)
                    tl.store(d_ptr + offs + I * H, wu, mask=mw)
                acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
                acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
            g = acc_g.to(dtype).to(tl.float32)
            u = acc_u.to(dtype).to(tl.float32)
            a = (g * tl.sigmoid(g)).to(dtype).to(tl.float32) * u
            tl.store(act_ptr + p * I + rows, a.to(dtype), mask=rmask)

    @triton.jit
    def _down_kernel(act_ptr, ids_ptr, w_ptr, table_ptr, stage_ptr, out_ptr, rec_ids_ptr, rec_w_ptr, rec_src_ptr,
                     layer, pool_lo, pool_hi, E, I, H, R, K: tl.constexpr, P: tl.constexpr, PB: tl.constexpr,
                     WRITE: tl.constexpr, RECORD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[t, rows] = sum_j round(round(down_e act_p) * round(w_p)) over token t's k experts;
        with RECORD, the first row block also writes ids and float32(rec_src) into the records."""
        t = tl.program_id(0)
        hb = tl.program_id(1)
        dtype = out_ptr.dtype.element_ty
        rows = hb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < H
        ks = tl.arange(0, BLOCK_K)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):
            p = t * K + j
            e = tl.load(ids_ptr + p)
            if RECORD:
                if hb == 0:
                    tl.store(rec_ids_ptr + p, e)
                    tl.store(rec_w_ptr + p, tl.load(rec_src_ptr + p).to(tl.float32))
            if e >= 0:
                addr = tl.load(table_ptr + layer * E + e)
                d_w = addr.to(tl.pointer_type(dtype))
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                if WRITE:
                    dst = _stage_dst(ids_ptr, table_ptr, stage_ptr, layer, e, addr, pool_lo, pool_hi, E, R, P, PB)
                    d_ptr = dst.to(tl.pointer_type(dtype))
                    wrows = rmask & (tl.zeros([BLOCK_N], dtype=tl.int64) + dst != 0)
                for k0 in range(0, I, BLOCK_K):
                    kk = k0 + ks
                    kmask = kk < I
                    av = tl.load(act_ptr + p * I + kk, mask=kmask, other=0.0).to(tl.float32)
                    offs = rows[:, None] * I + kk[None, :]
                    m2 = rmask[:, None] & kmask[None, :]
                    wd = tl.load(d_w + offs, mask=m2, other=0.0)
                    if WRITE:
                        tl.store(d_ptr + offs, wd, mask=wrows[:, None] & kmask[None, :])
                    acc += tl.sum(wd.to(tl.float32) * av[None, :], axis=1)
                wt = tl.load(w_ptr + p).to(dtype).to(tl.float32)  # the weight in the model dtype
                total += (acc.to(dtype).to(tl.float32) * wt).to(dtype).to(tl.float32)
        tl.store(out_ptr + t * H + rows, total.to(dtype), mask=rmask)

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, N, XS, eps, BLOCK: tl.constexpr):
        """transformers' RMSNorm: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), per row
        (rows XS elements apart in x, N apart in out)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * XS + offs, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / N
        y = (x * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs, (w * y).to(dtype), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One-kernel RMSNorm over the last dim, the same formula as transformers' *RMSNorm. Rows one
    stride apart (a slice of a fused projection) are read in place; other layouts are copied."""
    N = x.shape[-1]
    layout = row_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = (x.numel() // N, N)
    rows, xs = layout
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _rmsnorm_kernel[(rows,)](x, weight, out, N, xs, eps, BLOCK=_next_pow2(N), num_warps=4 if N <= 4096 else 8)
    return out


def row_layout(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row stride) of x seen as [rows, N] with unit stride along N, without a copy, or None
    where its rows are not one stride apart."""
    if x.dim() == 0 or x.numel() == 0 or (x.stride(-1) != 1 and x.shape[-1] != 1):
        return None
    N = x.shape[-1]
    lead = [(n, s) for n, s in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    for (_, s_out), (n_in, s_in) in zip(lead, lead[1:]):
        if s_out != n_in * s_in:
            return None
    return x.numel() // N, (lead[-1][1] if lead else N)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def experts_through_table(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: int,
                          gu_table: torch.Tensor, dn_table: torch.Tensor, stage_gu: torch.Tensor | None,
                          stage_dn: torch.Tensor | None, pool_ranges: tuple[tuple[int, int], tuple[int, int]],
                          intermediate: int, blocks: tuple | None = None,
                          record: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Routed-expert output [T, H] of MoE layer `layer` (see the module docstring).

    x [T, H] (model dtype), ids [T, k] int64 (-1 = dropped), weights [T, k] (rounded to x's dtype),
    gu_table / dn_table [L, E] int64 addresses of each expert's gate_up [2I, H] / down [H, I],
    stage_gu / stage_dn [L, R] int64 staging addresses (0 = none) or None (no read-through),
    pool_ranges: ([lo, hi) of the gate_up slot pool, [lo, hi) of the down slot pool): an address
    outside its table's range is a miss. `record` = (ids_out [T, k] int64, w_out [T, k] float32,
    w_src [T, k]): the kernel also writes ids into ids_out and w_src as float32 into w_out (the
    engine's per-step routing record, without two copy kernels).
    """
    if triton is None:
        raise RuntimeError("experts_through_table needs triton (pip install triton)")
    T, H = x.shape
    K = ids.shape[1]
    P = T * K
    I = intermediate
    E = gu_table.shape[1]
    x = x.contiguous()
    ids = ids.contiguous()
    w = weights.contiguous()  # rounded to the model dtype in the kernel, as .to(x.dtype) would
    write = stage_gu is not None and stage_gu.shape[1] > 0
    R = stage_gu.shape[1] if write else 1
    st_gu = stage_gu if write else gu_table
    st_dn = stage_dn if write else dn_table
    (glo, ghi), (dlo, dhi) = pool_ranges
    act = torch.empty((P, I), dtype=x.dtype, device=x.device)
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    (gn, gk, gw), (dn_, dk, dw) = blocks or (GATE_UP_BLOCKS, DOWN_BLOCKS)
    PB = max(2, _next_pow2(P))
    _gate_up_kernel[(P, triton.cdiv(I, gn))](
        x, ids, gu_table, st_gu, act, layer, glo, ghi, E, I, H, R, K=K, P=P, PB=PB, WRITE=write,
        BLOCK_N=gn, BLOCK_K=gk, num_warps=gw)
    rec_ids, rec_w, rec_src = record if record is not None else (ids, w, w)
    _down_kernel[(T, triton.cdiv(H, dn_))](
        act, ids, w, dn_table, st_dn, out, rec_ids, rec_w, rec_src.contiguous(), layer, dlo, dhi, E, I, H, R,
        K=K, P=P, PB=PB, WRITE=write, RECORD=record is not None, BLOCK_N=dn_, BLOCK_K=dk, num_warps=dw)
    return out


def experts_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor:
    """The same function in torch, one (token, expert) pair at a time, with the same roundings.

    gate_up[j] [T... ] is not used: `gate_up` / `down` are per-pair weight lists aligned with the
    flattened [T*k] pairs (None for dropped pairs). For tests and the engine's CPU path.
    """
    T, K = ids.shape
    H = x.shape[1]
    out = torch.zeros((T, K, H), dtype=x.dtype, device=x.device)
    w = weights.to(x.dtype)
    for p in range(T * K):
        t, j = divmod(p, K)
        if gate_up[p] is None:
            continue
        gu = torch.nn.functional.linear(x[t:t + 1], gate_up[p])
        g, u = gu.chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) * u
        y = torch.nn.functional.linear(a, down[p])
        out[t, j] = (y * w[t, j])[0]
    return out.sum(dim=1)


@functools.lru_cache(maxsize=None)
def interpreter_on() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
