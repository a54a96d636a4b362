"""Adaptive-k on an exact-top-k trace: the count error, measured with real weights.

The profile's trace is recorded with exact top-k. A config with adaptive-k drops experts, which
changes the hidden states the later layers route, so replaying the exact trace (and dropping
experts by the rule per row) is only an approximation of what that config routes. With trained
weights the tuner can measure how far off it is: it re-records the trace on the same prompts with
each finalist's adaptive-k settings (tuner.profiler.activation.record_routing with `values`),
replays the finalist on both traces through the same simulator, and reports the relative error of
the hit and miss counts (tuning.json `adaptive_trace`, the report's checks).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .numeric import relative_error
from .objective import quality_table_for, trial_config
from .profiler.activation import record_routing
from .simulator import simulate

log = logging.getLogger(__name__)


def _settings(config) -> tuple[float, int, bool]:
    a = config.adaptive_k
    return float(a.threshold), int(a.min_k), bool(a.renormalize)


def _counts(ctx, trace, config, max_decode_tokens) -> dict[str, float]:
    sim = ctx.simulate_fn or simulate
    res = sim(trace, ctx.costs, config, prompt_tokens=ctx.prompt_tokens, max_decode_tokens=max_decode_tokens,
              quality_table=quality_table_for(ctx, config))
    c = res.counters.totals()
    return {"hits": float(c["hits"]), "misses": float(c["misses"]), "hit_rate": float(c["hit_rate"])}


def _rel(a: float, b: float) -> float:
    """|a - b| / b (b, the re-recorded count, >= 0); 0 when both are 0, inf when only b is."""
    err = relative_error(b, a)
    if err is None:
        return 0.0 if a == b else float("inf")
    return abs(err)


def count_error(spec, prof, ctx, finalists: list[dict], *, token_lists: list[list[int]], device: str,
                dtype: str, max_decode_tokens: int | None, notes: list[str], record=None) -> dict[str, Any] | None:
    """Re-record the trace under each finalist's adaptive-k settings and compare the hit/miss
    counts of the finalist replayed on it with those on the exact trace. None when no finalist
    uses adaptive-k, or the prompts do not reproduce the profile's sequences."""
    record = record or record_routing
    trace = prof.trace
    lens = np.bincount(trace.seq)
    lens = lens[lens > 0].tolist()
    token_lists = token_lists[:len(lens)]  # a profile of the first n prompts (in order)
    if [len(t) for t in token_lists] != lens:
        notes.append("adaptive-k trace check skipped: the prompts do not reproduce the profile's sequences "
                     "(profile made with other prompts or --max-tokens)")
        return None
    cfgs = [(t, trial_config(ctx.base_config, t.params)) for t in finalists]
    todo = sorted({_settings(c) for _, c in cfgs if c.adaptive_k.threshold < 1.0})
    if not todo:
        return None
    rows = []
    for thr, mk, renorm in todo:
        values = {"adaptive_k.threshold": thr, "adaptive_k.min_k": mk, "adaptive_k.renormalize": renorm}
        again = record(spec, token_lists, device=device, dtype=dtype, values=values)
        for t, cfg in cfgs:
            if _settings(cfg) != (thr, mk, renorm):
                continue
            exact = _counts(ctx, trace, cfg, max_decode_tokens)
            real = _counts(ctx, again, cfg, max_decode_tokens)
            err = max(_rel(exact["hits"], real["hits"]), _rel(exact["misses"], real["misses"]))
            rows.append({"trial": t.number, "threshold": thr, "min_k": mk, "renormalize": renorm,
                         "exact_trace": exact, "rerecorded_trace": real, "count_error": round(err, 6)})
    worst = max(r["count_error"] for r in rows)
    notes.append(f"adaptive-k trace check: replaying the exact top-k trace shifts the finalists' hit/miss "
                 f"counts by up to {worst:.2%} against traces re-recorded under their thresholds "
                 f"({', '.join(str(t[0]) for t in todo)})")
    return {"finalists": rows, "max_count_error": worst,
            "what": "relative error of hit and miss counts, exact top-k trace vs re-recorded under the "
                    "finalist's adaptive-k, same simulator and slice"}
