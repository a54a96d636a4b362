"""The profile's numbers for the report: expert activation, its frequency distribution, the
host-to-GPU transfer, the expert kernel and the next-gate predictor. Pure functions over a
`tuner.profile.Profile` (no plotly); each returns None when its table is absent. Re-exported by
reports.data."""

from __future__ import annotations

from typing import Any

import numpy as np


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
    return {"series": series, "timing_kind": profile.meta.timing.kind}


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
