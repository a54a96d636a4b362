"""Activation statistics of a routing trace (torch-free): the profile's routing tables and the
headline routing figures.

Shape legend: N = tokens in the trace, L = MoE layers, E = experts per layer, k = top-k,
D = predictor lookahead distances.

Definitions (the exact ones; tests pin them):

* activation    per (layer, expert): `count` = token-expert pairs routed to it; `frequency` =
                count / (N k), so each layer's frequencies sum to 1. Every expert has a row.
* coactivation  per layer, unordered pair a < b: tokens whose top-k holds both. Zero rows dropped.
* transitions   per layer l < L-1, (expert_from at l, expert_to at l+1) over the same token,
                every one of the k x k pairs counted once: `count`; `probability` =
                count / (k x tokens that chose expert_from at l), so each row sums to 1 (multiply
                by k for the chance that expert_to is among layer l+1's top-k). Zero rows dropped.
* reuse         per layer, distance d >= 1: how often an expert chosen by the token at position p
                was next chosen in the same layer and sequence by the token at position p + d.
* predictor     per lookahead d = 1..D and target layer l + d (column `layer`; `source_layer` is
                l): `recall` = share of the true top-k of layer l+d that the next-gate predictor
                (gate of l+d applied to the hidden state entering layer l, top-k) named;
                `precision` = share of the predicted experts that were true.

Routing figures of the pydocs-moe README, reproduced exactly (see tests/tuner/test_profiler.py):

* `traffic_share_top(trace, fraction)`: per layer, the share of token-expert pairs that go to
  the busiest round(fraction x E) experts (at least 1).
* `lru_hit_rate(trace, fraction)`: per layer, an LRU cache of round(fraction x E) experts (at
  least 1), cold at the start, one cache per layer kept across sequences; every token-expert
  pair is one access, in trace order and, within a token, in the router's order (descending
  weight); the hit rate is hits / accesses. (Counting a token's k experts as one batch instead,
  or resetting the cache per sequence, gives numbers 0.01-0.04 off the README's.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from expertflow.errors import DataError
from expertflow.trace import RoutingTrace

DEFAULT_FRACTION = 0.25


def _capacity(num_experts: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"cache/traffic fraction {fraction!r} must be in (0, 1]; e.g. 0.25")
    return max(1, round(fraction * num_experts))


def _nonempty(trace: RoutingTrace) -> None:
    if trace.num_tokens == 0:
        raise DataError("routing trace has no tokens; profile with a non-empty prompt set")


# ---- headline figures ------------------------------------------------------------------------
def expert_counts(trace: RoutingTrace) -> np.ndarray:
    """Token-expert pairs per (layer, expert): [L, E] int64."""
    L, E = trace.num_layers, trace.num_experts
    flat = (np.arange(L)[None, :, None] * E + trace.ids).reshape(-1)  # [N*L*k]
    return np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.int64)


def traffic_share_top(trace: RoutingTrace, fraction: float = DEFAULT_FRACTION) -> np.ndarray:
    """[L] share of each layer's token-expert pairs that go to its busiest `fraction` of experts."""
    _nonempty(trace)
    n = _capacity(trace.num_experts, fraction)
    counts = -np.sort(-expert_counts(trace), axis=1)  # [L, E] descending
    return counts[:, :n].sum(1) / np.maximum(counts.sum(1), 1)


def lru_stack_distances(trace: RoutingTrace) -> np.ndarray:
    """LRU stack distance of every access: [N, L, k] int64, -1 for a first access.

    An access is a hit in an LRU cache of C experts iff 0 <= distance < C (the number of other
    experts touched since this expert's last access). Accesses run in trace order and, within a
    token, in the router's order; one stack per layer. Vectorised: per layer, the running
    "last access time" of every expert is a cumulative max over a [accesses, E] matrix (in
    chunks), and the distance is how many experts were touched after this one's last access.
    """
    N, L, k = trace.ids.shape
    E = trace.num_experts
    out = np.empty((N, L, k), dtype=np.int64)
    T = N * k
    chunk = max(1, (1 << 22) // max(E, 1))
    for layer in range(L):
        acc = trace.ids[:, layer, :].reshape(-1)  # [T] accesses in order
        dist = np.empty(T, dtype=np.int64)
        last = np.full(E, -1, dtype=np.int64)  # last access time before the chunk
        for c0 in range(0, T, chunk):
            e = acc[c0:c0 + chunk]
            n = len(e)
            times = np.arange(c0, c0 + n)
            m = np.full((n + 1, E), -1, dtype=np.int64)  # row i: last times before access i
            m[0] = last
            m[np.arange(1, n + 1), e] = times
            np.maximum.accumulate(m, axis=0, out=m)
            before = m[:-1]  # [n, E]
            prev = before[np.arange(n), e]  # [n]
            d = (before > prev[:, None]).sum(1)
            dist[c0:c0 + n] = np.where(prev >= 0, d, -1)
            last = m[-1]
        out[:, layer, :] = dist.reshape(N, k)
    return out


def lru_hit_rate(trace: RoutingTrace, fraction: float = DEFAULT_FRACTION, *,
                 distances: np.ndarray | None = None) -> np.ndarray:
    """[L] hit rate of a per-layer LRU cache holding `fraction` of the experts (definition above).

    Pass `distances` (from `lru_stack_distances`) to evaluate several fractions cheaply.
    """
    _nonempty(trace)
    cap = _capacity(trace.num_experts, fraction)
    d = lru_stack_distances(trace) if distances is None else distances
    hits = (d >= 0) & (d < cap)  # [N, L, k]
    return hits.mean(axis=(0, 2))


def first_expert_repeat(trace: RoutingTrace) -> np.ndarray:
    """[L] share of tokens whose first (highest-weight) expert equals the previous token's in the
    same sequence (Mixtral paper's locality figure; chance level is 1/E)."""
    _nonempty(trace)
    same = _consecutive(trace)
    if not same.any():
        return np.zeros(trace.num_layers)
    rep = trace.ids[1:, :, 0] == trace.ids[:-1, :, 0]  # [N-1, L]
    return rep[same].mean(axis=0)


def previous_token_overlap(trace: RoutingTrace) -> np.ndarray:
    """[L] mean share of a token's top-k also chosen by the previous token of its sequence."""
    _nonempty(trace)
    same = _consecutive(trace)
    if not same.any():
        return np.zeros(trace.num_layers)
    cur, prev = trace.ids[1:][same], trace.ids[:-1][same]  # [M, L, k]
    hit = (cur[..., :, None] == prev[..., None, :]).any(-1)  # [M, L, k]
    return hit.mean(axis=(0, 2))


def _consecutive(trace: RoutingTrace) -> np.ndarray:
    """[N-1] True where token t+1 directly follows token t in the same sequence."""
    return (trace.seq[1:] == trace.seq[:-1]) & (trace.pos[1:] == trace.pos[:-1] + 1)


def predictor_recall(trace: RoutingTrace) -> np.ndarray:
    """[D, L] recall of the recorded next-gate predictor by lookahead d (row d-1) and TARGET
    layer; NaN where l - d < 0."""
    _nonempty(trace)
    _, L, _ = trace.ids.shape
    D = trace.lookahead
    out = np.full((D, L), np.nan)
    for d in range(1, D + 1):
        for src in range(L - d):
            tgt = src + d
            p = trace.pred[:, src, d - 1]  # [N, k]
            hit = (trace.ids[:, tgt, :, None] == p[:, None, :]).any(-1)  # [N, k]
            out[d - 1, tgt] = hit.mean()
    return out


def top1_weight_share(trace: RoutingTrace) -> float:
    """Mean share of a token's top-k gate mass carried by its first expert."""
    _nonempty(trace)
    w = trace.weights.astype(np.float64)
    mass = w.sum(-1)
    ok = mass > 0
    return float((w[..., 0][ok] / mass[ok]).mean()) if ok.any() else float("nan")


def routing_summary(trace: RoutingTrace) -> dict[str, object]:
    """Headline routing numbers for profile.yaml (plain Python types)."""
    d = lru_stack_distances(trace)
    share = traffic_share_top(trace, 0.25)
    out: dict[str, object] = {
        "top25_traffic_share": [round(float(x), 4) for x in share],
        "lru_hit_25": [round(float(x), 4) for x in lru_hit_rate(trace, 0.25, distances=d)],
        "lru_hit_50": [round(float(x), 4) for x in lru_hit_rate(trace, 0.5, distances=d)],
        "first_expert_repeat": round(float(first_expert_repeat(trace).mean()), 4),
        "top1_weight_share": round(top1_weight_share(trace), 4),
    }
    if trace.lookahead and trace.num_layers > 1:
        rec = predictor_recall(trace)
        out["predictor_recall"] = {int(i + 1): round(float(np.nanmean(r)), 4)
                                   for i, r in enumerate(rec) if np.isfinite(r).any()}
    return out


# ---- tables ----------------------------------------------------------------------------------
def activation_table(trace: RoutingTrace) -> pd.DataFrame:
    _nonempty(trace)
    c = expert_counts(trace)  # [L, E]
    L, E = c.shape
    freq = c / np.maximum(c.sum(1, keepdims=True), 1)
    return pd.DataFrame({"layer": np.repeat(np.arange(L), E), "expert": np.tile(np.arange(E), L),
                         "count": c.reshape(-1), "frequency": freq.reshape(-1)})


def coactivation_table(trace: RoutingTrace) -> pd.DataFrame:
    _, L, k = trace.ids.shape
    E = trace.num_experts
    frames = []
    ia, ib = np.triu_indices(k, 1)
    for layer in range(L):
        x = trace.ids[:, layer]  # [N, k]
        a = np.minimum(x[:, ia], x[:, ib]).reshape(-1)
        b = np.maximum(x[:, ia], x[:, ib]).reshape(-1)
        keep = a != b
        cnt = np.bincount(a[keep] * E + b[keep], minlength=E * E)
        nz = np.flatnonzero(cnt)
        frames.append(pd.DataFrame({"layer": layer, "expert_a": nz // E, "expert_b": nz % E,
                                    "count": cnt[nz]}))
    return _concat(frames, {"layer": int, "expert_a": int, "expert_b": int, "count": int})


def transitions_table(trace: RoutingTrace) -> pd.DataFrame:
    _, L, k = trace.ids.shape
    E = trace.num_experts
    frames = []
    for layer in range(L - 1):
        src = np.repeat(trace.ids[:, layer], k, axis=1).reshape(-1)  # [N*k*k]
        dst = np.tile(trace.ids[:, layer + 1], (1, k)).reshape(-1)
        cnt = np.bincount(src * E + dst, minlength=E * E).reshape(E, E)
        row = cnt.sum(1, keepdims=True)
        prob = cnt / np.maximum(row, 1)
        nz = np.flatnonzero(cnt)
        frames.append(pd.DataFrame({"layer": layer, "expert_from": nz // E, "expert_to": nz % E,
                                    "probability": prob.reshape(-1)[nz], "count": cnt.reshape(-1)[nz]}))
    return _concat(frames, {"layer": int, "expert_from": int, "expert_to": int,
                            "probability": float, "count": int})


def reuse_table(trace: RoutingTrace) -> pd.DataFrame:
    _, L, k = trace.ids.shape
    frames = []
    seq = np.repeat(trace.seq.astype(np.int64), k)  # [N*k]
    pos = np.repeat(trace.pos.astype(np.int64), k)
    for layer in range(L):
        e = trace.ids[:, layer].reshape(-1)
        order = np.lexsort((pos, e, seq))
        s, ee, p = seq[order], e[order], pos[order]
        same = (s[1:] == s[:-1]) & (ee[1:] == ee[:-1])
        dist = (p[1:] - p[:-1])[same]
        dist = dist[dist > 0]
        cnt = np.bincount(dist) if dist.size else np.zeros(1, np.int64)
        nz = np.flatnonzero(cnt)
        frames.append(pd.DataFrame({"layer": layer, "distance": nz, "count": cnt[nz]}))
    return _concat(frames, {"layer": int, "distance": int, "count": int})


def predictor_table(trace: RoutingTrace) -> pd.DataFrame:
    N, L, _ = trace.ids.shape
    rows = []
    for d in range(1, trace.lookahead + 1):
        for src in range(L - d):
            p = trace.pred[:, src, d - 1]  # [N, k]
            t = trace.ids[:, src + d]  # [N, k]
            recall = (t[:, :, None] == p[:, None, :]).any(-1).mean() if N else float("nan")
            valid = p >= 0
            named = (p[:, :, None] == t[:, None, :]).any(-1) & valid
            precision = named.sum() / valid.sum() if valid.any() else float("nan")
            rows.append((d, src + d, src, float(recall), float(precision)))
    return pd.DataFrame(rows, columns=["lookahead", "layer", "source_layer", "recall", "precision"]).astype(
        {"lookahead": int, "layer": int, "source_layer": int})


def routing_tables(trace: RoutingTrace) -> dict[str, pd.DataFrame]:
    """The five routing tables of a profile (tuner/profile.py names and columns)."""
    _nonempty(trace)
    return {"activation": activation_table(trace), "coactivation": coactivation_table(trace),
            "transitions": transitions_table(trace), "reuse": reuse_table(trace),
            "predictor": predictor_table(trace)}


def _concat(frames: list[pd.DataFrame], dtypes: dict) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})
    return pd.concat(frames, ignore_index=True).astype(dtypes)
