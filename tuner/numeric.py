"""Small numeric rules shared by the profile, the simulator, validation and the report.

Torch-free and free of the project's other modules, so every layer above can import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def piecewise_linear(xs: Sequence[float] | np.ndarray, ys: Sequence[float] | np.ndarray, x: float) -> float:
    """y at `x` in a measured table (xs, ys), never < 0. The one interpolation rule of the tuner
    (`tuner.profile.interpolate` and `tuner.simulator.Costs` both charge through it):

    * below the first point: flat, y of the smallest x measured. The tables are costs against
      a token count (kernel, layer) or a copy size in bytes; below the smallest count or size
      measured, the time is the fixed launch / latency floor, which does not fall with fewer
      tokens or bytes. Extrapolating the first segment's slope downwards would price a step
      or a copy smaller than any measured as (nearly) free, or negative, and steer the tuner
      toward what was never measured.
    * inside: linear between the two neighbouring points.
    * above the last point: linear extrapolation of the last segment. Past the largest
      measurement the cost keeps growing with tokens or bytes (compute- or bandwidth-bound);
      holding it flat would price a long prefill or a big copy as cheap as the largest measured.

    A single point is a constant. The points are taken in ascending x (a stable sort, so the
    order of equal xs is the caller's). An empty table is a ValueError."""
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    if xs.size == 0 or xs.size != ys.size:
        raise ValueError(f"interpolation table needs as many xs as ys and at least one point "
                         f"(got {xs.size} xs, {ys.size} ys)")
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    if xs.size == 1 or x <= xs[0]:
        y = ys[0]
    elif x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-12)
        y = ys[-1] + slope * (x - xs[-1])
    else:
        y = np.interp(x, xs, ys)
    return float(max(0.0, y))


def relative_error(predicted: object, measured: object) -> float | None:
    """(measured - predicted) / |predicted|: how far a measurement is from its prediction. None
    when either is missing, not a number or not finite, or the prediction is 0. The one
    definition for validation (`tuner.validate`), the report and the GPU bench."""
    p, m = _finite(predicted), _finite(measured)
    if p is None or m is None or p == 0:
        return None
    return (m - p) / abs(p)


def _finite(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None
