"""Activation statistics (tuner.stats) against values counted by hand on a small fixed trace."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from expertflow.errors import DataError
from expertflow.trace import RoutingTrace
from tuner import stats

# 2 sequences (3 + 2 tokens), 2 MoE layers, 4 experts, top-2, lookahead 1.
IDS = np.array([
    # layer 0   layer 1
    [[0, 1], [2, 3]],  # seq 0, pos 0
    [[1, 2], [2, 0]],  # seq 0, pos 1
    [[0, 1], [3, 2]],  # seq 0, pos 2
    [[3, 0], [1, 2]],  # seq 1, pos 0
    [[0, 3], [1, 0]],  # seq 1, pos 1
])
PRED_L0 = np.array([[2, 3], [2, 1], [0, 1], [1, 2], [0, -1]])  # guesses for layer 1 from layer 0


def fixed_trace() -> RoutingTrace:
    N, L, k = IDS.shape
    pred = np.full((N, L, 1, k), -1)
    pred[:, 0, 0] = PRED_L0
    w = np.tile(np.array([0.6, 0.3], np.float32), (N, L, 1))
    return RoutingTrace(ids=IDS.copy(), weights=w, pred=pred, seq=np.array([0, 0, 0, 1, 1]),
                        pos=np.array([0, 1, 2, 0, 1]), steps=np.array([[0, 3, 0], [3, 2, 0]]),
                        meta={"num_experts": 4, "routing": "real"}).validate()


def lookup(df, **where):
    m = np.ones(len(df), bool)
    for k, v in where.items():
        m &= df[k].to_numpy() == v
    return df[m]


def test_activation_counts_and_frequencies():
    a = stats.activation_table(fixed_trace())
    assert len(a) == 8  # every (layer, expert), zeros included
    assert lookup(a, layer=0)["count"].tolist() == [4, 3, 1, 2]
    assert lookup(a, layer=1)["count"].tolist() == [2, 2, 4, 2]
    assert lookup(a, layer=0)["frequency"].tolist() == pytest.approx([0.4, 0.3, 0.1, 0.2])
    assert a.groupby("layer")["frequency"].sum().tolist() == pytest.approx([1.0, 1.0])


def test_coactivation_pairs():
    c = stats.coactivation_table(fixed_trace())
    got = {(r.layer, r.expert_a, r.expert_b): r.count for r in c.itertuples()}
    assert got == {(0, 0, 1): 2, (0, 1, 2): 1, (0, 0, 3): 2,
                   (1, 2, 3): 2, (1, 0, 2): 1, (1, 1, 2): 1, (1, 0, 1): 1}


def test_transitions_probabilities():
    t = stats.transitions_table(fixed_trace())
    got = {(r.expert_from, r.expert_to): r.probability for r in t.itertuples()}
    want = {(0, 2): 3 / 8, (0, 3): 2 / 8, (0, 1): 2 / 8, (0, 0): 1 / 8,
            (1, 2): 3 / 6, (1, 3): 2 / 6, (1, 0): 1 / 6,
            (2, 2): 0.5, (2, 0): 0.5,
            (3, 1): 0.5, (3, 2): 0.25, (3, 0): 0.25}
    assert got.keys() == want.keys()
    for key, p in want.items():
        assert got[key] == pytest.approx(p)
    assert set(t["layer"]) == {0}
    assert t.groupby("expert_from")["probability"].sum().tolist() == pytest.approx([1, 1, 1, 1])


def test_reuse_distances_within_sequences():
    r = stats.reuse_table(fixed_trace())
    got = {(x.layer, x.distance): x.count for x in r.itertuples()}
    assert got == {(0, 1): 4, (0, 2): 1, (1, 1): 3, (1, 2): 1}


def test_predictor_recall_and_precision():
    p = stats.predictor_table(fixed_trace())
    assert len(p) == 1
    row = p.iloc[0]
    assert (row.lookahead, row.layer, row.source_layer) == (1, 1, 0)
    assert row.recall == pytest.approx(6 / 10)
    assert row.precision == pytest.approx(6 / 9)  # one predicted slot is -1
    rec = stats.predictor_recall(fixed_trace())
    assert np.isnan(rec[0, 0]) and rec[0, 1] == pytest.approx(0.6)


def test_traffic_share_top():
    t = fixed_trace()
    assert stats.traffic_share_top(t, 0.25).tolist() == pytest.approx([0.4, 0.4])  # 1 expert
    assert stats.traffic_share_top(t, 0.5).tolist() == pytest.approx([0.7, 0.6])  # 2 experts


def test_lru_hit_rate_hand_counted():
    # layer 0 accesses 0 1 | 1 2 | 0 1 | 3 0 | 0 3 with 2 slots: hits at the 3rd, 9th, 10th
    # layer 1 accesses 2 3 | 2 0 | 3 2 | 1 2 | 1 0: hits at the 3rd, 8th, 9th
    t = fixed_trace()
    assert stats.lru_hit_rate(t, 0.5).tolist() == pytest.approx([0.3, 0.3])
    d = stats.lru_stack_distances(t)
    assert d[:, 0].reshape(-1).tolist() == [-1, -1, 0, -1, 2, 2, -1, 2, 0, 1]
    assert stats.lru_hit_rate(t, 1.0).tolist() == pytest.approx([0.6, 0.6])  # only cold misses


def test_first_expert_repeat():
    assert stats.first_expert_repeat(fixed_trace()).tolist() == pytest.approx([0.0, 2 / 3])


def _reference_lru(ids: np.ndarray, capacity: int) -> np.ndarray:
    N, L, k = ids.shape
    out = np.zeros(L)
    for layer in range(L):
        cache: OrderedDict[int, None] = OrderedDict()
        hits = 0
        for t in range(N):
            for e in ids[t, layer]:
                e = int(e)
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                else:
                    cache[e] = None
                    if len(cache) > capacity:
                        cache.popitem(last=False)
        out[layer] = hits / (N * k)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_lru_matches_an_ordered_dict_lru(seed):
    rng = np.random.default_rng(seed)
    N, L, E, k = 300, 3, 12, 3
    ids = np.stack([np.stack([rng.choice(E, k, replace=False, p=np.r_[[0.3], np.full(E - 1, 0.7 / (E - 1))])
                              for _ in range(L)]) for _ in range(N)])
    t = RoutingTrace(ids, np.ones((N, L, k), np.float32), np.full((N, L, 0, k), -1), np.zeros(N, np.int32),
                     np.arange(N, dtype=np.int32), np.array([[0, N, 0]]), {"num_experts": E}).validate()
    d = stats.lru_stack_distances(t)
    for frac in (0.1, 0.25, 0.5, 0.75):
        cap = max(1, round(frac * E))
        assert stats.lru_hit_rate(t, frac, distances=d) == pytest.approx(_reference_lru(ids, cap))


def test_tables_and_summary_cover_every_profile_table():
    from tuner.profile import REQUIRED_COLUMNS

    tables = stats.routing_tables(fixed_trace())
    for name, df in tables.items():
        assert set(REQUIRED_COLUMNS[name]) <= set(df.columns), name
    s = stats.routing_summary(fixed_trace())
    assert s["top25_traffic_share"] == [0.4, 0.4]
    assert s["predictor_recall"] == {1: 0.6}


def test_errors_are_data_errors():
    t = fixed_trace()
    with pytest.raises(DataError, match="fraction"):
        stats.lru_hit_rate(t, 0.0)
    empty = RoutingTrace(np.zeros((0, 2, 2), np.int64), np.zeros((0, 2, 2), np.float32),
                         np.zeros((0, 2, 1, 2), np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                         np.zeros((0, 3), np.int64), {"num_experts": 4})
    with pytest.raises(DataError, match="no tokens"):
        stats.routing_tables(empty)


def test_stats_and_synthetic_stay_torch_free():
    code = ("import sys, tuner.stats, tuner.synthetic; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
