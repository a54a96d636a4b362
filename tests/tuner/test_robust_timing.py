"""Robust CPU timing (tuner/profiler/robust.py): the monotone upper fit, the spread, the noise
verdict, and the CPU profiler on a tiny model with bursts of "load" injected into its clock."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tuner.profiler import robust


def test_upper_fit_removes_the_loaded_kernel_table_of_issue_13():
    """13.9 ms at 1 token, 0.14 at 4, 36.3 at 16 (a loaded CPU). Bounds by hand: c(1) <= m(4),
    c(4) <= m(4), c(16) <= ceil(16 / 4) m(4) = 0.56 (4 batches of 4 tokens)."""
    fit = robust.upper_fit([1, 4, 16], [13.9, 0.14, 36.3], subadditive=True)
    assert fit == pytest.approx([0.14, 0.14, 0.56])
    # without sub-additivity only larger sizes bound a smaller one: the top spike stays
    assert robust.upper_fit([1, 4, 16], [13.9, 0.14, 36.3]) == pytest.approx([0.14, 0.14, 36.3])


def test_upper_fit_keeps_a_clean_table_and_is_monotone_and_below_the_measurements():
    clean = [0.10, 0.11, 0.13, 0.2, 0.45]
    assert robust.upper_fit([1, 4, 16, 64, 256], clean, subadditive=True) == pytest.approx(clean)
    rng = np.random.default_rng(3)
    sizes = [1, 2, 4, 8, 16, 32, 64]
    for _ in range(50):
        m = 0.1 + 0.01 * np.asarray(sizes) + rng.exponential(0.2, len(sizes)) * (rng.random(len(sizes)) < 0.3) * 50
        fit = robust.upper_fit(sizes, m, subadditive=True)
        assert np.all(np.diff(fit) >= -1e-12) and np.all(fit <= m + 1e-12)


def test_rel_iqr_and_summarize():
    assert robust.rel_iqr([1.0, 1.0, 1.0, 1.0]) == 0.0
    # 1, 2, 3, 4, 5: p25 = 2, p75 = 4 (linear interpolation), median 3
    assert robust.rel_iqr([1, 2, 3, 4, 5]) == pytest.approx(2 / 3)
    row = robust.summarize([1, 2, 3, 4, 5])
    assert row["median_ms"] == 3 and row["samples"] == 5 and row["p10_ms"] < row["median_ms"] < row["p90_ms"]
    # rounds: 3 of 5 loaded (50x): the median of all 15 samples is a loaded one, the least-loaded
    # round's median is the quiet value, and the spread says the rounds disagreed
    loaded = robust.summarize(rounds=[[50.0, 51, 52], [1.0, 1.1, 0.9], [50.0, 50, 50], [1.0, 1.0, 1.2], [49.0, 50, 51]])
    assert loaded["median_ms"] == pytest.approx(1.0) and loaded["samples"] == 15
    assert loaded["rel_iqr"] > robust.NOISE_REL_IQR


def test_slope_spread_says_when_the_deeper_model_is_not_slower():
    slope, spread = robust.slope_spread([2.0, 2.0, 2.1], [4.0, 4.1, 4.0], (1, 3))
    assert slope == pytest.approx(1.0) and spread < 0.1  # (least 4.0 - least 2.0) / 2 layers
    assert math.isinf(robust.slope_spread([5.0, 5.0], [4.0, 4.0], (1, 3))[1])


def _tables(spread: float, spike: float = 1.0):
    k = pd.DataFrame({"tokens": [1, 4, 16, 64], "median_ms": [0.1, 0.1 * spike, 0.12, 0.2],
                      "rel_iqr": [spread] * 4, "kernel": ["grouped_mm"] * 4})
    lay = pd.DataFrame({"tokens": [1, 8, 64], "median_ms": [0.05, 0.06, 0.09], "rel_iqr": [spread] * 3})
    tr = pd.DataFrame({"bytes": [1 << 20, 1 << 24], "pinned": [True, True], "concurrency": [1, 1],
                       "median_ms": [0.1, 1.6], "gbps": [10.0, 10.0]})
    return robust.fit_cpu_tables({"kernel": k, "layer": lay, "transfer": tr})


def test_noise_verdict_quiet_and_each_reason():
    quiet = robust.noise_verdict(_tables(0.05), decode_spread=0.05)
    assert quiet["noisy"] is False and quiet["reasons"] == [] and quiet["threshold_rel_iqr"] == robust.NOISE_REL_IQR
    assert "relative IQR" in quiet["criterion"]
    assert not robust.noise_verdict(_tables(0.6), decode_spread=0.05)["noisy"]  # quiet CPU jitter
    spread = robust.noise_verdict(_tables(5.0), decode_spread=0.05)
    assert spread["noisy"] and spread["rows_over_threshold"] == 7 and "rows" in spread["reasons"][0]
    spike = robust.noise_verdict(_tables(0.05, spike=100.0), decode_spread=0.05)
    assert spike["noisy"] and spike["max_fit_ratio"] == pytest.approx(100 * 0.1 / 0.12, rel=1e-3)
    assert robust.noise_verdict(_tables(0.05), decode_spread=0.6)["noisy"]
    flat = robust.noise_verdict(_tables(0.05), decode_spread=math.inf)
    assert flat["noisy"] and "did not grow" in flat["reasons"][0] and flat["decode_layer_spread"] is None


def test_fit_cpu_tables_keeps_the_raw_medians_and_recomputes_bandwidth():
    t = _tables(0.05, spike=100.0)
    k = t["kernel"].set_index("tokens")
    assert k.loc[4, "raw_median_ms"] == pytest.approx(10.0) and k.loc[4, "median_ms"] == pytest.approx(0.12)
    tr = t["transfer"]
    assert tr["gbps"].tolist() == pytest.approx((tr["bytes"] / (tr["median_ms"] * 1e6)).tolist())


def test_cpu_profiler_survives_bursts_of_load_and_says_when_it_was_noisy(monkeypatch):
    """measure_timing on tiny-qwen2-moe with a deterministic stand-in for its clock: a quiet
    kernel takes 0.1 + 0.001 t ms at t tokens, a quiet layer 0.05 + 0.001 t; every 5th timed
    call is a burst (50x), and the kernel at 4 tokens is always 100x slower (sustained). The
    rounds keep the bursts out of every median (a minority of each row's samples), the tables
    stay monotone, the fit replaces the sustained spike by the bound the next size gives, and
    that spike is what the verdict reports."""
    from functools import partial

    from expertflow.registry import resolve_model
    from tuner.profiler import timing

    calls = {"n": 0}

    def kernel_ms(t):
        return 0.1 + 0.001 * t

    def layer_ms(t):
        return 0.05 + 0.001 * t

    def fake(self, fn, *, warmup, reps):
        calls["n"] += 1
        if isinstance(fn, partial) and len(fn.args) == 4:  # run_experts(m, h, slots, w)
            t = fn.args[1].shape[0]
            ms = kernel_ms(t) * (100.0 if t == 4 else 1.0)
        elif isinstance(fn, partial):  # the decoder layer on h [1, t, H]
            ms = layer_ms(fn.args[0].shape[1])
        else:  # a copy
            ms = 0.5
        return np.full(reps, ms * (50.0 if calls["n"] % 5 == 0 else 1.0))

    monkeypatch.setattr(timing._Clock, "times_ms", fake)
    res = timing.measure_timing(resolve_model("tiny-qwen2-moe"), device="cpu", dtype="float32", quick=True,
                                pinned_1gib_gbps=1.0)
    k = res.tables["kernel"].set_index("tokens")
    lay = res.tables["layer"].set_index("tokens")
    for t in lay.index:
        assert lay.loc[t, "median_ms"] == pytest.approx(layer_ms(t)) and lay.loc[t, "samples"] >= 10
    for t in k.index:
        if t != 4:
            assert k.loc[t, "median_ms"] == pytest.approx(kernel_ms(t)), t
    assert k.loc[4, "raw_median_ms"] == pytest.approx(100 * kernel_ms(4))
    nxt = min(t for t in k.index if t > 4)  # the bound a larger size gives (sub-additivity is looser here)
    assert k.loc[4, "median_ms"] == pytest.approx(min(kernel_ms(nxt), 4 * kernel_ms(1)))
    assert np.all(np.diff(k["median_ms"].to_numpy()) >= 0)
    assert res.noise["noisy"] and any("monotone fit" in r for r in res.noise["reasons"])
    assert res.noise["max_fit_ratio"] == pytest.approx(100 * kernel_ms(4) / k.loc[4, "median_ms"], rel=1e-3)


def test_load_meter_sees_another_process_and_the_verdict_says_so():
    import os
    import subprocess
    import sys
    import time

    meter = robust.LoadMeter()
    if meter.start is None:
        pytest.skip("no /proc/stat here (not Linux)")
    # a process that is not our child (a waited-for child's time counts as this process's own)
    loop = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{loop}" &'], check=True, timeout=30)
    time.sleep(1.7)
    share = meter.others_share()
    assert share is not None and share > 0.5 / (os.cpu_count() or 1)  # one busy core of cpu_count
    loaded = robust.noise_verdict(_tables(0.05), decode_spread=0.05, others_cpu=0.6)
    assert loaded["noisy"] and "other processes used 60%" in loaded["reasons"][0]
    assert loaded["others_cpu_share"] == 0.6
    assert not robust.noise_verdict(_tables(0.05), decode_spread=0.05, others_cpu=0.1)["noisy"]
