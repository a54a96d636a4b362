"""Metric keys of the simulator, their units, and how the report formats them (no plotly)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from expertflow.budget import format_bytes
from tuner.numeric import relative_error  # noqa: F401 - re-exported: the one definition


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str  # shown after the number; "bytes" = adaptive B/KiB/MiB/GiB
    scale: float = 1.0  # multiply the raw value by this before showing it
    digits: int = 2
    better: str | None = None  # "higher" | "lower" | None


#: The simulator's metric keys (tuner.simulator.METRIC_KEYS) and how the report shows them.
METRICS: dict[str, Metric] = {
    "decode_tokens_per_s": Metric("decode speed", "tokens/s", 1.0, 2, "higher"),
    "hit_rate": Metric("cache hit rate", "%", 100.0, 1, "higher"),
    "stall_ms_per_token": Metric("stall", "ms/token", 1.0, 3, "lower"),
    "peak_gpu_bytes": Metric("peak GPU memory", "bytes", 1.0, 2, "lower"),
    "quality_loss": Metric("quality loss", "%", 100.0, 2, "lower"),
    "prefill_ms": Metric("prefill time", "ms", 1.0, 1, "lower"),
    "bytes_per_token": Metric("host→GPU traffic", "bytes/token", 1.0, 2, "lower"),
    "activated_per_token": Metric("experts run per token", "experts/token", 1.0, 2, None),
    "dropped_mass_per_token": Metric("dropped gate mass", "% of top-k mass", 100.0, 2, "lower"),
    "prefetch_precision": Metric("prefetch precision", "%", 100.0, 1, "higher"),
}
SUMMARY_METRICS = ("decode_tokens_per_s", "hit_rate", "stall_ms_per_token", "peak_gpu_bytes",
                   "quality_loss", "prefill_ms")
#: |relative error| of a validated prediction below which the report calls it close.
VALIDATION_OK_ERROR = 0.15


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metric_label(key: str, unit: bool = True) -> str:
    """'decode speed (tokens/s)' for an axis; `unit=False` for a table whose cells carry units."""
    m = METRICS.get(key)
    if m is None:
        return key.replace("_", " ")
    return f"{m.label} ({m.unit})" if unit else m.label


def format_metric(key: str, value: Any) -> str:
    """'41.20 tokens/s', '87.5 %', '21.30 GiB'; '—' for a missing value."""
    v = _num(value)
    if v is None:
        return "—"
    m = METRICS.get(key, Metric(key, "", 1.0, 3))
    if m.unit == "bytes":
        return format_bytes(v)
    if m.unit == "bytes/token":
        return f"{format_bytes(v)}/token"
    shown = v * m.scale
    return f"{shown:,.{m.digits}f} {m.unit}".rstrip()
