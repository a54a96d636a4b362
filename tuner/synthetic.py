"""Synthetic routing: a calibrated generator of routing traces for models without weights.

Torch-free (numpy). Used by `ef-profile` whenever there are no trained weights (the usual case:
nothing can be downloaded here); every profile built on it says so in words.

The model behind it
-------------------
Each token carries a hidden "latent" v[t, l] (r-dim, unit Gaussian) per MoE layer; the router
of layer l scores expert e as

    logit[t, l, e] = skew[l] * a[l, e] + v[t, l] . w[l, :, e]          a ~ N(0, 1), w ~ N(0, 1/r)

and picks the top-k (ids in descending order); gate weights are softmax(sharpness * logit)
over all E experts, restricted to the top-k (renormalised when the model renormalises its
top-k). The latent mixes a persistent and a fresh part, each correlated across layers:

    z[t, 0] = eps;  z[t, l] = cross_layer * z[t, l-1] + sqrt(1 - cross_layer^2) * eps  (per part)
    slow[t] = persistence * slow[t-1] + sqrt(1 - persistence^2) * z_slow[t]   (same sequence)
    v[t, l] = sqrt(locality[l]) * slow[t, l] + sqrt(1 - locality[l]) * z_fresh[t, l]

A persistent part (a sequence's "topic") gives the working-set reuse that LRU caches see at
25-50% capacity; a single AR(1) latent fitted to the same LRU hit rate repeats the previous
token's experts far too often (first-expert repeat 0.34 against 0.19 on pydocs-moe) and misses
the hit rate at 50% capacity by up to 0.08. The next-gate predictor (what the runtime records in
`pred`) applies layer l+d's router to a noisy view of the hidden state entering layer l,
u = fidelity * v[t, l] + sqrt(1 - fidelity^2) * noise, so its accuracy falls with distance d as
the latents decorrelate (cross_layer^d) and levels off where only the popularity term is left.

Knobs (`SyntheticParams`), what each controls, how it is set
------------------------------------------------------------
* skew[l] >= 0, per layer: popularity spread of layer l's experts -> traffic share of the
  busiest experts (the marginal routing depends on nothing else). Bisection per layer.
* locality[l] in [0, 1], per layer: share of the latent that persists along a sequence ->
  temporal reuse (LRU hit rate, first-expert repeats). Bisection to the LRU target nearest 25%
  capacity (or to the first-expert repeat rate).
* persistence in [0, 1): per-token correlation of the persistent part -> how far reuse reaches
  (hit rate at small vs large caches). Best of 0.6 / 0.8 / 0.9 / 0.97 on the other targets.
* cross_layer in [0, 1): correlation of one token's latents in consecutive layers ->
  transitions, and how fast predictor accuracy decays with distance.
* predictor_fidelity in (0, 1]: next-layer predictor accuracy. (cross_layer, fidelity) are
  fitted together to predictor recall at several distances, near distances weighted more.
* sharpness > 0: gate-weight temperature -> mean share of the top-k gate mass on the first
  expert (what adaptive-k's dropped mass depends on); does not change the ids.
* latent_dim r = 8: independent routing directions; fixed.

Targets (`RoutingTargets`) per family preset (all from ../shared/anchors.md unless noted)
------------------------------------------------------------------------------------------
* qwen3_moe: 95% of traffic through 52.5% of experts; LRU hit 0.60 / 0.74 / 0.85 at 15 / 25 /
  35% capacity (Qwen3-30B-A3B). Predictor 0.669 at d = 1 (gate reuse on Qwen2-57B, the
  nearest published figure) and 0.30 at d = 20 ("levels off near 26-33%").
* qwen2_moe (Qwen1.5-MoE, Qwen2-57B): predictor as above (66.9% on Qwen2-57B); no published
  traffic/LRU figures for these checkpoints, so Qwen3-30B's are borrowed.
* mixtral: first expert repeated by the next token 21% of the time (Mixtral paper: 14-28%,
  midpoint); predictor 0.93 at d = 1 ("~90-96%"), 0.30 at d = 20. ASSUMED: busiest 25% of
  experts carry 35% of traffic (the Mixtral paper finds no strong specialisation; 25% = uniform).
* olmoe, deepseek_v2: no published figures in anchors.md: Qwen3-30B's traffic/LRU targets, the
  predictor decay measured on pydocs-moe (0.76 / 0.68 / 0.62 / 0.56 at d = 1..4), 0.30 at d = 20.
* top-1 weight share: 0.540 measured on pydocs-moe (k = 4); for other k ASSUMED
  0.540^(log k / log 4) (0.735 at k = 2, 0.397 at k = 8). No published figure.
* LRU fractions whose cache holds fewer than k experts (round(f E) < k) are skipped: they
  cannot be compared across models of different E (tiny models).

Calibration is per model dims (E, k and L change what a knob value means):
`preset_params(family, num_layers=..., num_experts=..., top_k=...)` fits a family's targets in
2-20 s (cached per process; for the registry's models the fit ships in
tuner/data/synthetic_presets.json, made by bench/bundle_presets.py with the same function);
`fit_to_trace(trace)` fits per-layer targets measured on a trace.
Calibrated presets for the registry models (seed 0) and what a fresh 4,096-token trace shows:

    model             skew  local. pers. cross  fid.  sharp | traffic     LRU 15/25/35%   rep.  recall d1/d4/d20
    qwen2-moe         0.57  0.70   0.8   0.94   0.94  2.24  | .95@52.5%   .60/.74/.83     .28   .67/.52/.28
    qwen2-57b-a14b    0.84  0.73   0.8   0.82   0.96  1.51  | .95@52.5%   .54/.75/.84     .34   .67/.47/.32
    qwen3-30b-a3b     0.55  0.74   0.8   0.96   0.93  1.98  | .95@52.5%   .62/.75/.83     .24   .67/.56/.33
    olmoe-1b-7b       0.83  0.72   0.8   0.91   0.98  1.51  | .95@52.5%   .54/.74/.84     .34   .76/.60/ -
    deepseek-v2-lite  0.70  0.71   0.8   0.91   1.00  1.77  | .95@52.5%   .59/.75/.83     .30   .74/.55/.30
    mixtral-8x7b      0.23  0.21   0.95  0.985  1.00  2.44  | .35@25%     -               .22   .90/.81/.62
(skew = mean over layers; "traffic" = share through the busiest fraction of experts.)

Known misses: the LRU hit at 15% capacity is 0.04-0.06 low for E = 64, k = 8; Mixtral cannot
have 0.93 at d = 1 and 0.30 at d = 20 with one decay rate (near distances win: 0.90 / 0.62).

Measured on the real pydocs-moe trace (its 128 prompts, 8,192 tokens, fp32 CPU; 8 layers, 32
experts, top-4), per layer: busiest-25% traffic share 0.93 0.58 0.56 0.56 0.51 0.51 0.51 0.48;
LRU hit at 25% 0.93 0.61 0.59 0.62 0.55 0.57 0.54 0.52, at 50% 1.00 0.89 0.86 0.88 0.82 0.85 0.82
0.79; first-expert repeat 0.23 0.21 0.20 0.19 0.18 0.20 0.17 0.16 (chance 0.03); next-gate
recall (mean over target layers) 0.76 / 0.68 / 0.62 / 0.56 at d = 1..4 (0.82 / 0.75 / 0.71 /
0.66 without layer 0 as the source); top-1 weight share 0.54. `fit_to_trace` on it gives skew
2.49 0.51 0.55 0.51 0.38 0.38 0.31 0.37, locality 0.66 0.42 0.47 0.55 0.43 0.52 0.42 0.42,
persistence 0.9, cross_layer 0.94, fidelity 0.997, sharpness 1.83; a fresh trace from these
knobs matches the real per-layer traffic shares and LRU hit rates (25%) within 0.03, the 50%
hit rates within 0.03, predictor recall within 0.02 (tests/tuner/test_profiler.py). Not
modelled: layer 0's first-expert repeat (0.8 generated vs 0.23 real: its extreme skew makes
one expert win most tokens) and layer 0 as a predictor source (0.47 real).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from expertflow.errors import DataError
from expertflow.trace import PREFILL, RoutingTrace

LOOKAHEAD = 4
LATENT_DIM = 8
_STRUCT_SALT = 0x5EED  # structure (a, w) and sampling draw from different streams


# ---- knobs and targets ----------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticParams:
    num_layers: int
    num_experts: int
    top_k: int
    skew: tuple[float, ...]
    locality: tuple[float, ...]
    persistence: float = 0.95
    cross_layer: float = 0.85
    predictor_fidelity: float = 0.9
    sharpness: float = 1.0
    normalize_topk: bool = False
    latent_dim: int = LATENT_DIM
    structure_seed: int = 0
    preset: str = "custom"
    fit_error: dict = field(default_factory=dict, compare=False)
    layer_ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)  # internal

    def __post_init__(self):
        L = self.num_layers
        if self.num_layers < 1 or self.num_experts < 2 or not 1 <= self.top_k < self.num_experts:
            raise DataError(f"synthetic routing needs >= 1 layer, >= 2 experts and 1 <= top_k < experts; "
                            f"got L={self.num_layers}, E={self.num_experts}, k={self.top_k}")
        if len(self.skew) != L or len(self.locality) != L:
            raise DataError(f"synthetic skew/locality need one value per layer ({L}); got "
                            f"{len(self.skew)} and {len(self.locality)}")
        if not all(0.0 <= x <= 1.0 for x in self.locality) or not 0.0 <= self.cross_layer < 1.0 \
                or not 0.0 <= self.persistence < 1.0:
            raise DataError("synthetic locality must be in [0, 1], persistence and cross_layer in [0, 1)")
        if not 0.0 < self.predictor_fidelity <= 1.0 or self.sharpness <= 0:
            raise DataError("synthetic predictor_fidelity must be in (0, 1] and sharpness > 0")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("layer_ids")
        d["skew"] = [round(float(x), 4) for x in self.skew]
        d["locality"] = [round(float(x), 4) for x in self.locality]
        for key in ("persistence", "cross_layer", "predictor_fidelity", "sharpness"):
            d[key] = round(float(d[key]), 4)
        d["fit_error"] = {k: round(float(v), 4) for k, v in self.fit_error.items()}
        return d


@dataclass(frozen=True)
class RoutingTargets:
    """Routing statistics to calibrate to. Scalars are means over layers; tuples are per layer.

    traffic_share: share of token-expert pairs through the busiest `traffic_fraction` of experts.
    lru_hit: {cache fraction: hit rate} (tuner.stats.lru_hit_rate definition).
    first_repeat: share of tokens repeating the previous token's first expert (used when no
                  lru_hit is given).
    predictor_recall: {lookahead d: mean recall}; distances past the model's depth are ignored.
    top1_weight_share: mean share of the top-k gate mass on the first expert.
    """

    traffic_fraction: float = 0.25
    traffic_share: float | tuple[float, ...] | None = None
    lru_hit: dict | None = None
    first_repeat: float | None = None
    predictor_recall: dict | None = None
    top1_weight_share: float | None = None
    source: str = ""


def _top1_for_k(k: int) -> float:
    return float(0.540 ** (math.log(k) / math.log(4))) if k > 1 else 1.0


_QWEN3_TRAFFIC = {"traffic_fraction": 0.525, "traffic_share": 0.95}
_QWEN3_LRU = {0.15: 0.60, 0.25: 0.74, 0.35: 0.85}
PRESETS: dict[str, RoutingTargets] = {
    "qwen3_moe": RoutingTargets(**_QWEN3_TRAFFIC, lru_hit=_QWEN3_LRU,
                                predictor_recall={1: 0.669, 20: 0.30},
                                source="Qwen3-30B-A3B traffic and LRU figures; Qwen2-57B next-layer "
                                       "gate reuse 66.9%; far-distance level ~0.30 (anchors.md)"),
    "qwen2_moe": RoutingTargets(**_QWEN3_TRAFFIC, lru_hit=_QWEN3_LRU,
                                predictor_recall={1: 0.669, 20: 0.30},
                                source="Qwen2-57B next-layer gate reuse 66.9%; traffic and LRU "
                                       "borrowed from Qwen3-30B-A3B (anchors.md)"),
    "mixtral": RoutingTargets(traffic_fraction=0.25, traffic_share=0.35, first_repeat=0.21,
                              predictor_recall={1: 0.93, 20: 0.30},
                              source="Mixtral first-expert repeat 14-28% and next-layer gate reuse "
                                     "~90-96% (anchors.md); traffic share 0.35 assumed"),
    "olmoe": RoutingTargets(**_QWEN3_TRAFFIC, lru_hit=_QWEN3_LRU,
                            predictor_recall={1: 0.76, 2: 0.68, 3: 0.62, 4: 0.56, 20: 0.30},
                            source="no published OLMoE figures: Qwen3-30B traffic/LRU, pydocs-moe "
                                   "predictor decay, far level 0.30 (anchors.md)"),
    "deepseek_v2": RoutingTargets(**_QWEN3_TRAFFIC, lru_hit=_QWEN3_LRU,
                                  predictor_recall={1: 0.76, 2: 0.68, 3: 0.62, 4: 0.56, 20: 0.30},
                                  source="no published DeepSeek-V2 figures: Qwen3-30B traffic/LRU, "
                                         "pydocs-moe predictor decay, far level 0.30 (anchors.md)"),
}

#: Measured on pydocs-moe's real trace (see the module docstring).
PYDOCS_TARGETS = RoutingTargets(
    traffic_fraction=0.25,
    traffic_share=(0.934, 0.582, 0.559, 0.563, 0.510, 0.508, 0.508, 0.482),
    lru_hit={0.25: (0.927, 0.605, 0.586, 0.617, 0.545, 0.567, 0.537, 0.518)},
    predictor_recall={1: 0.763, 2: 0.680, 3: 0.619, 4: 0.559},
    top1_weight_share=0.540,
    source="pydocs-moe, real trace of its 128 prompts (fp32, CPU)")


def family_of(architecture: str) -> str:
    if architecture not in PRESETS:
        raise DataError(f"no synthetic routing preset for architecture {architecture!r}; known: "
                        f"{', '.join(PRESETS)}")
    return architecture


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
    from . import stats

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


#: Bump when `calibrate` or `generate` changes what a calibration yields: bundled presets made
#: by another version are then ignored (and tests/tuner/test_synthetic.py says to re-bundle).
CALIBRATION_VERSION = 1
BUNDLED_PRESETS = "data/synthetic_presets.json"  # in the tuner package; bench/bundle_presets.py


def preset_key(family: str, *, num_layers: int, num_experts: int, top_k: int,
               normalize_topk: bool = False) -> str:
    """Identity of one calibration: the family's targets, the dims and CALIBRATION_VERSION."""
    import hashlib

    what = repr((CALIBRATION_VERSION, PRESETS[family_of(family)], family, num_layers, num_experts,
                 top_k, bool(normalize_topk)))
    return f"{family}-L{num_layers}-E{num_experts}-k{top_k}-" + hashlib.sha256(what.encode()).hexdigest()[:12]


def params_to_json(p: SyntheticParams) -> dict:
    """Every field at full precision (JSON floats round-trip exactly); `params_from_json` inverts it."""
    d = asdict(p)
    d.pop("layer_ids")
    return d


def params_from_json(d: dict) -> SyntheticParams:
    return SyntheticParams(**{**d, "skew": tuple(d["skew"]), "locality": tuple(d["locality"])})


@functools.lru_cache(maxsize=1)
def _bundled_presets() -> dict:
    import json
    from importlib import resources

    try:
        text = resources.files("tuner").joinpath(BUNDLED_PRESETS).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return {}
    return json.loads(text)


@functools.lru_cache(maxsize=32)
def preset_params(family: str, *, num_layers: int, num_experts: int, top_k: int,
                  normalize_topk: bool = False) -> SyntheticParams:
    """The family preset calibrated for these dims: bundled for the registry's models (made by
    `calibrate` itself, bench/bundle_presets.py), else calibrated here (2-20 s; cached per
    process)."""
    key = preset_key(family, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                     normalize_topk=normalize_topk)
    stored = _bundled_presets().get(key)
    if stored is not None:
        return params_from_json(stored)
    return calibrate_preset(family, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                            normalize_topk=normalize_topk)


def calibrate_preset(family: str, *, num_layers: int, num_experts: int, top_k: int,
                     normalize_topk: bool = False) -> SyntheticParams:
    """Fit the family's targets for these dims now (what the bundled presets store)."""
    targets = PRESETS[family_of(family)]
    return calibrate(targets, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                     normalize_topk=normalize_topk, preset=family)


def measure_targets(trace: RoutingTrace, *, per_layer: bool = True) -> RoutingTargets:
    """The statistics of a (real) trace that `calibrate` fits to."""
    from . import stats

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
