"""One interpolation rule for the profile's tables and the simulator's costs (issue 12): flat
below the first point, linear inside, linear extrapolation past the last, never < 0. Both
callers charge the same number at every x."""

from __future__ import annotations

import pandas as pd
import pytest

from tuner.numeric import piecewise_linear
from tuner.profile import TimingTables, interpolate
from tuner.simulator import Costs

TOKENS = (2, 4, 8)
MS = (1.0, 2.0, 3.0)
FALLING = (3.0, 2.0, 1.0)

# x: expected y for TOKENS -> MS (below, on the first point, inside, on the last, above)
EXPECTED = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.5, 6: 2.5, 8: 3.0, 16: 5.0}


def _table(ys) -> pd.DataFrame:
    return pd.DataFrame({"tokens": list(TOKENS), "median_ms": list(ys), "p10_ms": list(ys), "p90_ms": list(ys)})


def _callers(ys):
    """y(x) through the profile and through the simulator's costs (GPU share 1: the table as is)."""
    prof = TimingTables({"kernel": _table(ys), "layer": _table(ys)})
    pairs = tuple(zip(TOKENS, ys))
    costs = Costs(copy_ms=1.0, layer_ms=pairs, kernel_ms=pairs, host_layer_ms=1.0, gpu_share_decode=1.0)
    return {
        "profile.interpolate": lambda x: interpolate(_table(ys), "tokens", x),
        "profile.expert_kernel_ms": prof.expert_kernel_ms,
        "profile.layer_ms": prof.layer_ms,
        "costs.kernel": lambda x: costs.kernel(x),
        "costs.layer": costs.layer,
    }


@pytest.mark.parametrize("x,expected", sorted(EXPECTED.items()))
def test_below_inside_above_the_table_both_callers_agree(x, expected):
    got = {name: f(x) for name, f in _callers(MS).items()}
    assert got == {name: pytest.approx(expected) for name in got}
    assert piecewise_linear(TOKENS, MS, x) == pytest.approx(expected)


def test_never_below_zero_and_flat_below_on_a_falling_table():
    callers = _callers(FALLING)
    for f in callers.values():
        assert f(0) == pytest.approx(3.0)  # flat below: not extrapolated up to 3.5
        assert f(12) == pytest.approx(0.0)  # extrapolated to 1 - 0.25 * 4 = 0
        assert f(100) == 0.0  # would be negative


def test_single_point_unsorted_and_empty():
    assert piecewise_linear([5], [2.0], 0) == piecewise_linear([5], [2.0], 50) == 2.0
    assert piecewise_linear([8, 2, 4], [3.0, 1.0, 2.0], 3) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        piecewise_linear([], [], 1.0)
