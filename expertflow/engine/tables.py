"""The graph engine's device tables, and how the host's decisions reach them in stream order.

One int64 buffer on the device holds every table, so one copy updates them all:
  gu [L, E], dn [L, E]      address of each expert's gate_up / down: its GPU slot, or the host
  loc [L, E]                its slot (-1 = host), for the torch path and the tests
  stage_gu / stage_dn [2, L, R]  per step parity, the staging slots' addresses (0 = none)
  stage_loc [2, L, R]       the same as slot numbers (-1 = none)
The host fills a pinned copy and enqueues one non-blocking copy on the compute stream. The
pinned source is double-buffered: a buffer is rewritten two decisions later, after the host has
waited for the step that follows its copy, so a copy never reads a half-written source.
"""

from __future__ import annotations

import numpy as np
import torch


class DeviceTables:
    def __init__(self, sched, store, pool, device: torch.device, R: int):
        self.sched, self.R = sched, R
        L, E = sched.p.num_layers, sched.p.num_experts
        self.L, self.E = L, E
        self.cuda = device.type == "cuda"
        self.gu_bytes = store.gate_up[0][0].numel() * store.gate_up[0].element_size()
        self.dn_bytes = store.down[0][0].numel() * store.down[0].element_size()
        self.gu_host = np.array([[store.gate_up[m].data_ptr() + e * self.gu_bytes for e in range(E)]
                                 for m in range(L)], dtype=np.int64)
        self.dn_host = np.array([[store.down[m].data_ptr() + e * self.dn_bytes for e in range(E)]
                                 for m in range(L)], dtype=np.int64)
        self.gu_pool, self.dn_pool = pool.gate_up.data_ptr(), pool.down.data_ptr()
        n = 3 * L * E + 3 * 2 * L * R
        self.dev = torch.zeros(n, dtype=torch.int64, device=device)
        self.host = [torch.zeros(n, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)]
        self._next = 0
        views, o = [], 0
        for shape in ((L, E), (L, E), (L, E), (2, L, R), (2, L, R), (2, L, R)):
            size = int(np.prod(shape))
            views.append(self.dev[o:o + size].view(*shape))
            o += size
        self.gu, self.dn, self.loc, self.stage_gu, self.stage_dn, self.stage_loc = views
        self.upload()

    def packed(self) -> np.ndarray:
        """The host's current decisions as the device layout."""
        L, R = self.L, self.R
        loc = self.sched.table()  # [L, E]
        gu = np.where(loc >= 0, self.gu_pool + loc * self.gu_bytes, self.gu_host)
        dn = np.where(loc >= 0, self.dn_pool + loc * self.dn_bytes, self.dn_host)
        stage = np.full((2, L, R), -1, dtype=np.int64)
        for parity in (0, 1):
            t = self.sched.stage_table(parity)
            w = min(t.shape[1], R)
            stage[parity, :, :w] = t[:, :w]
        s_gu = np.where(stage >= 0, self.gu_pool + stage * self.gu_bytes, 0)
        s_dn = np.where(stage >= 0, self.dn_pool + stage * self.dn_bytes, 0)
        return np.concatenate([gu.ravel(), dn.ravel(), loc.ravel(), s_gu.ravel(), s_dn.ravel(), stage.ravel()])

    def upload(self) -> None:
        """Enqueue the host's tables on the current (compute) stream."""
        buf = self.host[self._next]
        self._next ^= 1
        buf.numpy()[:] = self.packed()
        self.dev.copy_(buf, non_blocking=self.cuda)
