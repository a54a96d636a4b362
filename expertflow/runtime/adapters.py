"""Find the routed-expert blocks of a transformers 5.x MoE model.

transformers 5.x stores routed experts as fused `*Experts` modules (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`) whose forward dispatches through `ExpertsInterface`, next to a router
module (`gate`, weight [E, H]) inside the layer's sparse-MoE block (`layer.mlp`). That layout is
shared by Qwen2-MoE (incl. Qwen1.5-MoE), Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V2, so one
adapter serves them all; an architecture with another layout fails here with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError


@dataclass
class MoEBlock:
    moe_index: int  # 0..L-1 among MoE layers
    decoder_index: int  # index in model.model.layers
    block: nn.Module  # the sparse-MoE block (layer.mlp)
    router: nn.Module  # block.gate, weight [E, H]
    experts: nn.Module  # block.experts, gate_up_proj [E, 2I, H], down_proj [E, H, I]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    raise ModelError(f"{type(model).__name__} has no `.model.layers`; ExpertFlow supports "
                     "transformers causal-LM MoE models (Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2)")


def is_experts_module(module: nn.Module) -> bool:
    gu = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(down, torch.Tensor)
            and down.dim() == 3 and hasattr(module, "num_experts"))


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    blocks: list[MoEBlock] = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        router = getattr(block, "gate", None)
        if experts is None or router is None:
            continue  # a dense layer (e.g. DeepSeek's first_k_dense_replace)
        if not is_experts_module(experts) or not isinstance(getattr(router, "weight", None), torch.Tensor):
            raise ModelError(f"layer {i}'s MoE block ({type(block).__name__}) does not use fused "
                             "transformers 5.x experts (gate_up_proj/down_proj); upgrade transformers")
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            raise ModelError(f"layer {i}'s experts ({type(experts).__name__}) have biases or no gate; "
                             "only gated bias-free experts are supported")
        blocks.append(MoEBlock(len(blocks), i, block, router, experts))
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no routed-expert layers: it is not a MoE model")
    return blocks
