"""Routing replayed from a trace inside the graph engine's step (benchmarks and validation).

A random-weight router picks nearly the same experts every step and exercises no offloading, so
measurements replay the calibrated trace instead: the router still runs (its cost is measured),
and the experts backend takes the trace's (ids, weights) of the step's positions, indexed on the
device, so the replay works inside a captured graph too. Batch 1.
"""

from __future__ import annotations

import numpy as np
import torch


class EngineReplay:
    """Routing source for benchmarks and validation: the trace's (ids, weights) per position of
    the current sequence, indexed on the device by the step's position (so it replays inside a
    graph). Batch 1. The router still runs (its cost is measured); its result is replaced."""

    def __init__(self, engine, max_rows: int):
        L, k = engine.L, engine.k
        dev = engine.device
        self.ids = torch.zeros((L, max_rows, k), dtype=torch.long, device=dev)
        self.w = torch.zeros((L, max_rows, k), dtype=engine.store.dtype, device=dev)

    def load(self, ids: np.ndarray, weights: np.ndarray) -> None:
        """ids / weights [n, L, k] of one sequence, in position order."""
        n = ids.shape[0]
        self.ids[:, :n].copy_(torch.as_tensor(np.ascontiguousarray(ids.transpose(1, 0, 2))))
        self.w[:, :n].copy_(torch.as_tensor(np.ascontiguousarray(weights.transpose(1, 0, 2))).to(self.w.dtype))

    def route(self, m: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[m].index_select(0, positions), self.w[m].index_select(0, positions)


def replay_generate(engine, trace, plan) -> dict[str, float]:
    """Generate over `plan` (tuner.validate.replay_schedule: per sequence its trace rows in
    position order and prefill length) with the trace's routing replayed; decode totals."""
    replay = engine.replay if engine.replay is not None else engine.use_replay(max(len(r) for r, _ in plan))
    decode_s = prefill_s = 0.0
    tokens = 0
    for rows, p in plan:
        replay.load(trace.ids[rows], trace.weights[rows])
        out = engine.generate(torch.zeros((1, p), dtype=torch.long), len(rows) - p + 1)
        decode_s += out.decode_s
        prefill_s += out.prefill_s
        tokens += out.new_tokens - 1
    return {"decode_s": decode_s, "prefill_s": prefill_s, "decode_tokens": tokens, "sequences": len(plan)}


