"""Run the engine kernel once under TRITON_INTERPRET=1 and print JSON (see test_kernels.py)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's expertflow

from expertflow.core.engine_cache import staging_ranks  # noqa: E402
from expertflow.engine.kernels import experts_reference, experts_through_table  # noqa: E402


def main(dtype_name, T, K, seed, *flags):
    T, K, seed = int(T), int(K), int(seed)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    L, E, H, I, S = 2, 7, 40, 24, 5
    host_gu = torch.randn(L, E, 2 * I, H, generator=g).to(dtype)
    host_dn = torch.randn(L, E, H, I, generator=g).to(dtype)
    pool_gu = torch.full((S, 2 * I, H), float("nan"), dtype=dtype)
    pool_dn = torch.full((S, H, I), float("nan"), dtype=dtype)
    layer = 1
    resident = {0: 0, 3: 2, 5: 4}  # expert -> slot of layer 1 (slots 1 and 3 free for staging)
    for e, s in resident.items():
        pool_gu[s].copy_(host_gu[layer, e])
        pool_dn[s].copy_(host_dn[layer, e])
    gu_tab = torch.zeros(L, E, dtype=torch.int64)
    dn_tab = torch.zeros(L, E, dtype=torch.int64)
    for l in range(L):
        for e in range(E):
            if l == layer and e in resident:
                gu_tab[l, e] = pool_gu[resident[e]].data_ptr()
                dn_tab[l, e] = pool_dn[resident[e]].data_ptr()
            else:
                gu_tab[l, e] = host_gu[l, e].data_ptr()
                dn_tab[l, e] = host_dn[l, e].data_ptr()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    row0 = [3] + [e for e in torch.randperm(E, generator=g).tolist() if e not in (3, 0, 5)][:K - 1]
    ids[0] = torch.tensor(row0)  # one hit (expert 3) and misses in the first token
    if K > 1:
        ids[0, -1] = -1  # a dropped pair
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g).to(dtype)
    stage = "--stage" in flags
    R = 2
    st_gu = torch.zeros(L, R, dtype=torch.int64)
    st_dn = torch.zeros(L, R, dtype=torch.int64)
    if stage:
        for r, s in enumerate((1, 3)):
            st_gu[layer, r] = pool_gu[s].data_ptr()
            st_dn[layer, r] = pool_dn[s].data_ptr()
    def span(t):
        return (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())

    record = None
    if "--record" in flags:  # the engine's routing record, written by the kernel
        record = (torch.full((T, K), -7, dtype=torch.int64), torch.full((T, K), float("nan")),
                  torch.rand(T, K, generator=g).to(dtype))
    out = experts_through_table(x, ids, w, layer, gu_tab, dn_tab, st_gu if stage else None,
                                st_dn if stage else None, (span(pool_gu), span(pool_dn)), I, record=record)
    flat = ids.reshape(-1).tolist()
    gu_list = [None if e < 0 else host_gu[layer, e] for e in flat]
    dn_list = [None if e < 0 else host_dn[layer, e] for e in flat]
    ref = experts_reference(x.double(), ids, w.double(), [None if t is None else t.double() for t in gu_list],
                            [None if t is None else t.double() for t in dn_list])
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    res = {"rel_err": rel, "unwritten": int(torch.isnan(out).sum()),
           "pairs_dropped": sum(e < 0 for e in flat),
           "pairs_hit": sum(e >= 0 and e in resident for e in flat),
           "pairs_missed": sum(e >= 0 and e not in resident for e in flat)}
    if record is not None:
        res.update(recorded_ids=torch.equal(record[0], ids), recorded_w=torch.equal(record[1], record[2].float()))
    if not stage:  # float32 weights are rounded to the model dtype inside (exact here: bf16 values)
        out32 = experts_through_table(x, ids, w.float(), layer, gu_tab, dn_tab, None, None,
                                      (span(pool_gu), span(pool_dn)), I)
        res["float32_weights_equal"] = torch.equal(out32, out)
    if stage:
        missed = sorted({e for e in flat if e >= 0 and e not in resident})
        ranks = staging_ranks(ids.numpy(), [e in resident for e in range(E)])
        assert [e for e, _ in ranks] == missed
        staged = equal = 0
        used = set()
        for e, r in ranks:
            if r < R:
                s = (1, 3)[r]
                used.add(s)
                staged += 1
                equal += int(torch.equal(pool_gu[s], host_gu[layer, e]) and torch.equal(pool_dn[s], host_dn[layer, e]))
        untouched = all(torch.isnan(pool_gu[s]).all() and torch.isnan(pool_dn[s]).all() for s in (1, 3) if s not in used)
        res.update(staged=staged, staged_equal=equal, untouched_equal=bool(untouched))
    print(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:])
