"""Synthetic routing, the calibration: fit SyntheticParams to RoutingTargets (or to a real
trace's statistics). See tuner/synthetic/."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from expertflow.errors import DataError
from expertflow.trace import RoutingTrace

from .. import stats
from .generator import _latents, _mm, _structure, _topk_desc, generate
from .targets import RoutingTargets, SyntheticParams, _top1_for_k


# ---- fast measurements used while fitting ---------------------------------------------------
def _iid_logits(p: SyntheticParams, n: int, rng: np.random.Generator, layers) -> np.ndarray:
    """Router logits of n independent tokens for `layers`: [len(layers), n, E]."""
    a, w = _structure(p)
    x = rng.standard_normal((n, p.latent_dim), dtype=np.float32)
    skew = np.asarray(p.skew, np.float32)
    return np.stack([skew[l] * a[l][None, :] + _mm(x, w[l]) for l in layers])


def _shares(p: SyntheticParams, fraction: float, n: int, seed: int) -> np.ndarray:
    logits = _iid_logits(p, n, np.random.default_rng([seed, 2]), range(p.num_layers))
    top = _topk_desc(logits, p.top_k)  # [L, n, k]
    cap = max(1, round(fraction * p.num_experts))
    out = np.empty(p.num_layers)
    for l in range(p.num_layers):
        c = np.sort(np.bincount(top[l].ravel(), minlength=p.num_experts))[::-1]
        out[l] = c[:cap].sum() / c.sum()
    return out


def _top1_share(p: SyntheticParams, n: int, seed: int) -> float:
    layers = list(range(p.num_layers))[:: max(1, p.num_layers // 8)]
    logits = _iid_logits(p, n, np.random.default_rng([seed, 3]), layers) * p.sharpness
    top = np.take_along_axis(logits, _topk_desc(logits, p.top_k), -1)  # [l, n, k] descending
    ez = np.exp(top - top[..., :1])
    return float((1.0 / ez.sum(-1)).mean())


def _recall_at(p: SyntheticParams, distances, n: int, seed: int) -> dict[int, float]:
    """Mean next-gate predictor recall at each lookahead distance (over all valid sources)."""
    rng = np.random.default_rng([seed, 4])
    lp = replace(p, locality=(0.0,) * p.num_layers)
    v = _latents(lp, np.array([n]), rng)[:n]  # [n, L, r] independent tokens
    f = np.float32(p.predictor_fidelity)
    u = f * v + np.float32(math.sqrt(max(0.0, 1 - p.predictor_fidelity ** 2))) * \
        rng.standard_normal(v.shape, dtype=np.float32)
    a, w = _structure(p)
    skew = np.asarray(p.skew, np.float32)
    out = {}
    for d in distances:
        srcs = list(range(p.num_layers - d))
        if not srcs:
            continue
        srcs = srcs[:: max(1, len(srcs) // 6)]
        rec = []
        for s in srcs:
            t = s + d
            true = _topk_desc(skew[t] * a[t] + _mm(v[:, t], w[t]), p.top_k)
            pred = _topk_desc(skew[t] * a[t] + _mm(u[:, s], w[t]), p.top_k)
            rec.append((true[:, :, None] == pred[:, None, :]).any(-1).mean())
        out[d] = float(np.mean(rec))
    return out


# ---- fitting ---------------------------------------------------------------------------------
def _bisect(fn, lo: float, hi: float, target: float, iters: int, increasing: bool = True) -> float:
    """Scalar bisection for fn(x) = target (fn monotone); clamps at the ends."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = fn(mid) > target
        if above == increasing:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def _per_layer(value, L: int, what: str) -> np.ndarray:
    arr = np.full(L, float(value)) if np.isscalar(value) else np.asarray(value, float)
    if arr.shape != (L,):
        raise DataError(f"synthetic target {what} has {arr.size} values for {L} layers")
    return arr


def _sub(p: SyntheticParams, layers: list[int]) -> SyntheticParams:
    """The same knobs and expert structure restricted to `layers` (for cheaper fitting)."""
    return replace(p, num_layers=len(layers), skew=tuple(p.skew[l] for l in layers),
                   locality=tuple(p.locality[l] for l in layers), layer_ids=tuple(layers))


def _spread(L: int, n: int) -> list[int]:
    return sorted(set(np.linspace(0, L - 1, min(n, L)).round().astype(int).tolist()))


def _locality_stats(p: SyntheticParams, fractions, n_seq: int, seq_len: int,
                    seed: int) -> tuple[np.ndarray, float]:
    """(LRU hit [F, L], mean first-expert repeat) on one generated trace."""
    t = generate(p, [seq_len] * n_seq, seed=seed, lookahead=0, with_weights=False)
    d = stats.lru_stack_distances(t)
    lru = np.stack([stats.lru_hit_rate(t, f, distances=d) for f in fractions]) if fractions \
        else np.zeros((0, p.num_layers))
    return lru, float(stats.first_expert_repeat(t).mean())


def _fit_locality(p: SyntheticParams, lru_t: dict, first_repeat: float | None, n_seq: int,
                  seq_len: int, seed: int) -> tuple[SyntheticParams, dict]:
    """Inner: bisection on locality (per layer, or one value) to the primary LRU target (the
    fraction nearest 25%), or to the first-expert repeat rate; outer: persistence on a small
    grid, scored on every LRU fraction and the repeat rate. Scalar targets are fitted on <= 6
    evenly spaced layers (with their own skews) to keep it fast."""
    fr = sorted(lru_t)
    primary = min(fr, key=lambda f: abs(f - 0.25)) if fr else None
    per_layer = primary is not None and not np.isscalar(lru_t[primary])
    layers = list(range(p.num_layers)) if per_layer else _spread(p.num_layers, 6)
    L = len(layers)
    base = _sub(p, layers)
    if not per_layer:
        n_seq = max(1, n_seq // 2)

    def want_at(f: float) -> np.ndarray:
        w = _per_layer(lru_t[f], p.num_layers, "lru_hit")
        return w if per_layer else np.array([w.mean()])

    def inner(q: SyntheticParams) -> SyntheticParams:
        lo, hi = np.zeros(L), np.ones(L)
        for _ in range(9):
            mid = 0.5 * (lo + hi)
            lru, rep = _locality_stats(replace(q, locality=tuple(mid)), [primary] if fr else [],
                                       n_seq, seq_len, seed)
            if fr:
                gap = lru[0] - want_at(primary) if per_layer else np.full(L, lru[0].mean() - want_at(primary)[0])
            else:
                gap = np.full(L, rep - first_repeat)
            hi = np.where(gap > 0, mid, hi)
            lo = np.where(gap > 0, lo, mid)
        return replace(q, locality=tuple(0.5 * (lo + hi)))

    def score(q: SyntheticParams) -> tuple[float, dict]:
        lru, rep = _locality_stats(q, fr, n_seq, seq_len, seed)
        e: dict[str, float] = {}
        sse = 0.0
        for i, f in enumerate(fr):
            gap = lru[i] - want_at(f) if per_layer else np.array([lru[i].mean() - want_at(f)[0]])
            e[f"lru_hit_{f:g}"] = float(gap.mean())
            sse += float((gap ** 2).mean())
        if first_repeat is not None:
            e["first_repeat"] = rep - first_repeat
            sse += e["first_repeat"] ** 2
        return sse, e

    others = len(fr) > 1 or (fr and first_repeat is not None)
    best = None
    for phi in (0.6, 0.8, 0.9, 0.97) if others else (p.persistence,):
        q = inner(replace(base, persistence=phi))
        sse, e = score(q)
        if best is None or sse < best[0]:
            best = (sse, q, e)
    q = best[1]
    loc = q.locality if per_layer else (q.locality[0],) * p.num_layers
    return replace(p, locality=tuple(loc), persistence=q.persistence), best[2]


def calibrate(targets: RoutingTargets, *, num_layers: int, num_experts: int, top_k: int,
              normalize_topk: bool = False, structure_seed: int = 0, preset: str = "custom",
              tokens: int = 4096, seq_len: int = 64, seed: int = 0) -> SyntheticParams:
    """Fit the knobs to `targets` for a model of these dims (see the module docstring).

    Deterministic (common random numbers). Knobs without a target keep their defaults. The
    residuals (achieved - target, means over layers) are in `.fit_error`.
    """
    L, E, k = num_layers, num_experts, top_k
    p = SyntheticParams(L, E, k, skew=(1.0,) * L, locality=(0.5,) * L, normalize_topk=normalize_topk,
                        structure_seed=structure_seed, preset=preset)
    err: dict[str, float] = {}
    # 1. skew, per layer (marginal routing depends on nothing else)
    if targets.traffic_share is not None:
        want = _per_layer(targets.traffic_share, L, "traffic_share")
        lo, hi = np.zeros(L), np.full(L, 8.0)
        n = min(tokens, 2048)
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            got = _shares(replace(p, skew=tuple(mid)), targets.traffic_fraction, n, seed)
            up = got > want
            hi = np.where(up, mid, hi)
            lo = np.where(up, lo, mid)
        p = replace(p, skew=tuple(0.5 * (lo + hi)))
        err["traffic_share"] = float(np.mean(_shares(p, targets.traffic_fraction, n, seed) - want))
    # 2. locality (inner: per layer or one value, to the primary LRU target) and persistence
    #    (outer: a small grid, to the other LRU fractions and the first-expert repeat rate)
    n_seq = max(1, tokens // seq_len)
    lru_t = {float(f): v for f, v in (targets.lru_hit or {}).items()}
    # a cache smaller than one token's k experts says nothing comparable across models
    usable = {f: v for f, v in lru_t.items() if round(f * E) >= k}
    lru_t = usable or ({max(lru_t): lru_t[max(lru_t)]} if lru_t else {})
    if lru_t or targets.first_repeat is not None:
        p, err_loc = _fit_locality(p, lru_t, targets.first_repeat, n_seq, seq_len, seed)
        err.update(err_loc)
    # 3. predictor: (cross_layer, fidelity)
    if targets.predictor_recall and L > 1:
        want_r = {int(d): float(r) for d, r in targets.predictor_recall.items() if int(d) <= L - 1}
        if want_r:
            n = max(512, tokens // 4)
            d0 = min(want_r)
            best = None
            grid = [0.3, 0.5, 0.65, 0.75, 0.82, 0.87, 0.91, 0.94, 0.96, 0.975, 0.985, 0.993]
            for g in grid if len(want_r) > 1 else [0.9]:
                q = replace(p, cross_layer=g)
                f = _bisect(lambda x, q=q: _recall_at(replace(q, predictor_fidelity=x), [d0], n, seed)[d0],
                            0.02, 1.0, want_r[d0], 10)
                q = replace(q, predictor_fidelity=f)
                got_r = _recall_at(q, list(want_r), n, seed)
                sse = sum((got_r[d] - want_r[d]) ** 2 / d for d in want_r)  # near distances count more
                if best is None or sse < best[0]:
                    best = (sse, q, got_r)
            p = best[1]
            err["predictor_recall"] = float(np.mean([best[2][d] - want_r[d] for d in want_r]))
    # 4. weights
    want_w = targets.top1_weight_share if targets.top1_weight_share is not None else _top1_for_k(k)
    if k > 1:
        s = _bisect(lambda x: _top1_share(replace(p, sharpness=x), 2048, seed), 0.02, 30.0, want_w, 16)
        p = replace(p, sharpness=s)
        err["top1_weight_share"] = _top1_share(p, 2048, seed) - want_w
    return replace(p, fit_error=err)


def measure_targets(trace: RoutingTrace, *, per_layer: bool = True) -> RoutingTargets:
    """The statistics of a (real) trace that `calibrate` fits to."""
    share = stats.traffic_share_top(trace, 0.25)
    dist = stats.lru_stack_distances(trace)
    lru = {f: stats.lru_hit_rate(trace, f, distances=dist) for f in (0.25, 0.5)}
    rec = stats.predictor_recall(trace) if trace.lookahead else np.zeros((0, trace.num_layers))
    pred = {i + 1: float(np.nanmean(r)) for i, r in enumerate(rec) if np.isfinite(r).any()}
    return RoutingTargets(
        traffic_fraction=0.25,
        traffic_share=tuple(float(x) for x in share) if per_layer else float(share.mean()),
        lru_hit={f: tuple(float(x) for x in v) if per_layer else float(v.mean()) for f, v in lru.items()},
        predictor_recall=pred or None, top1_weight_share=stats.top1_weight_share(trace),
        source=f"fitted to trace {trace.meta.get('source', '')}".strip())


def fit_to_trace(trace: RoutingTrace, *, per_layer: bool = True, preset: str = "fitted",
                 tokens: int = 4096) -> SyntheticParams:
    """Knobs that make the generator reproduce `trace`'s per-layer skew and locality."""
    seqs = np.bincount(trace.seq - trace.seq.min())
    seq_len = int(np.median(seqs[seqs > 0])) if seqs.any() else 64
    return calibrate(measure_targets(trace, per_layer=per_layer), num_layers=trace.num_layers,
                     num_experts=trace.num_experts, top_k=trace.top_k,
                     normalize_topk=bool(trace.meta.get("normalize_topk", False)), preset=preset,
                     tokens=tokens, seq_len=max(2, seq_len))
