"""Model registry: aliases with real architecture dims, tiny random models, local checkpoints.

`resolve_model(name_or_path)` returns a `ModelSpec` for a registry alias (real dims, random
weights) or a local Hugging Face checkpoint directory (its config.json, and its weights when
present). This module is torch-free; `ModelSpec.hf_config()` and the param counts import
transformers lazily.

Sources for the dims: ../shared/anchors.md and the checkpoints' published config.json files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

#: transformers `model_type`s whose routed experts we can offload.
SUPPORTED_ARCHITECTURES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe", "deepseek_v2")


@dataclass(frozen=True)
class _Alias:
    architecture: str
    config: dict[str, Any]
    description: str
    published_total_params: int | None = None  # from the model card / paper
    tiny: bool = False


_ALIASES: dict[str, _Alias] = {
    # Qwen1.5-MoE-A2.7B: transformers' qwen2_moe defaults describe exactly this checkpoint.
    "qwen2-moe": _Alias(
        "qwen2_moe",
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
             norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=8192,
             qkv_bias=True),
        "Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B)",
        14_300_000_000,
    ),
    "qwen2-57b-a14b": _Alias(
        "qwen2_moe",
        dict(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, moe_intermediate_size=2560,
             shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8,
             norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=32768,
             rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"}, qkv_bias=True),
        "Qwen2-57B-A14B (Qwen/Qwen2-57B-A14B)",
        57_410_000_000,
    ),
    "mixtral-8x7b": _Alias(
        "mixtral",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=32768,
             rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"}),
        "Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1)",
        46_700_000_000,
    ),
    "olmoe-1b-7b": _Alias(
        "olmoe",
        # The checkpoint's expert width is 1024 (transformers' default of 2048 is not it).
        dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64,
             num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096),
        "OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924)",
        6_920_000_000,
    ),
    "qwen3-30b-a3b": _Alias(
        "qwen3_moe",
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False,
             max_position_embeddings=40960,
             rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"}),
        "Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B)",
        30_500_000_000,
    ),
    "deepseek-v2-lite": _Alias(
        "deepseek_v2",
        dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
             n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
             kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
             v_head_dim=128, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
             max_position_embeddings=32768, tie_word_embeddings=False),
        "DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite)",
        15_700_000_000,
    ),
    # Tiny random models of each supported architecture, for smoke tests (fp32 on CPU in ms).
    "tiny-qwen2-moe": _Alias(
        "qwen2_moe",
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=False, max_position_embeddings=512, tie_word_embeddings=False),
        "tiny random Qwen2-MoE (smoke tests)", tiny=True,
    ),
    "tiny-mixtral": _Alias(
        "mixtral",
        dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=512),
        "tiny random Mixtral (smoke tests)", tiny=True,
    ),
    "tiny-qwen3-moe": _Alias(
        "qwen3_moe",
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
             num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
             max_position_embeddings=512, tie_word_embeddings=False),
        "tiny random Qwen3-MoE (smoke tests)", tiny=True,
    ),
    "tiny-olmoe": _Alias(
        "olmoe",
        dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
             norm_topk_prob=False, max_position_embeddings=512, pad_token_id=0, eos_token_id=None),
        "tiny random OLMoE (smoke tests)", tiny=True,
    ),
    "tiny-deepseek-v2": _Alias(
        "deepseek_v2",
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
             n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
             q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             topk_method="greedy", norm_topk_prob=False, max_position_embeddings=512),
        "tiny random DeepSeek-V2 (smoke tests)", tiny=True,
    ),
}

# config.json keys per architecture: (experts, top-k, expert width) and how MoE layers are placed.
_KEYS = {
    "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "olmoe": ("num_experts", "num_experts_per_tok", "intermediate_size"),
    "mixtral": ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "deepseek_v2": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
}

#: Names transformers versions use in config.json for the routed-expert count.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def known_models() -> list[str]:
    """All registry aliases, real models first."""
    return sorted(_ALIASES, key=lambda n: (_ALIASES[n].tiny, n))


@dataclass(frozen=True)
class ModelSpec:
    """What ExpertFlow needs to know about a model: identity, dims, and where its weights are.

    Shape legend used across the codebase: L = MoE layers, E = routed experts per layer,
    k = experts per token, H = hidden size, I = expert FFN width, T = tokens.
    """

    name: str
    architecture: str
    config: dict[str, Any] = field(hash=False, compare=False)
    checkpoint: str | None = None  # directory holding config.json (+ weights); None = random weights
    has_weights: bool = False
    published_total_params: int | None = None
    description: str = ""
    tiny: bool = False

    # ---- dims ---------------------------------------------------------------------------
    def _get(self, key: str, default: Any = None) -> Any:
        if key in self.config:
            return self.config[key]
        return _default_config(self.architecture).get(key, default)

    @property
    def num_layers(self) -> int:
        return int(self._get("num_hidden_layers"))

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder-layer indices whose MLP is a routed MoE block (in order)."""
        n = self.num_layers
        if self.architecture == "qwen2_moe" or self.architecture == "qwen3_moe":
            step = int(self._get("decoder_sparse_step", 1) or 1)
            mlp_only = set(self._get("mlp_only_layers", []) or [])
            return tuple(i for i in range(n) if i not in mlp_only and (i + 1) % step == 0)
        if self.architecture == "deepseek_v2":
            first = int(self._get("first_k_dense_replace", 0) or 0)
            return tuple(range(first, n))
        return tuple(range(n))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_experts(self) -> int:
        value = self._get(_KEYS[self.architecture][0])
        if value is None:  # transformers renames some keys between versions (qwen3_moe 5.24)
            value = next((self.config[k] for k in _EXPERT_COUNT_KEYS if self.config.get(k)), None)
        return int(value)

    @property
    def top_k(self) -> int:
        return int(self._get(_KEYS[self.architecture][1]))

    @property
    def hidden_size(self) -> int:
        return int(self._get("hidden_size"))

    @property
    def expert_intermediate_size(self) -> int:
        return int(self._get(_KEYS[self.architecture][2]))

    @property
    def vocab_size(self) -> int:
        return int(self._get("vocab_size"))

    @property
    def norm_topk_prob(self) -> bool:
        if self.architecture == "mixtral":
            return True  # Mixtral always renormalises its top-k
        return bool(self._get("norm_topk_prob", False))

    def expert_params(self) -> int:
        """Parameters of one routed expert: gate_up [2I, H] + down [H, I] (all gated SwiGLU)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def bytes_per_expert(self, dtype: str = "bfloat16") -> int:
        return self.expert_params() * DTYPE_BYTES[dtype]

    def routed_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params()

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """KV-cache bytes one token costs across all layers, as transformers' DynamicCache stores it."""
        n = self.num_layers
        if self.architecture == "deepseek_v2":
            heads = int(self._get("num_attention_heads"))
            k = int(self._get("qk_nope_head_dim")) + int(self._get("qk_rope_head_dim"))
            per_layer = heads * (k + int(self._get("v_head_dim")))
        else:
            heads = int(self._get("num_attention_heads"))
            kv = int(self._get("num_key_value_heads", heads) or heads)
            head_dim = self._get("head_dim") or self.hidden_size // heads
            per_layer = 2 * kv * int(head_dim)
        return n * per_layer * DTYPE_BYTES[dtype]

    def param_counts(self) -> dict[str, int]:
        """{'total', 'routed', 'non_expert'} parameter counts of the real architecture.

        Counted on transformers' own module tree instantiated on the meta device (exact for
        every architecture, no weights allocated); imports torch lazily.
        """
        return dict(_param_counts(self.architecture, json.dumps(self.config, sort_keys=True)))

    def non_expert_bytes(self, dtype: str = "bfloat16") -> int:
        return self.param_counts()["non_expert"] * DTYPE_BYTES[dtype]

    # ---- identity -----------------------------------------------------------------------
    def dims(self) -> dict[str, Any]:
        """The dims that make configs and traces transferable between runs of this model."""
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "expert_intermediate_size": self.expert_intermediate_size,
            "vocab_size": self.vocab_size,
        }

    @property
    def fingerprint(self) -> str:
        """A short stable hash of `dims()`: two models with the same fingerprint share configs."""
        blob = json.dumps(self.dims(), sort_keys=True).encode()
        return "dims-" + hashlib.sha256(blob).hexdigest()[:16]

    def hf_config(self, **overrides: Any):
        """The transformers config object (imports transformers)."""
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(self.architecture, **{**self.config, **overrides})
        return cfg


def _default_config(architecture: str) -> dict[str, Any]:
    return _default_config_cached(architecture)


@functools.lru_cache(maxsize=None)
def _default_config_cached(architecture: str) -> dict[str, Any]:
    # Values transformers fills in when config.json omits them (only needed for local checkpoints
    # with sparse configs; aliases list every dim they use).
    defaults = {
        "qwen2_moe": dict(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False),
        "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False),
        "olmoe": dict(norm_topk_prob=False),
        "mixtral": dict(),
        "deepseek_v2": dict(first_k_dense_replace=0, norm_topk_prob=False),
    }
    return defaults.get(architecture, {})


@functools.lru_cache(maxsize=64)
def _param_counts(architecture: str, config_json: str) -> tuple[tuple[str, int], ...]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(architecture, **json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = routed = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # tied embeddings count once
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name + "." and (name.endswith("gate_up_proj") or name.endswith("down_proj")):
            routed += p.numel()
    return (("total", total), ("routed", routed), ("non_expert", total - routed))


#: config.json / to_dict() keys that are not dims (AutoConfig.for_model takes model_type itself).
_NOT_DIMS = {"architectures", "transformers_version", "model_type", "_name_or_path", "dtype",
             "torch_dtype", "auto_map"}


def _config_dims(raw: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """A config dict as ModelSpec keeps it: the expert count under our key, no non-dims keys."""
    experts_key = _KEYS[arch][0]
    if experts_key not in raw:
        # Newer transformers save some configs under another name for the expert count (5.24
        # writes qwen3_moe's `num_experts` as `num_local_experts`); read it under ours.
        alt = next((k for k in _EXPERT_COUNT_KEYS if k in raw), None)
        if alt is not None:
            raw = {(experts_key if k == alt else k): v for k, v in raw.items()}
    if not raw.get(experts_key):
        raise ModelError(
            f"{where} has model_type {arch!r} but {experts_key}={raw.get(experts_key)!r}: it has "
            "no routed experts to offload"
        )
    return {k: v for k, v in raw.items() if k not in _NOT_DIMS}


def spec_from_hf_config(hf_config, name: str = "model") -> ModelSpec:
    """The ModelSpec of an instantiated transformers model's config (for identity checks)."""
    arch = getattr(hf_config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{name} is a {arch!r} model, not a supported MoE; supported model_type values: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return ModelSpec(name, arch, _config_dims(hf_config.to_dict(), arch, name))


def resolve_model(name_or_path: str | os.PathLike) -> ModelSpec:
    """Resolve a registry alias or a local Hugging Face checkpoint directory to a `ModelSpec`.

    Raises `ModelError` (one line) for an unknown alias, a path without config.json, or a
    checkpoint whose architecture is not a supported MoE.
    """
    text = str(name_or_path)
    if text in _ALIASES:
        a = _ALIASES[text]
        return ModelSpec(text, a.architecture, dict(a.config), None, False,
                         a.published_total_params, a.description, a.tiny)
    path = Path(text).expanduser()
    if path.is_dir():
        return _spec_from_checkpoint(path)
    if path.exists():
        raise ModelError(
            f"model path {text!r} is a file, not a checkpoint directory; pass the folder that "
            "holds config.json"
        )
    raise ModelError(
        f"unknown model {text!r}; known aliases: {', '.join(known_models())}; or pass a local "
        "Hugging Face checkpoint directory"
    )


def _spec_from_checkpoint(path: Path) -> ModelSpec:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(
            f"{str(path)!r} is not a Hugging Face checkpoint: no config.json in it; pass a "
            "checkpoint directory or one of the aliases (ef-tune --help lists them)"
        )
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {str(cfg_file)!r}: {exc}; is the checkpoint complete?") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{str(cfg_file)!r} does not hold a JSON object; is the checkpoint complete?")
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{str(path)!r} is a {arch!r} model, not a supported MoE; supported model_type values: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    config = _config_dims(raw, arch, repr(str(path)))
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return ModelSpec(str(path), arch, config, str(path), has_weights, None,
                     f"local checkpoint {path.name}", False)
