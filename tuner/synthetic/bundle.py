"""Synthetic routing, the bundled presets: calibrations stored in tuner/data/synthetic_presets.json
(made by `calibrate` itself, bench/bundle_presets.py), keyed by targets, dims and CALIBRATION_VERSION."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from importlib import resources

from .calibration import calibrate
from .targets import PRESETS, SyntheticParams, family_of

#: Bump when `calibrate` or `generate` changes what a calibration yields: bundled presets made
#: by another version are then ignored (and tests/tuner/test_synthetic.py says to re-bundle).
CALIBRATION_VERSION = 1
BUNDLED_PRESETS = "data/synthetic_presets.json"  # in the tuner package; bench/bundle_presets.py


def preset_key(family: str, *, num_layers: int, num_experts: int, top_k: int,
               normalize_topk: bool = False) -> str:
    """Identity of one calibration: the family's targets, the dims and CALIBRATION_VERSION."""
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
