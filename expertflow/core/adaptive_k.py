"""Adaptive per-token top-k (top-p routing restricted to the router's top-k).

Rule: per token, order its top-k experts by gate weight (ties: the router's order) and keep the
smallest prefix whose weight reaches `threshold` x (the token's top-k mass); never fewer than
`min_k`. threshold = 1.0 keeps every expert (exact top-k). Huang et al., ACL'24 ("top-p routing")
keep the smallest set whose probabilities sum to p; we apply it inside the router's top-k so the
model never runs an expert it would not have run.

Dropped experts get weight 0. With `renormalize`, the kept weights are scaled so they sum to the
token's full top-k mass (the output keeps its scale); without it they stay as the router gave them.

numpy only, float64 arithmetic: the runtime and the simulator call this same function on the same
float32 values, so their decisions agree bit for bit.
"""

from __future__ import annotations

import numpy as np


def keep_mask(weights: np.ndarray, threshold: float, min_k: int = 1) -> np.ndarray:
    """Boolean mask [T, k]: which of each token's top-k experts to keep.

    weights: [T, k] non-negative gate weights of the router's top-k (any order).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be [T, k], got shape {w.shape}")
    t, k = w.shape
    if threshold >= 1.0 or k == 0:
        return np.ones((t, k), dtype=bool)
    pos = np.arange(k)
    wi = w[:, :, None]  # [T, k(i), 1]
    wj = w[:, None, :]  # [T, 1, k(j)]
    # i is "heavier" than j: larger weight, or equal weight and earlier in the router's order.
    heavier = (wi > wj) | ((wi == wj) & (pos[:, None] < pos[None, :]))  # [T, i, j]
    rank = heavier.sum(axis=1)  # [T, k]: how many experts come before j
    mass_before = (heavier * wi).sum(axis=1)  # [T, k]: gate mass of those
    total = w.sum(axis=1, keepdims=True)  # [T, 1]
    return (mass_before < threshold * total) | (rank < min_k)


def apply(weights: np.ndarray, threshold: float, min_k: int = 1,
          renormalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mask [T, k], new float32 weights [T, k]) with dropped weights 0 (and kept ones rescaled)."""
    w = np.asarray(weights, dtype=np.float32)
    mask = keep_mask(w, threshold, min_k)
    out = np.where(mask, w, np.float32(0))
    if renormalize and not mask.all():
        total = w.astype(np.float64).sum(axis=1, keepdims=True)
        kept = out.astype(np.float64).sum(axis=1, keepdims=True)
        scale = np.divide(total, kept, out=np.ones_like(total), where=kept > 0)
        out = (out * scale).astype(np.float32)
    return mask, out


def dropped_mass(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Share of each token's top-k gate mass that adaptive-k dropped, [T]."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1)
    kept = np.where(mask, w, 0.0).sum(axis=1)
    return np.divide(total - kept, total, out=np.zeros_like(total), where=total > 0)


def decide(weights: np.ndarray, threshold: float, min_k: int = 1,
           renormalize: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask [..., k], new float32 weights [..., k], dropped mass share [...]) for any number of
    leading dims: every row is decided on its own, so deciding a whole trace at once gives each
    row exactly what deciding it alone would."""
    w = np.asarray(weights, dtype=np.float32)
    lead, k = w.shape[:-1], w.shape[-1]
    flat = w.reshape(-1, k)
    mask, new_w = apply(flat, threshold, min_k, renormalize)
    dropped = dropped_mass(flat, mask)
    return mask.reshape(*lead, k), new_w.reshape(*lead, k), dropped.reshape(lead)
