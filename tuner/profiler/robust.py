"""Timing that survives a busy machine: repeats in rounds, medians, a monotone fit of the token
tables, and a verdict on whether the timing is quiet enough to rank configs (torch-free).

Why. On a loaded CPU one profile measured 132.75 ms per decode layer (0.74-0.96 ms when quiet)
and an expert-kernel table of 13.9 ms at 1 token, 0.14 at 4, 36.3 at 16: every reference was
then predicted at ~0.94 tokens/s and the tuner's choice was arbitrary. Load only ever makes a
measurement slower, and it comes in bursts; so:

* Rounds. Each table is measured in `rounds` passes over all of its sizes (a burst then spoils
  a few rounds of every size instead of every sample of one size), and each value is the median
  of its least-loaded round: every round's median is an upper bound on the quiet median (load
  only adds), so the least of them is the tightest, and it is right as long as one round of R
  was quiet (the median of all samples needs half of them quiet). The decode step is timed the
  same way: the least of its rounds' medians.
* Monotone fit (`upper_fit`, CPU tables). The true cost c(t) of t tokens never falls as t grows
  (one kernel on the CPU), and a measurement m(t) >= c(t) (noise only adds). So every larger
  size is an upper bound, c(t) <= m(t') for t' >= t, and for the experts kernel (tokens are
  independent: t tokens run as ceil(t / t') batches of t') also c(t) <= ceil(t / t') m(t') for
  t' < t. The fit is the least of these bounds: never above the measurement, non-decreasing in
  t (the bound's factor only grows with t), and a lone spike is replaced by its neighbours'
  bound (13.9 / 0.14 / 36.3 above becomes 0.14 / 0.14 / 0.56). The raw median is kept beside it
  (`raw_median_ms`).
* Spread. Every row records its relative IQR, (p75 - p25) / median of its samples, and that of
  its rounds' medians (`round_spread`); the decode step records the relative IQR of its rounds'
  medians.

Criterion (stored as profile.yaml `timing.noise`, shown by ef-tune and the report): the timing
is too noisy to rank configs when any of these holds
  (a) the per-MoE-layer decode time (the slope between two model depths, the cost that sets a
      CPU profile's speed) is uncertain by more than NOISE_REL_IQR: its two steps' IQRs,
      combined, over the difference they measure; or the deeper model did not take longer;
  (b) more than NOISY_ROW_SHARE of the kernel and layer rows have a relative IQR over
      ROW_REL_IQR (sub-millisecond kernels jitter by tens of percent even on a quiet machine);
  (c) the monotone fit had to lower a measured median more than MAX_FIT_RATIO-fold (a larger
      size measured at less than half a smaller one: one of the two was disturbed);
  (d) other processes used more than MAX_OTHERS_CPU of the machine's CPU time while the timing
      ran (`LoadMeter`; sustained load slows every sample alike, which (a)-(c) cannot see).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

NOISE_REL_IQR = 0.25
# Table rows are sub-millisecond CPU kernels: on a quiet 2-core machine their samples spread by a
# relative IQR of 0.02-0.7 (one row 1.7 in 12 quiet runs), under load by 7-500: rows count as
# noisy above 1.0, and the table when more than a quarter of its rows are.
ROW_REL_IQR = 1.0
NOISY_ROW_SHARE = 0.25
MAX_FIT_RATIO = 2.0
MAX_OTHERS_CPU = 0.25
CRITERION = (f"noisy when (a) the per-layer decode time is uncertain by more than {NOISE_REL_IQR:.0%} "
             "(the IQRs of its two decode-step measurements, combined, over their difference), "
             f"(b) more than {NOISY_ROW_SHARE:.0%} of the kernel/layer rows have a relative IQR "
             f"(p75 - p25) / median over {ROW_REL_IQR:.0%}, (c) the monotone fit lowered a "
             f"measured median more than {MAX_FIT_RATIO:g}-fold, or (d) other processes used more than "
             f"{MAX_OTHERS_CPU:.0%} of this machine's CPU time while it was timed (Linux /proc/stat)")


class LoadMeter:
    """The share of this machine's CPU time that other processes used between start and
    `others_share()` (Linux: /proc/stat busy time, steal included, minus this process's own
    /proc/self/stat time); None where /proc cannot be read. Sustained load from others slows
    every measurement alike, so spreads alone cannot see it; this does."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat", encoding="ascii") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(cpu[:3]) + sum(cpu[5:8])  # user nice system, irq softirq steal
        total = busy + cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # + idle iowait
        mine = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
        return busy, total, mine

    def others_share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        others = (end[0] - self.start[0]) - (end[2] - self.start[2])
        return max(0.0, others / (end[1] - self.start[1]))


def rel_iqr(samples) -> float:
    """(p75 - p25) / median of `samples` (0 for a single sample, inf for a zero median)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return 0.0
    med = float(np.median(x))
    iqr = float(np.percentile(x, 75) - np.percentile(x, 25))
    return iqr / med if med > 0 else (0.0 if iqr == 0 else math.inf)


def summarize(samples=None, rounds=None) -> dict[str, float]:
    """The row a table keeps for one measurement: median_ms (the median of its least-loaded
    round when `rounds`, a list of per-round sample arrays, is given; else of `samples`), p10,
    p90 and rel_iqr over all samples, and their count."""
    parts = [np.asarray(r, dtype=np.float64) for r in rounds] if rounds is not None else None
    x = np.concatenate(parts) if parts else np.asarray(samples, dtype=np.float64)
    meds = [float(np.median(r)) for r in parts] if parts else [float(np.median(x))]
    return {"median_ms": min(meds), "p10_ms": float(np.percentile(x, 10)),
            "p90_ms": float(np.percentile(x, 90)), "rel_iqr": rel_iqr(x), "samples": int(x.size),
            "round_spread": rel_iqr(meds)}


def upper_fit(sizes, values, *, subadditive: bool = False) -> np.ndarray:
    """The least upper bound on a non-decreasing cost that every measurement gives (see the
    module docstring); `sizes` ascending. `subadditive` adds ceil(t / t') m(t') for t' < t."""
    t = np.asarray(sizes, dtype=np.float64)
    m = np.asarray(values, dtype=np.float64)
    if t.size and np.any(np.diff(t) <= 0):
        raise ValueError("sizes must be strictly ascending")
    out = np.empty_like(m)
    for i in range(len(m)):
        bound = float(m[i:].min())
        if subadditive and i:
            bound = min(bound, float((np.ceil(t[i] / t[:i]) * m[:i]).min()))
        out[i] = bound
    return out


def fit_table(df: pd.DataFrame, key: str, *, subadditive: bool = False, group=()) -> pd.DataFrame:
    """`df` with `median_ms` replaced by its upper fit over `key` (per `group` of columns) and
    the measured median kept as `raw_median_ms`."""
    out = df.sort_values([*group, key], ignore_index=True).copy()
    out["raw_median_ms"] = out["median_ms"].astype(float)
    parts = [idx for _, idx in out.groupby(list(group), sort=False).indices.items()] if group else [out.index]
    for idx in parts:
        idx = list(idx)
        out.loc[idx, "median_ms"] = upper_fit(out.loc[idx, key].to_numpy(), out.loc[idx, "raw_median_ms"].to_numpy(),
                                              subadditive=subadditive)
    return out


def fit_cpu_tables(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The CPU profile's tables with the monotone fit: kernel over tokens (sub-additive too, per
    kernel name), layer over tokens, transfer over bytes per (pinned, concurrency), its gbps
    recomputed from the fitted time."""
    out = dict(tables)
    out["kernel"] = fit_table(tables["kernel"], "tokens", subadditive=True,
                              group=("kernel",) if "kernel" in tables["kernel"] else ())
    out["layer"] = fit_table(tables["layer"], "tokens")
    t = fit_table(tables["transfer"], "bytes", group=("pinned", "concurrency"))
    t["gbps"] = t["concurrency"] * t["bytes"] / (t["median_ms"].clip(lower=1e-12) * 1e6)
    out["transfer"] = t.sort_values(["pinned", "concurrency", "bytes"], ignore_index=True)
    return out


def slope_spread(small: list[float], deep: list[float], depths: tuple[int, int]) -> tuple[float, float]:
    """(per-layer slope, its relative uncertainty) from two depths' decode-step round medians:
    slope = (least deep - least small) / (deep - small); uncertainty = the two IQRs of the round
    medians combined (root sum of squares) over the difference; inf when the deeper model was
    not slower."""
    s, d = np.asarray(small, dtype=np.float64), np.asarray(deep, dtype=np.float64)
    diff = float(d.min() - s.min())
    slope = diff / (depths[1] - depths[0])
    iqr = math.hypot(*(float(np.percentile(x, 75) - np.percentile(x, 25)) for x in (s, d)))
    return slope, (iqr / diff if diff > 0 else math.inf)


def noise_verdict(tables: dict[str, pd.DataFrame], *, decode_spread: float | None,
                  others_cpu: float | None = None) -> dict:
    """The profile's `timing.noise` record: the numbers behind the criterion and the verdict."""
    spreads = np.concatenate([tables[n]["rel_iqr"].to_numpy(dtype=np.float64) for n in ("kernel", "layer")
                              if n in tables and "rel_iqr" in tables[n]] or [np.zeros(0)])
    over = int((spreads > ROW_REL_IQR).sum())
    ratio = 1.0
    for n in ("kernel", "layer", "transfer"):
        t = tables.get(n)
        if t is not None and "raw_median_ms" in t and len(t):
            ratio = max(ratio, float((t["raw_median_ms"] / t["median_ms"].clip(lower=1e-12)).max()))
    reasons = []
    if decode_spread is not None and not decode_spread <= NOISE_REL_IQR:
        reasons.append("the per-layer decode time did not grow with depth" if math.isinf(decode_spread)
                       else f"the per-layer decode time is uncertain by {decode_spread:.0%}")
    if spreads.size and over > NOISY_ROW_SHARE * spreads.size:
        reasons.append(f"{over} of {spreads.size} kernel/layer rows spread over {ROW_REL_IQR:.0%} (relative IQR)")
    if ratio > MAX_FIT_RATIO:
        reasons.append(f"a measured median was {ratio:.1f}x the monotone fit")
    if others_cpu is not None and others_cpu > MAX_OTHERS_CPU:
        reasons.append(f"other processes used {others_cpu:.0%} of this machine's CPU time while it was timed")
    spread = None if decode_spread is None else (None if math.isinf(decode_spread) else round(decode_spread, 4))
    return {"criterion": CRITERION, "threshold_rel_iqr": NOISE_REL_IQR, "noisy": bool(reasons),
            "reasons": reasons, "decode_layer_spread": spread,
            "rows_over_threshold": over, "rows": int(spreads.size),
            "max_rel_iqr": round(float(spreads.max()), 4) if spreads.size else None,
            "max_fit_ratio": round(ratio, 3),
            "others_cpu_share": None if others_cpu is None else round(float(others_cpu), 4)}
