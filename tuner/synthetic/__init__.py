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

from .bundle import (
    BUNDLED_PRESETS,
    CALIBRATION_VERSION,
    _bundled_presets,  # noqa: F401 - tests read the bundled file through it
    calibrate_preset,
    params_from_json,
    params_to_json,
    preset_key,
    preset_params,
)
from .calibration import calibrate, fit_to_trace, measure_targets
from .generator import generate
from .targets import (
    LATENT_DIM,
    LOOKAHEAD,
    PRESETS,
    PYDOCS_TARGETS,
    RoutingTargets,
    SyntheticParams,
    family_of,
)

__all__ = ["BUNDLED_PRESETS", "CALIBRATION_VERSION", "LATENT_DIM", "LOOKAHEAD", "PRESETS", "PYDOCS_TARGETS",
           "RoutingTargets", "SyntheticParams", "calibrate", "calibrate_preset", "family_of", "fit_to_trace",
           "generate", "measure_targets", "params_from_json", "params_to_json", "preset_key", "preset_params"]
