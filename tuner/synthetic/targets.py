"""Synthetic routing, the knobs and the targets: SyntheticParams (what the generator takes),
RoutingTargets (published statistics it is calibrated to), the family presets. See tuner/synthetic/."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from expertflow.errors import DataError

LOOKAHEAD = 4
LATENT_DIM = 8


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
