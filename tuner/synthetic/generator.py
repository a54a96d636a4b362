"""Synthetic routing, the generator: a routing trace from SyntheticParams. See tuner/synthetic/."""

from __future__ import annotations

import math

import numpy as np

from expertflow.errors import DataError
from expertflow.trace import PREFILL, RoutingTrace

from .targets import LOOKAHEAD, SyntheticParams

_STRUCT_SALT = 0x5EED  # structure (a, w) and sampling draw from different streams


# ---- generation -----------------------------------------------------------------------------
def _structure(p: SyntheticParams) -> tuple[np.ndarray, np.ndarray]:
    """Popularity a [L, E] and latent directions w [L, r, E]; layer l's draw depends only on
    (structure_seed, E, r, l)."""
    a = np.empty((p.num_layers, p.num_experts), np.float32)
    w = np.empty((p.num_layers, p.latent_dim, p.num_experts), np.float32)
    for layer in range(p.num_layers):
        lid = p.layer_ids[layer] if p.layer_ids is not None else layer
        rng = np.random.default_rng([p.structure_seed, _STRUCT_SALT, p.num_experts, p.latent_dim, lid])
        a[layer] = rng.standard_normal(p.num_experts)
        w[layer] = rng.standard_normal((p.latent_dim, p.num_experts)) / math.sqrt(p.latent_dim)
    return a, w


def _starts(seq_lens: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(seq_lens)[:-1]]).astype(np.int64)


def _cross_layer(p: SyntheticParams, n: int, rng: np.random.Generator) -> np.ndarray:
    """z [n, L, r]: unit Gaussian, corr(z[:, l], z[:, l+1]) = cross_layer, independent tokens."""
    g = np.float32(p.cross_layer)
    gs = np.float32(math.sqrt(1.0 - p.cross_layer ** 2))
    z = rng.standard_normal((n, p.num_layers, p.latent_dim), dtype=np.float32)
    for layer in range(1, p.num_layers):
        z[:, layer] = g * z[:, layer - 1] + gs * z[:, layer]
    return z


def _latents(p: SyntheticParams, seq_lens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """v [N, L, r] = sqrt(locality) * persistent + sqrt(1 - locality) * fresh (per layer)."""
    N = int(seq_lens.sum())
    fresh = _cross_layer(p, N, rng)
    rho = np.asarray(p.locality, dtype=np.float32)[None, :, None]  # [1, L, 1]
    if not np.any(rho):
        return fresh
    slow = _cross_layer(p, N, rng)
    phi = np.float32(p.persistence)
    phis = np.float32(math.sqrt(1.0 - p.persistence ** 2))
    starts = _starts(seq_lens)
    for pos in range(1, int(seq_lens.max())):
        idx = starts[seq_lens > pos] + pos
        slow[idx] = phi * slow[idx - 1] + phis * slow[idx]  # rows idx-1 are already final
    return np.sqrt(rho) * slow + np.sqrt(1.0 - rho) * fresh


def _mm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[n, r] x [r, E] without BLAS: r is tiny, and a threaded BLAS on a busy machine is ~100x
    slower than this for such shapes."""
    return np.einsum("nr,re->ne", x, w)


def _topk_desc(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of the last axis, in descending order."""
    part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(logits, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1)


def generate(params: SyntheticParams, seq_lens, *, seed: int = 0, lookahead: int = LOOKAHEAD,
             meta: dict | None = None, with_weights: bool = True) -> RoutingTrace:
    """A synthetic RoutingTrace with one prefill step per sequence of the given lengths.

    `seed` draws the tokens (the experts' structure comes from params.structure_seed).
    `with_weights=False` leaves the gate weights at 0 (faster; used while calibrating).
    """
    p = params
    seq_lens = np.asarray(list(seq_lens), dtype=np.int64)
    if seq_lens.size == 0 or (seq_lens < 1).any():
        raise DataError(f"synthetic routing needs sequences of >= 1 token; got lengths {seq_lens[:8].tolist()}")
    N, L, E, k, D = int(seq_lens.sum()), p.num_layers, p.num_experts, p.top_k, lookahead
    rng = np.random.default_rng([seed, 1])
    a, w = _structure(p)
    v = _latents(p, seq_lens, rng)  # [N, L, r]
    ids = np.empty((N, L, k), np.int64)
    weights = np.zeros((N, L, k), np.float32)
    skew = np.asarray(p.skew, np.float32)
    for layer in range(L):
        logits = skew[layer] * a[layer][None, :] + _mm(v[:, layer], w[layer])  # [N, E]
        top = _topk_desc(logits, k)  # [N, k]
        ids[:, layer] = top
        if not with_weights:
            continue
        z = p.sharpness * logits
        z -= z.max(-1, keepdims=True)
        ez = np.exp(z)
        wt = np.take_along_axis(ez, top, -1) / ez.sum(-1, keepdims=True)  # [N, k]
        if p.normalize_topk:
            wt /= wt.sum(-1, keepdims=True)
        weights[:, layer] = wt
    pred = np.full((N, L, D, k), -1, np.int64)
    if D and L > 1:
        f = np.float32(p.predictor_fidelity)
        noise = rng.standard_normal(v.shape, dtype=np.float32)
        u = f * v + np.float32(math.sqrt(max(0.0, 1.0 - p.predictor_fidelity ** 2))) * noise
        for src in range(L - 1):
            for d in range(1, min(D, L - 1 - src) + 1):
                tgt = src + d
                logits = skew[tgt] * a[tgt][None, :] + _mm(u[:, src], w[tgt])
                pred[:, src, d - 1] = _topk_desc(logits, k)
    seq = np.repeat(np.arange(len(seq_lens)), seq_lens).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in seq_lens]).astype(np.int32)
    steps = np.stack([_starts(seq_lens), seq_lens, np.full(len(seq_lens), PREFILL)], 1).astype(np.int64)
    m = {"routing": "synthetic", "num_layers": L, "num_experts": E, "top_k": k, "lookahead": D,
         "source": f"synthetic generator, preset {p.preset}", "synthetic": p.as_dict(), **(meta or {})}
    return RoutingTrace(ids, weights, pred, seq, pos, steps, m).validate("synthetic trace")
