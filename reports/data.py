"""The report's numbers: one pure function per figure or section, no plotly.

Inputs are what an ef-tune output folder holds (see reports/build.py for the loading): the
tuning.json dict, a `tuner.profile.Profile`, the Optuna study (loaded lazily from tuning.json's
storage URL and study name) and the config.yaml text. Each function returns plain data (dicts of
lists and numbers, ready for a table or a plotly trace) or None when its input is absent, so the
caller can write one sentence instead of a figure. Tested without plotly (tests/reports).

This module is the single entry point: the study's functions (reports/study_data.py) and the
metric formatting (reports/metrics.py) are re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from expertflow.budget import format_bytes

from .metrics import (  # noqa: F401
    METRICS,
    SUMMARY_METRICS,
    VALIDATION_OK_ERROR,
    Metric,
    _num,
    format_metric,
    metric_label,
    relative_error,
)
from .study_data import (  # noqa: F401
    history_data,
    importance_data,
    load_study,
    objective_names,
    parallel_coordinates_data,
    pareto_data,
    pareto_mask,
    study_trials,
)

log = logging.getLogger(__name__)


# ---- summary ----------------------------------------------------------------------------------
def _measured_chosen(tuning: dict) -> dict | None:
    for v in tuning.get("validation") or []:
        if v.get("label") == "chosen" and v.get("measured"):
            return v
    return None


def summary_data(tuning: dict) -> dict:
    """The verdict table: the chosen config (predicted, and measured when validated) beside the
    reference points the same simulator predicted."""
    chosen = tuning.get("chosen") or {}
    cpred = chosen.get("predicted") or {}
    speed = _num(cpred.get("decode_tokens_per_s"))
    columns = [{"key": k, "label": metric_label(k, unit=False), "better": METRICS[k].better}
               for k in SUMMARY_METRICS]

    def row(name, kind, values, feasible=True, reason=None):
        values = values or {}
        ref_speed = _num(values.get("decode_tokens_per_s"))
        ratio = speed / ref_speed if speed and ref_speed else None
        return {"name": name, "kind": kind, "feasible": bool(feasible), "reason": reason,
                "values": {k: _num(values.get(k)) for k in SUMMARY_METRICS},
                "cells": {k: format_metric(k, values.get(k)) for k in SUMMARY_METRICS},
                "chosen_speedup": ratio}

    trial = chosen.get("trial")
    rows = [row(f"chosen config (trial {trial}), predicted" if trial is not None
                else "chosen config, predicted", "chosen", cpred)]
    measured = _measured_chosen(tuning)
    if measured:
        rows.append(row("chosen config, measured", "measured", measured["measured"]))
    for ref in tuning.get("references") or []:
        feasible = bool(ref.get("feasible", ref.get("predicted") is not None))
        rows.append(row(str(ref.get("name", "reference")), "reference", ref.get("predicted"),
                        feasible, ref.get("reason")))
    return {"columns": columns, "rows": rows, "rule": chosen.get("rule"),
            "chosen_trial": trial}


#: Within this relative difference of plain LRU's predicted speed, tuning "buys nothing": the
#: simulator's decode-speed error against the GPU runtime was 10.5% mean |error| (README,
#: "Simulator vs runtime"), and the same config measured twice moved by several percent, so a
#: smaller predicted gain is not a gain a user can count on.
NOISE_FRACTION = 0.05
LRU_REFERENCE = "plain LRU, no prefetch"


def tuning_gain_data(tuning: dict) -> dict | None:
    """The chosen config against plain LRU, in words. None when either speed is missing.

    {'ratio', 'chosen_speed', 'lru_speed', 'buys_nothing', 'text', 'stall_text' (or None)}."""
    pred = (tuning.get("chosen") or {}).get("predicted") or {}
    lru = next((r for r in tuning.get("references") or [] if r.get("name") == LRU_REFERENCE
                and r.get("feasible", True)), None)
    speed = _num(pred.get("decode_tokens_per_s"))
    lru_speed = _num(((lru or {}).get("predicted") or {}).get("decode_tokens_per_s"))
    if not speed or not lru_speed:
        return None
    ratio = speed / lru_speed
    nothing = abs(ratio - 1.0) <= NOISE_FRACTION
    fmt = lambda v: format_metric("decode_tokens_per_s", v)  # noqa: E731
    if nothing:
        text = (f"Tuning buys nothing here: the chosen config is predicted at {fmt(speed)}, plain LRU "
                f"without prefetch at {fmt(lru_speed)} ({ratio:.3f}×), within the {NOISE_FRACTION:.0%} "
                "that predictions are accurate to. Plain LRU is as good a choice on this hardware.")
    else:
        text = (f"Tuning pays: the chosen config is predicted {ratio:.2f}× plain LRU without prefetch "
                f"({fmt(speed)} vs {fmt(lru_speed)}).")
    stall_text = None
    lru_stall = _num(((lru or {}).get("predicted") or {}).get("stall_ms_per_token"))
    if nothing and lru_stall is not None and lru_stall > 0:
        token_ms = 1000.0 / lru_speed
        stall_text = (f"Plain LRU still waits {lru_stall:.2f} ms per token for expert copies, but a token "
                      f"takes {token_ms:.1f} ms, almost all of it host time (Python, kernel launches), "
                      "so the copy stall is hidden behind host time: removing it does not change the speed.")
    return {"ratio": ratio, "chosen_speed": speed, "lru_speed": lru_speed, "buys_nothing": nothing,
            "text": text, "stall_text": stall_text}


def verdict_data(tuning: dict) -> list[dict]:
    """Deploy checks as (level, text): level 'ok', 'warn' or 'bad'."""
    out: list[dict] = []
    chosen = tuning.get("chosen") or {}
    pred = chosen.get("predicted") or {}
    budget = tuning.get("budget") or {}
    peak, budget_bytes = _num(pred.get("peak_gpu_bytes")), _num(budget.get("bytes"))
    if peak is not None and budget_bytes:
        fits = peak <= budget_bytes
        out.append({"level": "ok" if fits else "bad",
                    "text": f"{'Fits' if fits else 'Exceeds'} the memory budget: predicted peak "
                            f"{format_bytes(peak)} of {budget.get('text', format_bytes(budget_bytes))} "
                            f"({format_bytes(budget_bytes)})."})
    speed = _num(pred.get("decode_tokens_per_s"))
    feasible_refs = [(r.get("name"), _num((r.get("predicted") or {}).get("decode_tokens_per_s")))
                     for r in tuning.get("references") or [] if r.get("feasible", True)]
    feasible_refs = [(n, s) for n, s in feasible_refs if s]
    if speed and feasible_refs:
        best_name, best = max(feasible_refs, key=lambda ns: ns[1])
        ratios = "; ".join(f"{speed / s:.2f}× as fast as '{n}'" for n, s in feasible_refs)
        out.append({"level": "ok" if speed >= best else "warn",
                    "text": f"Predicted {format_metric('decode_tokens_per_s', speed)}: {ratios}."
                            + ("" if speed >= best else f" The reference '{best_name}' is predicted "
                               "faster; consider it, or check the search space.")})
    gain = tuning_gain_data(tuning)
    if gain and gain["buys_nothing"]:
        out.append({"level": "warn", "text": gain["text"]})
        if gain["stall_text"]:
            out.append({"level": "warn", "text": gain["stall_text"]})
    quality = tuning.get("quality") or {}
    loss, cap = _num(pred.get("quality_loss")), _num(quality.get("cap"))
    metric = str(quality.get("metric") or "quality loss").replace("_", " ")
    if loss is not None:
        if cap is None:
            out.append({"level": "ok" if loss == 0 else "warn",
                        "text": f"Quality loss ({metric}) {loss:.2%}; no cap was set "
                                "(ef-tune --max-quality-loss)."})
        else:
            out.append({"level": "ok" if loss <= cap else "bad",
                        "text": f"Quality loss ({metric}) {loss:.2%} "
                                f"{'within' if loss <= cap else 'above'} the cap of {cap:.2%}."})
    routing = tuning.get("routing") or {}
    if routing.get("kind") == "synthetic":
        out.append({"level": "warn",
                    "text": "Routing was synthetic (no trained router ran): hit rate and speed "
                            "depend on the generator's assumptions; re-tune with the real weights."})
    measured = _measured_chosen(tuning)
    if measured:
        err = (measured.get("error") or {}).get("decode_tokens_per_s")
        if err is None:
            err = relative_error(measured["predicted"].get("decode_tokens_per_s"),
                                 measured["measured"].get("decode_tokens_per_s"))
        if err is not None:
            out.append({"level": "ok" if abs(err) <= VALIDATION_OK_ERROR else "warn",
                        "text": f"Validated on the real runtime: measured speed is {abs(err):.1%} "
                                f"{'below' if err < 0 else 'above'} the prediction."})
    else:
        out.append({"level": "warn",
                    "text": f"Not validated ({tuning.get('validation_note') or 'no validation ran'}): "
                            "every number here is a simulator prediction."})
    return out


def describe_config(config: dict | None) -> list[str]:
    """The chosen RuntimeConfig (parsed config.yaml) in plain sentences."""
    if not config:
        return []
    m, c = config.get("model") or {}, config.get("cache") or {}
    p, a = config.get("prefetch") or {}, config.get("adaptive_k") or {}
    mem, rt = config.get("memory") or {}, config.get("runtime") or {}
    total = int(m.get("num_moe_layers", 0)) * int(m.get("num_experts", 0))
    cap = int(c.get("capacity_experts", 0))
    share = f" ({cap / total:.1%})" if total else ""
    if c.get("per_layer_capacity"):
        split = "per layer as listed in cache.per_layer_capacity"
    elif c.get("scope") == "pooled":
        split = "one pool shared by all layers"
    else:
        split = (f"per layer, {c.get('allocation', 'uniform')} split "
                 f"(~{cap / max(1, int(m.get('num_moe_layers', 1))):.1f} slots per layer)")
    out = [f"Keep {cap:,} of {total:,} routed experts on the GPU{share}: {split}; evict by "
           f"{str(c.get('policy', 'lru')).upper()}"
           + ("; warm start from the profile's hottest experts." if c.get("warm_start") else ".")]
    depth = int(p.get("depth", 0))
    if depth == 0:
        out.append("Prefetch off: every miss waits for its copy.")
    else:
        width = int(p.get("width", 0)) or m.get("top_k")
        out.append(f"Prefetch {'adaptively up to ' if p.get('adaptive') else ''}{depth} layer"
                   f"{'s' if depth > 1 else ''} ahead with the {p.get('predictor', 'next_gate')} "
                   f"predictor, {width} experts per predicted layer per token.")
    thr = _num(a.get("threshold"))
    if thr is None or thr >= 1.0:
        out.append(f"Exact top-{m.get('top_k')} routing (adaptive-k off): no quality loss from "
                   "dropped experts.")
    else:
        out.append(f"Adaptive-k: per token keep the fewest top-{m.get('top_k')} experts holding "
                   f"{thr:.0%} of the gate mass (at least {a.get('min_k', 1)}); the rest are "
                   f"skipped{', weights renormalised' if a.get('renormalize') else ''}.")
    if mem:
        out.append(f"Memory budget {mem.get('budget_text')} ({format_bytes(mem.get('budget_bytes', 0))}): "
                   f"expert cache {format_bytes(mem.get('expert_cache_bytes', 0))}, KV cache for "
                   f"{mem.get('max_context_tokens')} tokens × batch {mem.get('max_batch')}.")
    if rt:
        out.append(f"Runs in {rt.get('dtype')} on {rt.get('device')}, "
                   f"{'pinned' if rt.get('pin_memory') else 'pageable'} host memory, experts "
                   f"kernel {rt.get('experts_kernel', 'auto')}.")
    return out


# ---- environment ------------------------------------------------------------------------------
def _cite(text: str) -> str:
    """Notes written before the citation fix say "(anchors.md)": cite the measurements instead."""
    try:
        from tuner.profiler import cite_measurements
    except ImportError:  # pragma: no cover - the profiler is optional in a source checkout
        return str(text).replace("(anchors.md)", "(published routing measurements)")
    return cite_measurements(text)


def environment_data(tuning: dict, profile=None) -> dict:
    """Hardware, versions, provenance rows, and the routing/timing notices."""
    hw = tuning.get("hardware") or {}
    model = tuning.get("model") or {}
    pmeta = getattr(profile, "meta", None) or {}
    phw = pmeta.get("hardware") or {}
    routing = tuning.get("routing") or {}
    timing = pmeta.get("timing") or {}
    gen, width = hw.get("pcie_generation"), hw.get("pcie_width")
    source = str(hw.get("source") or phw.get("source") or "unknown")
    rows = [
        ("model", f"{model.get('name')} ({model.get('architecture')}; {model.get('num_moe_layers')} "
                  f"MoE layers × {model.get('num_experts')} experts, top-{model.get('top_k')}, "
                  f"{format_bytes(model.get('bytes_per_expert') or 0)} per expert)"),
        ("GPU tuned for", f"{hw.get('gpu_name') or 'none'}"
                + (f", {format_bytes(hw['gpu_memory_bytes'])}" if hw.get("gpu_memory_bytes") else "")
                + (" (the bundled profile's GPU: its timing tables, not a GPU on this machine)"
                   if source.startswith("bundled") else "")),
        ("PCIe", f"Gen{gen} x{width}" if gen and width else "unknown"),
        ("driver / CUDA", f"{hw.get('driver_version') or '—'} / {hw.get('cuda_version') or '—'}"),
        ("torch / transformers", f"{hw.get('torch_version') or '—'} / "
                                 f"{hw.get('transformers_version') or '—'}"),
        ("hardware numbers", "measured on this machine" if source == "measured" else
         f"{source} (a bundled profile, not measured on this machine)"),
        ("timing", str(timing.get("note") or timing.get("kind") or "—")),
        ("routing", f"{routing.get('kind', 'unknown')} ({_cite(routing.get('note') or 'no note')})"),
        ("host CPU", str(phw.get("host_cpu") or "—")),
        ("model fingerprint", str(model.get("fingerprint") or "—")),
        ("profile", str(pmeta.get("profile_id") or tuning.get("profile_dir") or "—")),
        ("ExpertFlow", f"{tuning.get('tool_version', '—')}, run {tuning.get('created_at', '—')}"),
    ]
    timings = tuning.get("timings_s") or {}
    if timings:
        rows.append(("time taken", ", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items())))
    notices = []
    if routing.get("kind") == "synthetic":
        note = _cite(str(routing.get("note") or "Routing is synthetic: no trained router ran").strip())
        notices.append(note.rstrip(".") + ". Hit rates and speeds in this report follow the synthetic "
                       "generator, not this model's real routing.")
    if source.startswith("bundled"):
        notices.append(f"Transfer and kernel times come from the bundled profile '{source}', not "
                       "from this machine.")
    return {"rows": [{"label": k, "value": v} for k, v in rows],
            "synthetic": routing.get("kind") == "synthetic", "notices": notices}


# ---- profile ----------------------------------------------------------------------------------
def activation_heatmap_data(profile) -> dict | None:
    """Activation share per layer x expert, in % of the layer's expert activations."""
    if profile is None or "activation" not in profile.tables:
        return None
    freq = profile.priors() * 100.0  # [L, E]
    return {"z": freq.tolist(), "layers": list(range(freq.shape[0])),
            "experts": list(range(freq.shape[1])), "max_percent": float(freq.max(initial=0.0)),
            "uniform_percent": 100.0 / max(1, freq.shape[1])}


def frequency_distribution_data(profile, slots_per_layer: float | None = None) -> dict | None:
    """Cumulative share of activations vs share of experts, hottest first, per layer.

    The curve at the cache's slots per layer is the hit rate a static cache of the hottest
    experts would reach: a steep curve means a small cache goes far.
    """
    if profile is None or "activation" not in profile.tables:
        return None
    freq = profile.priors()  # [L, E]
    L, E = freq.shape
    sorted_desc = -np.sort(-freq, axis=1)
    cum = np.cumsum(sorted_desc, axis=1)  # [L, E]
    cum = cum / np.maximum(cum[:, -1:], 1e-12)
    x = (np.arange(0, E + 1) / E * 100.0).tolist()  # 0 % of experts carry 0 % of activations

    # experts (hottest first) needed to cover 50/80/95 % of a layer's activations; median over layers
    need = {f"{int(s * 100)}": float(np.median([np.searchsorted(row, s - 1e-9) + 1 for row in cum]))
            for s in (0.5, 0.8, 0.95)} if L else {}
    curves = np.concatenate([np.zeros((L, 1)), cum], axis=1) * 100.0  # [L, E + 1]
    out = {"x_percent": x, "per_layer": curves.tolist(), "mean": curves.mean(axis=0).tolist(),
           "num_experts": E, "experts_needed_median": need, "slots_per_layer": slots_per_layer,
           "static_hit_percent": None}
    if slots_per_layer:
        idx = int(min(E, max(1, round(slots_per_layer)))) - 1
        out["static_hit_percent"] = float(cum[:, idx].mean() * 100.0)
    return out


def transfer_data(profile, bytes_per_expert: int | None = None) -> dict | None:
    """Host->device copy latency and bandwidth vs size, one series per (pinned, concurrency)."""
    if profile is None or "transfer" not in profile.tables:
        return None
    t = profile.tables["transfer"]
    series = []
    for (pinned, conc), g in t.groupby(["pinned", "concurrency"], sort=True):
        g = g.sort_values("bytes")
        series.append({"name": f"{'pinned' if pinned else 'pageable'}, {int(conc)} "
                               f"stream{'s' if int(conc) > 1 else ''}",
                       "pinned": bool(pinned), "concurrency": int(conc),
                       "bytes": g["bytes"].astype(float).tolist(),
                       "mib": (g["bytes"].astype(float) / 2**20).tolist(),
                       "median_ms": g["median_ms"].astype(float).tolist(),
                       "p10_ms": g["p10_ms"].astype(float).tolist(),
                       "p90_ms": g["p90_ms"].astype(float).tolist(),
                       "gbps": g["gbps"].astype(float).tolist()})
    expert = None
    if bytes_per_expert:
        try:
            ms = float(profile.copy_ms(int(bytes_per_expert)))
        except Exception:  # noqa: BLE001 - a table without pinned rows: no marker, no failure
            ms = None
        expert = {"bytes": int(bytes_per_expert), "mib": bytes_per_expert / 2**20, "copy_ms": ms,
                  "gbps": bytes_per_expert / ms / 1e6 if ms else None}
    return {"series": series, "expert": expert}


def kernel_data(profile) -> dict | None:
    """One expert's FFN time vs tokens, and the non-expert part of one decoder layer."""
    if profile is None or "kernel" not in profile.tables:
        return None
    series = []
    for name, label in (("kernel", "one expert's FFN"), ("layer", "non-expert part of one layer")):
        t = profile.tables.get(name)
        if t is None or t.empty:
            continue
        t = t.sort_values("tokens")
        series.append({"name": label, "tokens": t["tokens"].astype(int).tolist(),
                       "median_ms": t["median_ms"].astype(float).tolist(),
                       "p10_ms": t["p10_ms"].astype(float).tolist(),
                       "p90_ms": t["p90_ms"].astype(float).tolist()})
    timing = (getattr(profile, "meta", {}) or {}).get("timing") or {}
    return {"series": series, "timing_kind": timing.get("kind")}


def predictor_data(profile) -> dict | None:
    """Next-gate predictor recall and precision vs lookahead (mean, min and max over layers)."""
    if profile is None or "predictor" not in profile.tables or profile.tables["predictor"].empty:
        return None
    t = profile.tables["predictor"]
    out: dict[str, Any] = {"lookahead": sorted(int(d) for d in t["lookahead"].unique())}
    for col in ("recall", "precision"):
        g = t.groupby("lookahead")[col]
        out[col] = {"mean": (g.mean() * 100).tolist(), "min": (g.min() * 100).tolist(),
                    "max": (g.max() * 100).tolist()}
    return out


# ---- study ------------------------------------------------------------------------------------
def memory_data(tuning: dict) -> dict | None:
    """The budget's terms (they add up to the budget) for a stacked bar, in a readable unit."""
    budget = tuning.get("budget") or {}
    terms = budget.get("terms")
    if not terms:
        return None
    total = float(budget.get("bytes") or sum(float(b) for _, b in terms))
    unit, div = ("GiB", 2**30) if total >= 2**30 else ("MiB", 2**20)
    peak = _num(((tuning.get("chosen") or {}).get("predicted") or {}).get("peak_gpu_bytes"))
    plan = budget.get("plan") or {}
    return {"unit": unit, "budget_text": budget.get("text"), "budget_bytes": total,
            "budget_value": total / div, "peak_value": peak / div if peak is not None else None,
            "terms": [{"label": str(lbl), "bytes": float(b), "value": float(b) / div,
                       "share": float(b) / total if total else 0.0, "text": format_bytes(b)}
                      for lbl, b in terms],
            "sum_bytes": float(sum(float(b) for _, b in terms)),
            "capacity_experts": plan.get("capacity_experts"), "total_experts": plan.get("total_experts")}


QUALITY_COLUMNS = {  # quality table column -> (heading, scale)
    "threshold": ("adaptive-k threshold", 1.0), "min_k": ("min_k", 1.0), "perplexity": ("perplexity", 1.0),
    "perplexity_change": ("perplexity change (%)", 100.0), "kl": ("KL divergence (nats/token)", 1.0),
    "dropped_mass": ("dropped gate mass (%)", 100.0),
}


def quality_data(tuning: dict) -> dict | None:
    """Adaptive-k quality table (threshold -> perplexity change, KL, dropped mass), if measured."""
    q = tuning.get("quality") or {}
    table = q.get("table")
    if not table:
        return None
    cols = [c for c in QUALITY_COLUMNS if any(c in r for r in table)]
    rows = []
    for r in table:
        vals = {c: _num(r.get(c)) for c in cols}
        rows.append({"values": vals, "cells": {c: "—" if vals[c] is None else
                                               f"{vals[c] * QUALITY_COLUMNS[c][1]:.4g}" for c in cols}})
    return {"metric": q.get("metric"), "cap": _num(q.get("cap")), "columns": cols,
            "headings": [QUALITY_COLUMNS[c][0] for c in cols], "rows": rows}


# ---- validation and config --------------------------------------------------------------------
def validation_data(tuning: dict) -> dict | None:
    """Predicted vs measured per validated config and metric, with the relative error."""
    entries = [v for v in tuning.get("validation") or [] if v.get("measured")]
    if not entries:
        return None
    keys = [k for k in METRICS if any(k in (v.get("measured") or {}) for v in entries)]
    rows = []
    for v in entries:
        for k in keys:
            p, m = (v.get("predicted") or {}).get(k), v["measured"].get(k)
            err = (v.get("error") or {}).get(k)
            err = _num(err) if err is not None else relative_error(p, m)
            rows.append({"label": str(v.get("label")), "trial": v.get("trial"), "metric": k,
                         "metric_label": metric_label(k, unit=False), "predicted": _num(p),
                         "measured": _num(m),
                         "predicted_text": format_metric(k, p), "measured_text": format_metric(k, m),
                         "error": err})
    speed = [r for r in rows if r["metric"] == "decode_tokens_per_s"]
    return {"rows": rows, "labels": [r["label"] for r in speed],
            "predicted_speed": [r["predicted"] for r in speed],
            "measured_speed": [r["measured"] for r in speed],
            "speed_error": [r["error"] for r in speed], "note": tuning.get("validation_note")}


def config_data(tuning: dict, config_text: str | None, out_dir: str | os.PathLike | None = None) -> dict:
    """The config.yaml text, its plain-words description, and the exact ef-run command."""
    import yaml

    parsed = None
    if config_text:
        try:
            parsed = yaml.safe_load(config_text)
        except yaml.YAMLError as exc:
            log.warning("config.yaml does not parse (%s); the report shows it as text only", exc)
    cmd = tuning.get("run_command")
    if not cmd:
        where = Path(out_dir).resolve() / "config.yaml" if out_dir is not None else Path("config.yaml")
        cmd = f"ef-run --config {where}"
    return {"yaml": config_text, "description": describe_config(parsed if isinstance(parsed, dict) else None),
            "run_command": cmd, "config": parsed if isinstance(parsed, dict) else None}


def slots_per_layer(config: dict | None) -> float | None:
    """Average GPU slots per MoE layer in a parsed config (None without one)."""
    if not config:
        return None
    m, c = config.get("model") or {}, config.get("cache") or {}
    layers = int(m.get("num_moe_layers") or 0)
    if c.get("per_layer_capacity"):
        return float(np.mean(c["per_layer_capacity"]))
    return float(c.get("capacity_experts", 0)) / layers if layers else None
