"""How ExpertFlow plugs into transformers: the one place that touches transformers' private
names (fenced by tests/runtime/test_backend.py, which fails when a transformers release moves
one of them).

* the "expertflow" experts backend in transformers' `ExpertsInterface` (a registry made for
  this), selected per model with `set_experts_implementation`: every fused `*Experts` module of
  that model hands (hidden_states, top_k_index, top_k_weights) to the executor that tagged it;
* `attach_target`: the model's MoE blocks and the device, checked against the config;
* `PoolKernels`: transformers' own experts kernels (batched_mm, grouped_mm, eager) run over the
  GPU slot pool of the eager runtime, with slot numbers in place of expert ids.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import RuntimeConfig
from ..errors import DeviceError, ModelError
from ..registry import spec_from_hf_config
from .adapters import find_moe_blocks
from .store import SlotPool

BACKEND_NAME = "expertflow"
BATCHED_MM_MAX_PAIRS = 64  # token-expert pairs up to which "auto" uses batched_mm (decode)
MAX_KERNEL_GROUPS = 1024  # torch grouped_mm's limit on groups


def _experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "expertflow" experts backend: hands the layer to the executor that owns the module."""
    tag = getattr(self, "_expertflow", None)
    if tag is None:
        raise RuntimeError("experts_implementation 'expertflow' is set on a module ExpertFlow does "
                           "not manage; attach with expertflow.offload(model, config)")
    handle, moe_index = tag
    return handle._layer_forward(moe_index, hidden_states, top_k_index, top_k_weights)


def register_backend() -> None:
    from transformers.integrations.moe import ExpertsInterface  # noqa: PLC0415 - transformers, at attach

    ExpertsInterface.register(BACKEND_NAME, _experts_forward)


def experts_implementation(model: nn.Module) -> dict[str, str]:
    """The model's experts backend(s) before attaching, to restore at detach."""
    if hasattr(model, "get_experts_implementation"):
        return model.get_experts_implementation()
    return {"": model.config._experts_implementation}


def restore_experts_implementation(model: nn.Module, prev: dict[str, str]) -> None:
    model.set_experts_implementation(prev if len(prev) > 1 else prev.get("") or "grouped_mm")


def attach_target(model: nn.Module, config: RuntimeConfig, device) -> tuple[list, torch.device]:
    """(the model's MoE blocks, the device to run on) for attaching `config`: ModelError for a
    config made for another model, DeviceError for a CUDA device without a GPU."""
    blocks = find_moe_blocks(model)
    check_config_matches(model, config)
    dev = torch.device(device or config.runtime.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"config runtime.device is {config.runtime.device!r} but no CUDA GPU is "
                          "available; pass device='cpu' or run on a GPU machine")
    return blocks, dev


def check_config_matches(model: nn.Module, config: RuntimeConfig) -> None:
    """Refuse a config made for another model (by dims fingerprint): ModelError."""
    spec = spec_from_hf_config(model.config, type(model).__name__)
    if spec.fingerprint != config.model.fingerprint:
        d = spec.dims()
        raise ModelError(
            f"config was made for {config.model.name!r} ({config.model.architecture}, "
            f"{config.model.num_moe_layers} MoE layers, {config.model.num_experts} experts, "
            f"top-{config.model.top_k}, fingerprint {config.model.fingerprint}) but this model is "
            f"{d['architecture']} with {len(d['moe_layers'])} MoE layers, {d['num_experts']} experts, "
            f"top-{d['top_k']}, hidden {d['hidden_size']} (fingerprint {spec.fingerprint}); tune a "
            "config for this model with ef-tune")


class _PoolView:
    """Duck-typed stand-in for an `*Experts` module whose experts are the GPU slots, so that
    transformers' own kernels (batched_mm / grouped_mm / eager) run over the slot pool."""

    def __init__(self, experts: nn.Module, gate_up: torch.Tensor, down: torch.Tensor):
        self.gate_up_proj = gate_up
        self.down_proj = down
        self.num_experts = gate_up.shape[0]
        self.config = experts.config
        self.act_fn = experts.act_fn
        self._apply_gate = experts._apply_gate  # bound to the real module
        self.has_gate = True
        self.has_bias = False
        self.has_post_expert_norm = getattr(experts, "has_post_expert_norm", False)
        self.is_transposed = getattr(experts, "is_transposed", False)
        self.is_concatenated = getattr(experts, "is_concatenated", True)
        self._is_expert_parallel = False


class PoolKernels:
    """transformers' experts kernels over one slot pool.

    `configured` is runtime.experts_kernel; "auto" = batched_mm for few token-expert pairs on
    CUDA (decode), grouped_mm for many; on CPU the model's own backend (`default`).
    """

    def __init__(self, blocks: list, pool: SlotPool, device: torch.device, configured: str = "auto", *,
                 default: str = "grouped_mm"):
        from transformers.integrations import moe as tmoe  # noqa: PLC0415 - transformers, at attach

        self.blocks, self.pool, self.device = blocks, pool, device
        self.configured, self.default = configured, default
        self.fns = {"batched_mm": tmoe.batched_mm_experts_forward,
                    "grouped_mm": tmoe.grouped_mm_experts_forward,
                    "eager": type(blocks[0].experts).forward.__wrapped__}
        self.views = [_PoolView(b.experts, pool.gate_up, pool.down) for b in blocks]

    def name(self, pairs: int) -> str:
        """The kernel for `pairs` token-expert pairs."""
        if self.configured != "auto":
            return self.configured
        if self.device.type == "cuda":
            return "batched_mm" if pairs <= BATCHED_MM_MAX_PAIRS else "grouped_mm"
        return self.default if self.default in self.fns else "grouped_mm"

    def batched(self, m: int, h: torch.Tensor, slots: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """batched_mm over the whole pool with slots [T, k] already on the device (decode)."""
        return self.fns["batched_mm"](self.views[m], h, slots, w)

    def run(self, m: int, h: torch.Tensor, slots: np.ndarray, w_t: torch.Tensor) -> torch.Tensor:
        """MoE layer m's kernel over the slot pool; slots [T, k] replace expert ids.

        batched_mm gathers by index, so it sees the whole pool. grouped_mm and eager make one
        group per "expert" (grouped_mm allows at most 1024), so they see the narrowest window of
        the pool holding the slots used (a per-layer partition is contiguous), or a compact copy
        of those slots when a pooled cache scatters them wider.
        """
        name = self.name(slots.size)
        if name == "batched_mm":
            view, idx = self.views[m], slots
        else:
            lo, hi = int(slots.min()), int(slots.max()) + 1
            experts = self.blocks[m].experts
            gate_up, down = self.pool.gate_up, self.pool.down
            if hi - lo <= MAX_KERNEL_GROUPS:
                view = _PoolView(experts, gate_up[lo:hi], down[lo:hi])
                idx = slots - lo
            else:
                sel = np.unique(slots)
                sel_t = torch.from_numpy(sel).to(self.device, non_blocking=True)
                view = _PoolView(experts, gate_up.index_select(0, sel_t), down.index_select(0, sel_t))
                idx = np.searchsorted(sel, slots)
        slot_t = torch.from_numpy(np.ascontiguousarray(idx)).to(self.device, non_blocking=True)
        return self.fns[name](view, h, slot_t, w_t)
