"""A static KV cache that transformers' attention layers write into, with positions on the device.

Transformers' attention modules call `cache.update(key, value, layer_idx, ...)` and attend over
what it returns. This cache keeps one [B, heads, max_len, head_dim] buffer per layer and tensor
(allocated on the first update, so any layout works: MHA, GQA, DeepSeek's MLA pair), writes the
step's keys and values at the positions in `self.positions` (a device tensor the engine updates
in place, so a captured graph writes the right place every replay) and returns the first
`self.length` positions: the engine attends over a bucket of the cache, not the whole of it, and
masks what is not written yet.

It implements the part of transformers' Cache interface that the decoder layers use (both the
5.17 `update(k, v, layer_idx)` call and the newer `update(k, v, layer_idx, kwargs=...)`).
"""

from __future__ import annotations

import torch


class StaticKV:
    is_compileable = True
    is_sliding = [False]

    def __init__(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype, write=None):
        self.batch = batch
        self.max_len = max_len
        self.device = device
        self.dtype = dtype
        self.positions = torch.zeros(1, dtype=torch.long, device=device)  # [T] of the current step
        self.length = max_len  # positions attended over (the bucket)
        self.seen = 0  # tokens written so far (host bookkeeping)
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.write = write  # (k_buf, v_buf, key, value, positions) -> done: both writes in one kernel

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        bufs = self.buffers.get(layer_idx)
        if bufs is None:
            bufs = (torch.zeros((key.shape[0], key.shape[1], self.max_len, key.shape[3]), dtype=key.dtype,
                                device=key.device),
                    torch.zeros((value.shape[0], value.shape[1], self.max_len, value.shape[3]),
                                dtype=value.dtype, device=value.device))
            self.buffers[layer_idx] = bufs
        k, v = bufs
        if self.write is None or not self.write(k, v, key, value, self.positions):
            k.index_copy_(2, self.positions, key)
            v.index_copy_(2, self.positions, value)
        return k[:, :, :self.length], v[:, :, :self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reset(self) -> None:
        for k, v in self.buffers.values():
            k.zero_()
            v.zero_()
        self.seen = 0
