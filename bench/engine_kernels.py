"""The graph engine's experts kernel at qwen2-moe dims: GB/s reading experts from HBM (hits) and
zero-copy from pinned host memory (misses), per block configuration, against torch references.

    . bench/gpu_env.sh && python3 bench/engine_kernels.py

Bytes counted: each routed expert's gate_up [2I, H] and down [H, I] read once (bf16).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertflow.engine import kernels  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=60)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args(argv)
    import triton

    H, I, E, K = args.hidden, args.inter, args.experts, args.k
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    pool_gu = torch.randn((E, 2 * I, H), device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16) * 0.02
    pool_dn = torch.randn((E, H, I), device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16) * 0.02
    host_gu = pool_gu.cpu().pin_memory()
    host_dn = pool_dn.cpu().pin_memory()
    spans = tuple((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (pool_gu, pool_dn))
    gub, dnb = 2 * I * H * 2, H * I * 2

    def tables(where):
        base_gu = pool_gu.data_ptr() if where == "hbm" else host_gu.data_ptr()
        base_dn = pool_dn.data_ptr() if where == "hbm" else host_dn.data_ptr()
        gu = torch.tensor([[base_gu + e * gub for e in range(E)]], dtype=torch.int64, device=dev)
        dn = torch.tensor([[base_dn + e * dnb for e in range(E)]], dtype=torch.int64, device=dev)
        return gu, dn

    x = torch.randn((1, H), device=dev, dtype=torch.float32).to(torch.bfloat16)
    ids = torch.randperm(E, device=dev)[:K].view(1, K)
    w = torch.rand((1, K), device=dev).to(torch.bfloat16)
    ref = torch.zeros((1, H), device=dev, dtype=torch.float32)
    for j in range(K):
        e = int(ids[0, j])
        gg, uu = torch.nn.functional.linear(x.float(), pool_gu[e].float()).chunk(2, dim=-1)
        ref += w[0, j].float() * torch.nn.functional.linear(torch.nn.functional.silu(gg) * uu, pool_dn[e].float())
    nbytes = K * (gub + dnb)
    print(f"{'where':<5} {'gate_up blocks':<16} {'down blocks':<16} {'us':>8} {'GB/s':>8} {'rel err':>9}")
    best = {}
    g_cands = [(2, 1024, 4), (2, 512, 2), (4, 512, 4), (4, 1024, 4), (4, 512, 2), (4, 256, 2), (8, 512, 4)]
    d_cands = [(2, 512, 2), (4, 512, 4), (4, 256, 2), (4, 1024, 4), (8, 512, 4)]
    for where in ("hbm", "host"):
        gu_t, dn_t = tables(where)
        pairs = list(itertools.product(g_cands, d_cands)) if where == "hbm" else [(g_cands[2], d_cands[1])]
        for gb, db in pairs:
            blocks = (gb, db)
            fn = lambda: kernels.experts_through_table(x, ids, w, 0, gu_t, dn_t, None, None, spans, I, blocks=blocks)  # noqa: E731
            out = fn()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
            gbps = nbytes / (ms * 1e-3) / 1e9
            print(f"{where:<5} {str(gb):<16} {str(db):<16} {ms * 1000:>8.1f} {gbps:>8.1f} {err:>9.2e}", flush=True)
            if where not in best or gbps > best[where][1]:
                best[where] = (blocks, gbps)
    for where, (blocks, gbps) in best.items():
        print(f"best {where}: {blocks} {gbps:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
