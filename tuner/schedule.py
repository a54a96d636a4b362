"""The step schedules a routing trace is replayed in: the simulator's, validation's and the
graph engine's replay walk the same ones (so measured and predicted counts can be equal)."""

from __future__ import annotations

import numpy as np

from expertflow.trace import DECODE, PREFILL, RoutingTrace


def sequences(trace: RoutingTrace, prompt_tokens: int = 16,
              max_decode_tokens: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Per trace sequence: (its token rows in position order, prefill length p = min(prompt_tokens,
    len - 1)), cut after `max_decode_tokens` decode tokens in all: the one schedule the simulator
    (decode_schedule) and validation (tuner.validate, the engine's replay) both walk."""
    order = np.lexsort((trace.pos, trace.seq))
    groups = np.split(order, np.flatnonzero(np.diff(trace.seq[order])) + 1)
    out, decoded = [], 0
    for g in groups:
        p = min(prompt_tokens, len(g) - 1)
        if p < 1:
            continue
        n = len(g) - p
        if max_decode_tokens is not None:
            n = min(n, max_decode_tokens - decoded)
        if n <= 0:
            break
        out.append((g[:p + n], p))
        decoded += n
    return out


def decode_schedule(trace: RoutingTrace, prompt_tokens: int = 16, batch: int = 1,
                    max_decode_tokens: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Re-batch a trace as serving would run it: per group of `batch` sequences, one prefill
    step of their first `prompt_tokens` tokens, then one decode step per position.

    Valid because a causal LM routes a token identically in prefill and in decode. Returns
    [(token indices [T], kind)]. At batch 1 exactly `sequences()` step by step.
    """
    if batch == 1:
        steps: list[tuple[np.ndarray, int]] = []
        for rows, p in sequences(trace, prompt_tokens, max_decode_tokens):
            steps.append((rows[:p], PREFILL))
            steps.extend((rows[i:i + 1], DECODE) for i in range(p, len(rows)))
        return steps
    steps = []
    order = np.lexsort((trace.pos, trace.seq))
    groups = np.split(order, np.flatnonzero(np.diff(trace.seq[order])) + 1)
    decoded = 0
    for g0 in range(0, len(groups), batch):
        group = groups[g0:g0 + batch]
        p = min(prompt_tokens, min(len(g) for g in group) - 1)
        if p < 1:
            continue
        steps.append((np.concatenate([g[:p] for g in group]), PREFILL))
        n = min(len(g) for g in group)
        for i in range(p, n):
            steps.append((np.array([g[i] for g in group]), DECODE))
            decoded += len(group)
            if max_decode_tokens is not None and decoded >= max_decode_tokens:
                return steps
    return steps


def recorded_schedule(trace: RoutingTrace) -> list[tuple[np.ndarray, int]]:
    return [(np.arange(s.start, s.stop), kind) for s, kind in trace.step_slices()]


def schedule_steps(trace, config, schedule, prompt_tokens, max_decode_tokens):
    if schedule == "recorded":
        return recorded_schedule(trace)
    return decode_schedule(trace, prompt_tokens, config.memory.max_batch, max_decode_tokens)


