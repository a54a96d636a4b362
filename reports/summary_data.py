"""The summary's numbers for the report: the verdict table (the chosen config beside the
reference points), the gain over plain LRU, and the deploy checks. Pure functions over the
`tuner.records.TuningRecord` of tuning.json (no plotly); re-exported by reports.data."""

from __future__ import annotations

from expertflow.budget import format_bytes
from tuner.records import TuningRecord

from .metrics import METRICS, SUMMARY_METRICS, VALIDATION_OK_ERROR, _num, format_metric, metric_label, relative_error

SPEED = "decode_tokens_per_s"


def summary_data(rec: TuningRecord) -> dict:
    """The verdict table: the chosen config (predicted, and measured when validated) beside the
    reference points the same simulator predicted."""
    chosen = rec.chosen
    speed = _num(chosen.predicted.get(SPEED))
    columns = [{"key": k, "label": metric_label(k, unit=False), "better": METRICS[k].better}
               for k in SUMMARY_METRICS]

    def row(name, kind, values, feasible=True, reason=None):
        values = values or {}
        ref_speed = _num(values.get(SPEED))
        ratio = speed / ref_speed if speed and ref_speed else None
        return {"name": name, "kind": kind, "feasible": bool(feasible), "reason": reason,
                "values": {k: _num(values.get(k)) for k in SUMMARY_METRICS},
                "cells": {k: format_metric(k, values.get(k)) for k in SUMMARY_METRICS},
                "chosen_speedup": ratio}

    rows = [row(f"chosen config (trial {chosen.trial}), predicted", "chosen", chosen.predicted)]
    measured = rec.measured_chosen()
    if measured:
        rows.append(row("chosen config, measured", "measured", measured.measured))
    for ref in rec.references:
        rows.append(row(ref.name, "reference", ref.predicted, ref.feasible, ref.reason))
    return {"columns": columns, "rows": rows, "rule": chosen.rule, "chosen_trial": chosen.trial}


#: Within this relative difference of plain LRU's predicted speed, tuning "buys nothing": the
#: simulator's decode-speed error against the GPU runtime was 10.5% mean |error| (README,
#: "Simulator vs runtime"), and the same config measured twice moved by several percent, so a
#: smaller predicted gain is not a gain a user can count on.
NOISE_FRACTION = 0.05
LRU_REFERENCE = "plain LRU, no prefetch"


def tuning_gain_data(rec: TuningRecord) -> dict | None:
    """The chosen config against plain LRU, in words. None when either speed is missing.

    {'ratio', 'chosen_speed', 'lru_speed', 'buys_nothing', 'text', 'stall_text' (or None)}."""
    lru = rec.reference(LRU_REFERENCE)
    lru_pred = (lru.predicted if lru is not None and lru.feasible else None) or {}
    speed = _num(rec.chosen.predicted.get(SPEED))
    lru_speed = _num(lru_pred.get(SPEED))
    if not speed or not lru_speed:
        return None
    ratio = speed / lru_speed
    nothing = abs(ratio - 1.0) <= NOISE_FRACTION
    fmt = lambda v: format_metric(SPEED, v)  # noqa: E731
    if nothing:
        text = (f"Tuning buys nothing here: the chosen config is predicted at {fmt(speed)}, plain LRU "
                f"without prefetch at {fmt(lru_speed)} ({ratio:.3f}×), within the {NOISE_FRACTION:.0%} "
                "that predictions are accurate to. Plain LRU is as good a choice on this hardware.")
    else:
        text = (f"Tuning pays: the chosen config is predicted {ratio:.2f}× plain LRU without prefetch "
                f"({fmt(speed)} vs {fmt(lru_speed)}).")
    stall_text = None
    lru_stall = _num(lru_pred.get("stall_ms_per_token"))
    if nothing and lru_stall is not None and lru_stall > 0:
        stall_text = _stall_text(rec.executor, lru_stall, 1000.0 / lru_speed)
    return {"ratio": ratio, "chosen_speed": speed, "lru_speed": lru_speed, "buys_nothing": nothing,
            "text": text, "stall_text": stall_text}


def _stall_text(executor: str | None, stall_ms: float, token_ms: float) -> str:
    """Why plain LRU's remaining miss time does not make tuning pay, for the executor it runs on."""
    if executor == "graph":
        return (f"Plain LRU spends {stall_ms:.2f} ms of each {token_ms:.1f} ms token reading missed experts "
                "from host memory over PCIe (inside the captured step); no searched config reads less "
                "at this budget on this routing.")
    return (f"Plain LRU still waits {stall_ms:.2f} ms per token for expert copies, but a token "
            f"takes {token_ms:.1f} ms, almost all of it host time (Python, kernel launches), "
            "so the copy stall is hidden behind host time: removing it does not change the speed.")


def _budget_check(rec: TuningRecord) -> list[dict]:
    peak, budget_bytes = _num(rec.chosen.predicted.get("peak_gpu_bytes")), _num(rec.budget.bytes)
    if peak is None or not budget_bytes:
        return []
    fits = peak <= budget_bytes
    return [{"level": "ok" if fits else "bad",
             "text": f"{'Fits' if fits else 'Exceeds'} the memory budget: predicted peak "
                     f"{format_bytes(peak)} of {rec.budget.text} ({format_bytes(budget_bytes)})."}]


def _speed_check(rec: TuningRecord) -> list[dict]:
    speed = _num(rec.chosen.predicted.get(SPEED))
    feasible_refs = [(r.name, _num((r.predicted or {}).get(SPEED))) for r in rec.references if r.feasible]
    feasible_refs = [(n, s) for n, s in feasible_refs if s]
    if not speed or not feasible_refs:
        return []
    best_name, best = max(feasible_refs, key=lambda ns: ns[1])
    ratios = "; ".join(f"{speed / s:.2f}× as fast as '{n}'" for n, s in feasible_refs)
    return [{"level": "ok" if speed >= best else "warn",
             "text": f"Predicted {format_metric(SPEED, speed)}: {ratios}."
                     + ("" if speed >= best else f" The reference '{best_name}' is predicted "
                        "faster; consider it, or check the search space.")}]


def _quality_check(rec: TuningRecord) -> list[dict]:
    loss, cap = _num(rec.chosen.predicted.get("quality_loss")), _num(rec.quality.cap)
    metric = rec.quality.metric.replace("_", " ")
    if loss is None:
        return []
    if cap is None:
        return [{"level": "ok" if loss == 0 else "warn",
                 "text": f"Quality loss ({metric}) {loss:.2%}; no cap was set (ef-tune --max-quality-loss)."}]
    return [{"level": "ok" if loss <= cap else "bad",
             "text": f"Quality loss ({metric}) {loss:.2%} "
                     f"{'within' if loss <= cap else 'above'} the cap of {cap:.2%}."}]


def _validation_check(rec: TuningRecord) -> list[dict]:
    measured = rec.measured_chosen()
    if not measured:
        return [{"level": "warn",
                 "text": f"Not validated ({rec.validation_note or 'no validation ran'}): "
                         "every number here is a simulator prediction."}]
    err = (measured.error or {}).get(SPEED)
    if err is None:
        err = relative_error((measured.predicted or {}).get(SPEED), measured.measured.get(SPEED))
    if err is None:
        return []
    return [{"level": "ok" if abs(err) <= VALIDATION_OK_ERROR else "warn",
             "text": f"Validated on the real runtime: measured speed is {abs(err):.1%} "
                     f"{'below' if err < 0 else 'above'} the prediction."}]


def verdict_data(rec: TuningRecord) -> list[dict]:
    """Deploy checks as (level, text): level 'ok', 'warn' or 'bad'."""
    out = _budget_check(rec) + _speed_check(rec)
    gain = tuning_gain_data(rec)
    if gain and gain["buys_nothing"]:
        out.append({"level": "warn", "text": gain["text"]})
        if gain["stall_text"]:
            out.append({"level": "warn", "text": gain["stall_text"]})
    out += _quality_check(rec)
    if rec.routing.kind == "synthetic":
        out.append({"level": "warn",
                    "text": "Routing was synthetic (no trained router ran): hit rate and speed "
                            "depend on the generator's assumptions; re-tune with the real weights."})
    return out + _validation_check(rec)
