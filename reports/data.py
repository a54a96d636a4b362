"""The report's numbers: one pure function per figure or section, no plotly.

Inputs are what an ef-tune output folder holds (see reports/folder.py for the loading): the
tuning.json record (`tuner.records.TuningRecord`), a `tuner.profile.Profile`, the Optuna study
(loaded lazily from the record's storage URL and study name) and the config.yaml text. Each
function returns plain data (dicts of lists and numbers, ready for a table or a plotly trace) or
None when its input is absent, so the caller can write one sentence instead of a figure. Tested
without plotly (tests/reports).

This module is the single entry point: the summary's functions (reports/summary_data.py), the
profile's (reports/profile_data.py), the study's (reports/study_data.py) and the metric
formatting (reports/metrics.py) are re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from expertflow.budget import format_bytes
from tuner.profiler import cite_measurements
from tuner.records import TuningRecord

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
from .profile_data import (  # noqa: F401
    activation_heatmap_data,
    frequency_distribution_data,
    kernel_data,
    predictor_data,
    transfer_data,
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
from .summary_data import (  # noqa: F401
    LRU_REFERENCE,
    NOISE_FRACTION,
    summary_data,
    tuning_gain_data,
    verdict_data,
)

log = logging.getLogger(__name__)


# ---- the chosen config in words ---------------------------------------------------------------
def describe_config(config: dict | None, executor: str | None = None) -> list[str]:
    """The chosen RuntimeConfig (parsed config.yaml) in plain sentences, for the executor it
    runs on (tuning.json's `executor`: "graph" or "eager"; None = as the config says)."""
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
    warm = ("; warm start from the profile's hottest experts." if c.get("warm_start") and c.get("priors")
            else "; the cache starts empty and fills as experts are used (no profiled priors).")
    out = [f"Keep {cap:,} of {total:,} routed experts on the GPU{share}: {split}; evict by "
           f"{str(c.get('policy', 'lru')).upper()}" + warm]
    engine = executor or ("graph" if rt.get("engine", "auto") == "graph" or (
        rt.get("engine", "auto") == "auto" and str(rt.get("device", "cuda")).startswith("cuda")) else "eager")
    depth = int(p.get("depth", 0))
    if engine == "graph":
        slots = int(c.get("read_through_slots", 1))
        out.append("Misses are read from pinned host memory inside the captured decode step (zero-copy); "
                   + (f"{slots} read-through slot{'s' if slots > 1 else ''} per layer and step parity admit "
                      "them as they are read (no second copy)." if slots else
                      "none is admitted (bypass): every slot keeps serving hits."))
    elif depth == 0:
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
        how = ("the graph engine (each decode step one CUDA graph replay)" if engine == "graph" else
               f"the eager runtime, experts kernel {rt.get('experts_kernel', 'auto')}")
        out.append(f"Runs in {rt.get('dtype')} on {rt.get('device')} with {how}, "
                   f"{'pinned' if rt.get('pin_memory') else 'pageable'} host memory.")
    return out


# ---- environment ------------------------------------------------------------------------------
def _cite(text: str) -> str:
    """Notes written before the citation fix say "(anchors.md)": cite the measurements instead."""
    return cite_measurements(text)


def environment_data(rec: TuningRecord, profile=None) -> dict:
    """Hardware, versions, provenance rows, and the routing/timing notices."""
    hw, model, routing = rec.hardware, rec.model, rec.routing
    pmeta = profile.meta if profile is not None else None
    phw = pmeta.hardware if pmeta is not None else {}
    timing = pmeta.timing if pmeta is not None else None
    gen, width = hw.pcie_generation, hw.pcie_width
    source = str(hw.source or phw.get("source") or "unknown")
    rows = [
        ("model", f"{model.name} ({model.architecture}; {model.num_moe_layers} "
                  f"MoE layers × {model.num_experts} experts, top-{model.top_k}, "
                  f"{format_bytes(model.bytes_per_expert or 0)} per expert)"),
        ("GPU tuned for", f"{hw.gpu_name or 'none'}"
                + (f", {format_bytes(hw.gpu_memory_bytes)}" if hw.gpu_memory_bytes else "")
                + (" (the bundled profile's GPU: its timing tables, not a GPU on this machine)"
                   if source.startswith("bundled") else "")),
        ("PCIe", f"Gen{gen} x{width}" if gen and width else "unknown"),
        ("driver / CUDA", f"{hw.driver_version or '—'} / {hw.cuda_version or '—'}"),
        ("torch / transformers", f"{hw.torch_version or '—'} / {hw.transformers_version or '—'}"),
        ("hardware numbers", "measured on this machine" if source == "measured" else
         f"{source} (a bundled profile, not measured on this machine)"),
        ("timing", str((timing.note or timing.kind) if timing is not None else "—")),
        ("routing", f"{routing.kind} ({_cite(routing.note or 'no note')})"),
        ("host CPU", str(phw.get("host_cpu") or "—")),
        ("model fingerprint", str(model.fingerprint or "—")),
        ("profile", str(pmeta.profile_id if pmeta is not None else rec.profile_dir or "—")),
        ("ExpertFlow", f"{rec.tool_version}, run {rec.created_at}"),
    ]
    if rec.timings_s:
        rows.append(("time taken", ", ".join(f"{k} {float(v):.1f} s" for k, v in rec.timings_s.items())))
    notices = []
    if routing.kind == "synthetic":
        note = _cite(str(routing.note or "Routing is synthetic: no trained router ran").strip())
        notices.append(note.rstrip(".") + ". Hit rates and speeds in this report follow the synthetic "
                       "generator, not this model's real routing.")
    if source.startswith("bundled"):
        notices.append(f"Transfer and kernel times come from the bundled profile '{source}', not "
                       "from this machine.")
    return {"rows": [{"label": k, "value": v} for k, v in rows],
            "synthetic": routing.kind == "synthetic", "notices": notices}


# ---- study ------------------------------------------------------------------------------------
def memory_data(rec: TuningRecord) -> dict | None:
    """The budget's terms (they add up to the budget) for a stacked bar, in a readable unit."""
    budget = rec.budget
    terms = budget.terms
    if not terms:
        return None
    total = float(budget.bytes or sum(float(b) for _, b in terms))
    unit, div = ("GiB", 2**30) if total >= 2**30 else ("MiB", 2**20)
    peak = _num(rec.chosen.predicted.get("peak_gpu_bytes"))
    plan = budget.plan
    return {"unit": unit, "budget_text": budget.text, "budget_bytes": total,
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


def quality_data(rec: TuningRecord) -> dict | None:
    """Adaptive-k quality table (threshold -> perplexity change, KL, dropped mass), if measured."""
    q = rec.quality
    table = q.table
    if not table:
        return None
    cols = [c for c in QUALITY_COLUMNS if any(c in r for r in table)]
    rows = []
    for r in table:
        vals = {c: _num(r.get(c)) for c in cols}
        rows.append({"values": vals, "cells": {c: "—" if vals[c] is None else
                                               f"{vals[c] * QUALITY_COLUMNS[c][1]:.4g}" for c in cols}})
    return {"metric": q.metric, "cap": _num(q.cap), "columns": cols,
            "headings": [QUALITY_COLUMNS[c][0] for c in cols], "rows": rows}


# ---- validation and config --------------------------------------------------------------------
def validation_data(rec: TuningRecord) -> dict | None:
    """Predicted vs measured per validated config and metric, with the relative error."""
    entries = [v for v in rec.validation if v.measured]
    if not entries:
        return None
    keys = [k for k in METRICS if any(k in v.measured for v in entries)]
    rows = []
    for v in entries:
        for k in keys:
            p, m = (v.predicted or {}).get(k), v.measured.get(k)
            err = (v.error or {}).get(k)
            err = _num(err) if err is not None else relative_error(p, m)
            rows.append({"label": v.label, "trial": v.trial, "metric": k,
                         "metric_label": metric_label(k, unit=False), "predicted": _num(p),
                         "measured": _num(m),
                         "predicted_text": format_metric(k, p), "measured_text": format_metric(k, m),
                         "error": err})
    speed = [r for r in rows if r["metric"] == "decode_tokens_per_s"]
    return {"rows": rows, "labels": [r["label"] for r in speed],
            "predicted_speed": [r["predicted"] for r in speed],
            "measured_speed": [r["measured"] for r in speed],
            "speed_error": [r["error"] for r in speed], "note": rec.validation_note}


def config_data(rec: TuningRecord, config_text: str | None, out_dir: str | os.PathLike | None = None) -> dict:
    """The config.yaml text, its plain-words description, and the exact ef-run command."""
    import yaml

    parsed = None
    if config_text:
        try:
            parsed = yaml.safe_load(config_text)
        except yaml.YAMLError as exc:
            log.warning("config.yaml does not parse (%s); the report shows it as text only", exc)
    cmd = rec.run_command
    if not cmd:
        where = Path(out_dir).resolve() / "config.yaml" if out_dir is not None else Path("config.yaml")
        cmd = f"ef-run --config {where}"
    return {"yaml": config_text,
            "description": describe_config(parsed if isinstance(parsed, dict) else None, rec.executor),
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
