"""The adaptive-k rule: smallest prefix of the top-k (by weight) reaching the threshold."""

import numpy as np
import pytest

from expertflow.core.adaptive_k import apply, decide, dropped_mass, keep_mask


def test_threshold_one_keeps_every_expert():
    w = np.array([[0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    assert keep_mask(w, 1.0).all()


def test_smallest_prefix_reaching_threshold():
    w = np.array([[0.5, 0.25, 0.125, 0.125]])  # exact binary fractions, top-k mass 1.0
    assert keep_mask(w, 0.75).tolist() == [[True, True, False, False]]  # 0.5 + 0.25 reaches 0.75
    assert keep_mask(w, 0.76).tolist() == [[True, True, True, False]]
    assert keep_mask(w, 0.5).tolist() == [[True, False, False, False]]
    assert keep_mask(w, 0.1).tolist() == [[True, False, False, False]]


def test_threshold_is_relative_to_the_topk_mass():
    # Qwen1.5-MoE does not renormalise: top-k weights sum to < 1. The rule uses their sum.
    w = np.array([[0.25, 0.125, 0.0625, 0.0625]])  # mass 0.5
    assert keep_mask(w, 0.75).tolist() == [[True, True, False, False]]


def test_order_does_not_matter_and_ties_follow_router_order():
    w = np.array([[0.125, 0.5, 0.125, 0.25]])
    assert keep_mask(w, 0.75).tolist() == [[False, True, False, True]]
    tie = np.array([[0.25, 0.25, 0.25, 0.25]])
    assert keep_mask(tie, 0.5).tolist() == [[True, True, False, False]]


def test_min_k_is_a_floor():
    w = np.array([[0.97, 0.01, 0.01, 0.01]])
    assert keep_mask(w, 0.5, min_k=1).sum() == 1
    assert keep_mask(w, 0.5, min_k=3).tolist() == [[True, True, True, False]]


def test_apply_zeroes_dropped_and_optionally_renormalises():
    w = np.array([[0.5, 0.25, 0.125, 0.125]], dtype=np.float32)
    mask, out = apply(w, 0.75)
    assert out.tolist() == [[0.5, 0.25, 0.0, 0.0]]
    mask, out = apply(w, 0.75, renormalize=True)
    assert out.sum() == pytest.approx(1.0)
    assert out[0, 0] / out[0, 1] == pytest.approx(2.0)
    assert dropped_mass(w, mask).tolist() == pytest.approx([0.25])


def test_random_rows_satisfy_the_definition():
    rng = np.random.default_rng(0)
    w = rng.random((500, 6))
    for thr in (0.3, 0.6, 0.9):
        m = keep_mask(w, thr, min_k=1)
        for row, keep in zip(w, m):
            order = np.argsort(-row, kind="stable")
            kept = keep[order]
            n = int(kept.sum())
            assert kept[:n].all() and not kept[n:].any()  # a prefix by weight
            csum = np.cumsum(row[order])
            assert csum[n - 1] >= thr * row.sum() - 1e-12  # it reaches the threshold
            if n > 1:
                assert csum[n - 2] < thr * row.sum()  # and is the smallest that does


@pytest.mark.parametrize("renormalize", [False, True])
def test_deciding_many_rows_at_once_equals_deciding_each_alone(renormalize):
    """The simulator decides a whole trace [N, L, k] in one call; the runtime decides one layer
    visit [T, k] at a time. Both must give every row the same bits."""
    rng = np.random.default_rng(3)
    w = rng.dirichlet(np.ones(8), size=(50, 3)).astype(np.float32)[..., :4]  # [N, L, k]
    w[7, 1] = [0.25, 0.25, 0.25, 0.25]  # ties
    mask, new_w, dropped = decide(w, 0.7, 2, renormalize)
    assert mask.shape == (50, 3, 4) and new_w.dtype == np.float32 and dropped.shape == (50, 3)
    for n in range(50):
        for layer in range(3):
            m1, w1 = apply(w[n, layer][None], 0.7, 2, renormalize)
            assert np.array_equal(mask[n, layer], m1[0])
            assert new_w[n, layer].tobytes() == w1[0].tobytes()
            assert dropped[n, layer].tobytes() == dropped_mass(w[n, layer][None], m1)[0].tobytes()
    assert not mask.all() and mask.sum(axis=-1).min() >= 2
