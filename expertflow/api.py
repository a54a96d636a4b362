"""Configs for a model you built yourself.

    model = AutoModelForCausalLM.from_pretrained(...)           # any supported MoE
    config = expertflow.default_config(model, budget="24GB")    # untuned: LRU, prefetch depth 1
    with expertflow.offload(model, config) as handle:
        model.generate(...)

`ef-tune` gives a tuned config for the same model; this one needs no profile and no study.
"""

from __future__ import annotations

from typing import Any

from .budget import plan_memory
from .config import default_config as _default_config
from .errors import ModelError
from .registry import DTYPE_BYTES, ModelSpec, resolve_model, spec_from_hf_config

__all__ = ["default_config"]


def _spec_of(model: Any):
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return resolve_model(model)
    hf_config = getattr(model, "config", None)
    if hf_config is None and hasattr(model, "model_type") and hasattr(model, "to_dict"):
        hf_config = model  # a transformers config object itself
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise ModelError(f"default_config needs a transformers model, its config, a ModelSpec or a "
                         f"model name; got a {type(model).__name__}")
    name = getattr(hf_config, "_name_or_path", None) or type(model).__name__
    return spec_from_hf_config(hf_config, str(name))


def _model_dtype_device(model: Any) -> tuple[str | None, str | None]:
    params = getattr(model, "parameters", None)
    if params is None:
        return None, None
    try:
        p = next(iter(params()))
    except (StopIteration, TypeError):
        return None, None
    dtype = str(p.dtype).removeprefix("torch.")
    return dtype, p.device.type


def default_config(model: Any, *, budget: str | int, device: str | None = None, dtype: str | None = None,
                   max_context_tokens: int | None = None, max_batch: int = 1):
    """An untuned, valid `RuntimeConfig` for `model` under a GPU memory `budget` ("24GB",
    "22GiB" or bytes): exact top-k, LRU, prefetch depth 1, the expert cache sized by
    `expertflow.plan_memory` (KV cache for `max_context_tokens`; None = the model's
    max_position_embeddings, at most 4096).

    `model`: a transformers MoE model you built (or its config), a ModelSpec, a registry alias or
    a checkpoint directory. `device` and `dtype` default to the model's own (its first
    parameter's), else cuda and bfloat16. Raises ModelError (not a supported MoE) or
    BudgetError (malformed or too small a budget), one line each.
    """
    spec = _spec_of(model)
    model_dtype, model_device = _model_dtype_device(model)
    dt = dtype or (model_dtype if model_dtype in DTYPE_BYTES else None) or "bfloat16"
    dev = device or (model_device if model_device in ("cpu", "cuda") else None) or "cuda"
    plan = plan_memory(spec, budget, max_context_tokens=max_context_tokens, max_batch=max_batch, dtype=dt)
    return _default_config(spec, plan, device=dev, dtype=dt)
