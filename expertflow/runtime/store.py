"""The two memories every executor shares: the host expert store and the GPU slot pool.

* `HostStore` takes the routed experts of a model out of its parameter tree into (pinned) host
  tensors, one [E, 2I, H] gate_up and one [E, H, I] down per MoE layer, and puts them back
  exactly on `restore()`.
* `SlotPool` holds the GPU expert cache: S slots of gate_up [2I, H] and down [H, I].

The eager runtime (expertflow.runtime.offload) and the graph engine (expertflow.engine) build on
these two; neither knows about scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .adapters import MoEBlock


@dataclass
class _Saved:
    block: MoEBlock
    device: torch.device
    requires_grad: bool


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if t.device.type == "cpu":
        if pin and not t.is_pinned():
            return t.pin_memory()
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    host.copy_(t)
    return host


class HostStore:
    """Routed experts of every MoE layer in host memory (pinned when `pin`)."""

    def __init__(self, blocks: list[MoEBlock], pin: bool, owner):
        first = blocks[0].experts
        self.dtype = first.gate_up_proj.dtype
        self.gate_up_shape = tuple(first.gate_up_proj.shape[1:])  # [2I, H]
        self.down_shape = tuple(first.down_proj.shape[1:])  # [H, I]
        self.gate_up: list[torch.Tensor] = []  # per layer [E, 2I, H]
        self.down: list[torch.Tensor] = []  # per layer [E, H, I]
        self._saved: list[_Saved] = []
        for b in blocks:
            ex = b.experts
            gu, dn = ex.gate_up_proj, ex.down_proj
            self._saved.append(_Saved(b, gu.device, gu.requires_grad))
            self.gate_up.append(_to_host(gu.detach(), pin))
            self.down.append(_to_host(dn.detach(), pin))
            del ex._parameters["gate_up_proj"], ex._parameters["down_proj"]
            ex._expertflow = (owner, b.moe_index)
        self.expert_bytes = (int(np.prod(self.gate_up_shape)) + int(np.prod(self.down_shape))) * \
            torch.finfo(self.dtype).bits // 8

    def restore(self) -> None:
        """Put every expert back into its module (same values, device, dtype)."""
        for saved, gu, dn in zip(self._saved, self.gate_up, self.down):
            ex = saved.block.experts
            ex.gate_up_proj = nn.Parameter(gu.to(saved.device), requires_grad=saved.requires_grad)
            ex.down_proj = nn.Parameter(dn.to(saved.device), requires_grad=saved.requires_grad)
            del ex._expertflow


class SlotPool:
    """The GPU expert cache: `num_slots` slots of one expert each."""

    def __init__(self, store: HostStore, num_slots: int, device: torch.device):
        self.num_slots = num_slots
        self.gate_up = torch.empty((num_slots, *store.gate_up_shape), dtype=store.dtype, device=device)
        self.down = torch.empty((num_slots, *store.down_shape), dtype=store.dtype, device=device)

    def fill(self, store: HostStore, layer: int, expert: int, slot: int, non_blocking: bool = False) -> None:
        """Copy one expert from the host store into `slot` (on the current stream)."""
        self.gate_up[slot].copy_(store.gate_up[layer][expert], non_blocking=non_blocking)
        self.down[slot].copy_(store.down[layer][expert], non_blocking=non_blocking)

    def spans(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """[lo, hi) device addresses of the gate_up and the down pool."""
        def span(t):
            return (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        return span(self.gate_up), span(self.down)
