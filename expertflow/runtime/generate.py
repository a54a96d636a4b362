"""A lean greedy decode loop (prefill, then one token per step) with timing.

`transformers.generate()` does the same arithmetic with more per-step host work (logits
processors, stopping criteria, output bookkeeping); at batch-1 decode the host is the
bottleneck, so ef-run and the benchmarks use this loop. Logits equal generate()'s greedy ones.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt + new]
    new_tokens: int  # per sequence
    prefill_s: float
    decode_s: float
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per new token, if kept

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens (all sequences) per second of decode, the prefill excluded."""
        b = self.sequences.shape[0]
        steps = max(self.new_tokens - 1, 0)  # the first new token comes from the prefill
        return b * steps / self.decode_s if self.decode_s > 0 else 0.0


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                    attention_mask: torch.Tensor | None = None, keep_logits: bool = False,
                    on_step=None) -> GenerationResult:
    """Greedy decoding of `max_new_tokens` tokens for a batch of equal-length prompts."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = DynamicCache(config=model.config)
    key = _cache_kwarg(model)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones((b, s), dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device)
    logits_kept: list[torch.Tensor] = []
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                logits_to_keep=1, **{key: cache})
    logits = out.logits[:, -1, :]
    nxt = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
    if keep_logits:
        logits_kept.append(logits.float().cpu())
    tokens = [nxt]
    _sync(device)
    t1 = time.perf_counter()
    for i in range(1, max_new_tokens):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((b, 1))], dim=1)
        out = model(input_ids=nxt, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                    **{key: cache})
        logits = out.logits[:, -1, :]
        nxt = logits.argmax(dim=-1, keepdim=True)
        if keep_logits:
            logits_kept.append(logits.float().cpu())
        tokens.append(nxt)
        if on_step is not None:
            on_step(i)
    _sync(device)
    t2 = time.perf_counter()
    seq = torch.cat([input_ids] + tokens, dim=1) if max_new_tokens > 0 else input_ids
    return GenerationResult(seq.cpu(), max_new_tokens, t1 - t0, t2 - t1, logits_kept)
