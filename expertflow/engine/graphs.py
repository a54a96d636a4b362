"""The captured decode graphs: one per (batch, KV bucket, step parity).

A graph attends over a bucket of the static KV cache (128 positions, doubling up to the cache's
length) so a short context reads a short cache; the step parity picks which staging table the
read-through kernel writes into. Capture warms up on a side stream first (kernel compilation,
lazy allocations), then restores the step's state, so warm-up leaves no trace in the output.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

MIN_BUCKET = 128  # smallest KV length a decode graph attends over; buckets double up to max_len


def kv_bucket(max_len: int, length: int) -> int:
    """The KV length a step attending over `length` positions reads: 128, doubling, capped."""
    b = MIN_BUCKET
    while b < length:
        b *= 2
    return min(b, max_len)


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}  # device index -> the process's warm-up stream


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up, for the whole process (as torch's
    own graph capture stream is). cuBLAS keeps a workspace per stream it ever ran on, allocated
    from the caching allocator and never freed, and the caching allocator keeps freed blocks per
    stream: a new stream per capture left ~0.2 GiB reserved each, a new one per attach ~0.14 GB
    allocated until torch's 32 pooled streams had all been used (H200, qwen2-moe, 2026-12-03)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[idx] = torch.cuda.Stream(idx)
    return _WARMUP_STREAMS[idx]


class StepGraphs:
    def __init__(self, device: torch.device | None):
        self.device = device
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device is not None else None
        self.stream = warmup_stream(device) if device is not None else None

    def clear(self) -> None:
        """Drop every graph and hand its private memory back (reset() frees the graph's pool
        blocks now, not whenever Python collects the object)."""
        for g in self.graphs.values():
            g.reset()
        if self.graphs and self.device is not None:
            # the reset graphs released their private pool: the next capture needs a new one
            # (capturing into the released pool trips the caching allocator's use_count assert)
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs.clear()

    def __len__(self) -> int:
        return len(self.graphs)

    def get(self, engine, length: int, parity: int):
        key = (engine.batch, length, parity)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(engine, length, parity)
            self.graphs[key] = g
        return g

    def capture_all(self, engine, max_tokens: int) -> None:
        length = MIN_BUCKET
        while True:
            b = kv_bucket(engine.max_len, length)
            for parity in (0, 1):
                self.get(engine, b, parity)
            if b >= min(max_tokens, engine.max_len):
                break
            length = b * 2

    def _capture(self, engine, length: int, parity: int):
        engine._parity = parity
        engine.kv.length = length
        state = (engine.tok, engine.positions, engine.ring_i)
        saved = [t.clone() for t in state]
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with engine.fusions.active():  # whoever asks for the graph, it captures the fused step
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile kernels, allocate lazily, outside the capture
                    engine._decode_step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, s in zip(state, saved):
                t.copy_(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                engine._decode_step()
        torch.cuda.empty_cache()  # hand the warm-up's freed blocks back: the budget counts reserved memory
        log.debug("captured decode graph batch %d, kv %d, parity %d", engine.batch, length, parity)
        return g
