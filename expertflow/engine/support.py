"""What the graph engine needs from a model, and its device-side and torch-side helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..core.engine_cache import staging_ranks
from ..errors import ConfigError, ModelError


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, prompt + new] on the CPU
    new_tokens: int
    prefill_s: float
    decode_s: float
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] float32 per new token

    @property
    def decode_tokens_per_s(self) -> float:
        b = self.sequences.shape[0]
        steps = max(self.new_tokens - 1, 0)
        return b * steps / self.decode_s if self.decode_s > 0 else 0.0


def check_context(max_len: int, prompt_tokens: int, new_tokens: int) -> None:
    """The graph engine's KV cache is reserved for memory.max_context_tokens: refuse more."""
    if prompt_tokens + new_tokens > max_len:
        raise ConfigError(f"memory.max_context_tokens {max_len} is less than the prompt ({prompt_tokens}) + "
                          f"{new_tokens} new tokens: the graph engine's KV cache is reserved for "
                          "max_context_tokens; raise it in the config (ef-tune --max-context) or "
                          "generate fewer tokens")


def check_supported(model, blocks) -> None:
    """ModelError unless the engine's kernels and model loop fit this model."""
    cfg = model.config
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"the graph engine computes SiLU-gated experts; this model's hidden_act is "
                         f"{act!r}: use runtime.engine: eager")
    ex = blocks[0].experts
    if getattr(ex, "is_transposed", False) or not getattr(ex, "is_concatenated", True):
        raise ModelError(f"{type(ex).__name__} stores gate/up transposed or interleaved; the graph "
                         "engine reads [gate; up] rows: use runtime.engine: eager")
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types - {"full_attention"}:
        raise ModelError(f"the graph engine attends over full causal attention; this model has "
                         f"{sorted(types)} layers: use runtime.engine: eager")
    base = getattr(model, "model", model)
    for name in ("norm", "rotary_emb", "layers"):
        if not hasattr(base, name):
            raise ModelError(f"{type(base).__name__} has no .{name}; the graph engine needs the "
                             "standard decoder layout: use runtime.engine: eager")


def device_adaptive_k(ids: torch.Tensor, w: torch.Tensor, threshold: float, min_k: int,
                      renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """expertflow.core.adaptive_k's rule on the device: (ids with dropped = -1, new weights)."""
    wd = w.to(torch.float32).to(torch.float64)  # [T, k]
    k = wd.shape[1]
    pos = torch.arange(k, device=w.device)
    wi, wj = wd[:, :, None], wd[:, None, :]
    heavier = (wi > wj) | ((wi == wj) & (pos[:, None] < pos[None, :]))  # [T, i, j]
    rank = heavier.sum(dim=1)
    mass_before = (heavier * wi).sum(dim=1)
    total = wd.sum(dim=1, keepdim=True)
    keep = (mass_before < threshold * total) | (rank < min_k)
    out = torch.where(keep, wd, torch.zeros_like(wd))
    if renormalize:
        kept = out.sum(dim=1, keepdim=True)
        out = out * torch.where(kept > 0, total / kept, torch.ones_like(kept))
    new_w = out.to(torch.float32).to(w.dtype)
    return torch.where(keep, ids, torch.full_like(ids, -1)), new_w


def experts_torch(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, m: int, loc: list[int],
                  stage: list[int], pool, store) -> tuple[torch.Tensor, int]:
    """The experts through the tables in torch (prefill, and decode on CPU): each needed expert
    once, from its slot or copied from the host store; with `stage` (staging slots of the step's
    parity), the r-th miss is also written into stage[r], as the Triton kernel does.
    Returns (output [T, H], experts copied from the host)."""
    ids_np = ids.cpu().numpy()
    out = torch.zeros_like(h)
    rank = dict(staging_ranks(ids_np, [s >= 0 for s in loc])) if stage else {}
    wd = w.to(h.dtype)
    copied = 0
    for e in sorted({int(x) for x in ids_np.ravel() if x >= 0}):
        s = loc[e]
        if s >= 0:
            gu, dn = pool.gate_up[s], pool.down[s]
        else:
            gu = store.gate_up[m][e].to(h.device, non_blocking=True)
            dn = store.down[m][e].to(h.device, non_blocking=True)
            copied += 1
            r = rank.get(e, len(stage))
            if r < len(stage) and stage[r] >= 0:
                pool.gate_up[stage[r]].copy_(gu)
                pool.down[stage[r]].copy_(dn)
        tok, j = np.nonzero(ids_np == e)
        tok_t = torch.as_tensor(tok, device=h.device)
        j_t = torch.as_tensor(j, device=h.device)
        g, u = nn.functional.linear(h.index_select(0, tok_t), gu).chunk(2, dim=-1)
        y = nn.functional.linear(nn.functional.silu(g) * u, dn)
        out.index_add_(0, tok_t, y * wd[tok_t, j_t, None])
    return out, copied
