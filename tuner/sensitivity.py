"""Synthetic routing's sensitivity band: how the finalists' speed moves when routing is less (or
more) local than the generator's preset, and the choice that stays good across it.

Without trained weights the tuner cannot know the model's real locality, and the preset can be
off: on the one checkpoint where both were seen, synthetic routing was more local than the real
router (LRU hit at 25% capacity 0.74 against 0.58; predicted hit rate 0.815, real 0.537). So the
finalists are re-simulated (the same `evaluate` the finalists' re-simulation uses, on the same
slice) on traces from the profile's own generator settings with only `locality` moved:

    more local        locality halfway to 1                    (l + (1 - l) / 2)
    less local        half the preset's locality               (l / 2)
    much less local   little reuse beyond popularity             (l x 0.15)

Same sequence lengths, same seed, same experts' structure: only the temporal reuse differs
(each setting's LRU hit at 25% capacity is recorded beside it, what "less local" means in the
measure the issue used). Rule: among the finalists (feasible, within the quality cap), the one
whose worst predicted decode tokens/s over the band, the preset included, is highest; ties go
to the faster at the preset, then the earlier trial.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from .export import ranked
from .objective import evaluate
from .records import Sensitivity, SensitivityRow, SensitivitySetting, TrialRecord
from .stats import lru_hit_rate
from .synthetic import generate, params_from_json

log = logging.getLogger(__name__)

#: (label, new locality from the preset's l)
SETTINGS = (("more local", lambda l: l + (1.0 - l) / 2.0),
            ("less local", lambda l: l / 2.0),
            ("much less local", lambda l: l * 0.15))
RULE = ("routing is synthetic: among the finalists within the cap, the highest worst-case decode "
        "tokens/s over the sensitivity band (preset, more local, less local, much less local)")


def generator_params(prof):
    """The synthetic generator settings the profile's trace came from (profile.yaml routing, else
    the trace's own meta); None when the profile does not say."""
    d = prof.meta.routing.synthetic or (prof.trace.meta or {}).get("synthetic")
    if not d:
        return None
    try:
        return params_from_json(d)
    except (TypeError, ValueError, KeyError) as exc:
        log.warning("synthetic settings in the profile cannot be read (%s): no sensitivity band", exc)
        return None


def _lru25(trace) -> float:
    return round(float(np.mean(lru_hit_rate(trace, 0.25))), 4)


def band_traces(prof, *, seed: int = 0) -> list[dict[str, Any]]:
    """[{label, locality (mean), lru_hit_25, trace}] for the preset (the profile's trace) and each
    SETTINGS entry; [] when the profile holds no generator settings."""
    params = generator_params(prof)
    if params is None:
        return []
    trace = prof.trace
    lens = np.bincount(trace.seq)
    lens = lens[lens > 0]
    out = [{"label": "preset", "locality": round(float(np.mean(params.locality)), 4),
            "lru_hit_25": _lru25(trace), "trace": trace}]
    for label, move in SETTINGS:
        loc = tuple(float(min(1.0, max(0.0, move(x)))) for x in params.locality)
        p = dataclasses.replace(params, locality=loc)
        meta = {k: v for k, v in (trace.meta or {}).items() if k not in ("synthetic", "source")}
        t = generate(p, lens, seed=seed, lookahead=trace.lookahead, meta=meta)
        out.append({"label": label, "locality": round(float(np.mean(loc)), 4), "lru_hit_25": _lru25(t),
                    "trace": t})
    return out


def band_speeds(ctx, params: dict[str, Any], band: list[dict], *, max_decode_tokens) -> list[float]:
    """Predicted decode tokens/s of one config on each band trace (the finalists' simulation)."""
    out = []
    for b in band:
        m, _ = evaluate(dataclasses.replace(ctx, trace=b["trace"]), params, max_decode_tokens=max_decode_tokens)
        out.append(float(m["decode_tokens_per_s"]))
    return out


def robust_choice(ctx, chosen: TrialRecord, finalists: list[TrialRecord], band: list[dict], cap, *,
                  max_decode_tokens) -> tuple[TrialRecord, Sensitivity]:
    """(the finalist the band rule picks, the record tuning.json keeps as `sensitivity`)."""
    pool = ranked(finalists, cap) or [chosen]
    rows = []
    for t in pool:
        speeds = band_speeds(ctx, t.params, band, max_decode_tokens=max_decode_tokens)
        speeds = [round(v, 4) for v in speeds]
        rows.append(SensitivityRow(trial=t.number, speeds=speeds, worst=min(speeds)))
    best = max(rows, key=lambda r: (r.worst, r.speeds[0], -r.trial))
    pick = next(t for t in pool if t.number == best.trial)
    record = Sensitivity(settings=[SensitivitySetting(**{k: b[k] for k in ("label", "locality", "lru_hit_25")})
                                   for b in band],
                         finalists=rows, chosen=best.trial, speed_rule_choice=chosen.number,
                         changed=best.trial != chosen.number, rule=RULE)
    return pick, record


def describe(record: Sensitivity | None) -> str | None:
    """One line for ef-tune's output: the chosen config's speed across the band."""
    if not record:
        return None
    row = next(r for r in record.finalists if r.trial == record.chosen)
    parts = [f"{s:.2f} {'at the preset' if b.label == 'preset' else b.label} ({b.lru_hit_25:.2f})"
             for s, b in zip(row.speeds, record.settings)]
    head = (f"sensitivity band (synthetic routing; LRU hit at 25% capacity in brackets): trial "
            f"{record.chosen} predicted tokens/s " + ", ".join(parts) + f"; worst {row.worst:.2f}")
    if record.changed:
        head += (f". Chosen over trial {record.speed_rule_choice} (faster at the preset) because its "
                 "worst case in the band is higher")
    return head
