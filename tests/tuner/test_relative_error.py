"""One relative error (issue 12): (measured - predicted) / |predicted|, None where undefined,
used by validation, the report, the adaptive-k count check and the GPU bench."""

from __future__ import annotations

import math

import pytest

from reports import data, metrics
from tuner import adaptive_trace, validate
from tuner.numeric import relative_error


def test_the_definition():
    assert relative_error(10.0, 9.3) == pytest.approx(-0.07)
    assert relative_error(-2.0, -1.0) == pytest.approx(0.5)  # over |predicted|
    assert relative_error("4", 5) == pytest.approx(0.25)  # numbers as text count (tuning.json)
    for p, m in [(0.0, 1.0), (None, 1.0), (1.0, None), (math.nan, 1.0), (1.0, math.inf), ("x", 1.0)]:
        assert relative_error(p, m) is None


def test_one_function_everywhere():
    assert metrics.relative_error is relative_error and data.relative_error is relative_error
    pred = {"decode_tokens_per_s": 10.0, "hit_rate": 0.0, "prefill_ms": math.nan, "bytes_per_token": 4.0}
    meas = {"decode_tokens_per_s": 9.3, "hit_rate": 0.5, "prefill_ms": 3.0}
    assert validate.relative_errors(pred, meas) == {"decode_tokens_per_s": pytest.approx(-0.07)}


def test_count_error_is_its_magnitude_against_the_rerecorded_count():
    assert adaptive_trace._rel(9.0, 10.0) == pytest.approx(0.1)
    assert adaptive_trace._rel(11.0, 10.0) == pytest.approx(0.1)
    assert adaptive_trace._rel(0.0, 0.0) == 0.0
    assert adaptive_trace._rel(3.0, 0.0) == math.inf
