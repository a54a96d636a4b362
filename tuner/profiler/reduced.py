"""Reduced-depth models at a registry model's real dims (random weights), for timing: the
eager runtime's (profiler.timing) and the graph engine's (profiler.engine_timing)."""

from __future__ import annotations

import dataclasses
import gc

import torch

from expertflow.registry import ModelSpec

REDUCED_HOST_BYTES = 8 * (1 << 30)  # cap on the host store of the deeper reduced model


def reduced_spec(spec: ModelSpec, moe_layers: int) -> ModelSpec:
    """`spec` with only `moe_layers` MoE decoder layers (real dims, random weights)."""
    cfg = dict(spec.config)
    dense = 0
    if spec.architecture == "deepseek_v2":
        dense = int(cfg.get("first_k_dense_replace", 0) or 0)
    else:
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = []
    n = dense + moe_layers
    cfg["num_hidden_layers"] = n
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = (cfg["layer_types"] * n)[:n]
    return dataclasses.replace(spec, name=f"{spec.name}[{moe_layers} MoE layers]", config=cfg,
                               checkpoint=None, has_weights=False)


def timing_depths(spec: ModelSpec, dtype: str) -> tuple[int, int]:
    """MoE depths of the two reduced models (the deeper one's experts must fit the host cap)."""
    per_layer = spec.bytes_per_expert(dtype) * spec.num_experts
    deep = 3 if 3 * per_layer <= REDUCED_HOST_BYTES else 2
    return 1, deep


def build_random(spec: ModelSpec, dev: torch.device, dtype: str, seed: int):
    from expertflow.runtime.loading import build_model  # noqa: PLC0415 - torch, only when it runs

    return build_model(spec, device=dev, dtype=dtype, seed=seed, experts_on_host=True,
                       pin_memory=dev.type == "cuda")


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


