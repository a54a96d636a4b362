"""The quality side of adaptive-k.

(a) From a routing trace (torch-free): the share of each token's top-k gate mass that a
    threshold drops, per token and layer, averaged (`dropped_mass_table`). A first-order
    proxy: the trace was recorded with exact top-k, so later layers' routing under adaptive-k
    (which shifts the hidden state) is not in it.
(b) With real weights (`measure_quality`): the model runs on the real runtime
    (`expertflow.runtime.offload`, every expert resident, `adaptive_k.threshold = t`) over a
    prompt set with teacher forcing, one forward per batch of prompts, and we compare its
    next-token distributions with full top-k (threshold 1.0, which equals the un-offloaded
    model): perplexity, its relative change, KL(full || adaptive), and the dropped mass the
    runtime counted. The relative perplexity increase is the study's `quality_loss`.
    `measure_tables` measures one table per (renormalize, min_k) the search space searches:
    min_k changes what a threshold keeps (min_k 2 at threshold 0.7 keeps 2 experts where min_k
    1 keeps 1), so each min_k gets its own measured table.

Shape legend: B = prompts in a batch, S = tokens per prompt, V = vocabulary, k = top-k.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.core import adaptive_k
from expertflow.errors import DataError

from .profiler.activation import default_prompt_file, load_prompts, tokenize_prompts
from .progress import Reporter

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# ---- (a) dropped gate mass from a trace -----------------------------------------------------
def dropped_mass_table(trace, thresholds=THRESHOLDS, *, min_k: int = 1) -> list[dict[str, float]]:
    """Per threshold: mean dropped share of the top-k gate mass per token and layer, and the
    experts kept per token (all layers). Uses the runtime's own rule (expertflow.core)."""
    if trace.num_tokens == 0:
        raise DataError("routing trace has no tokens; profile with a non-empty prompt set")
    k = trace.top_k
    w = trace.weights.reshape(-1, k)  # [N*L, k]
    rows = []
    for t in sorted(thresholds):
        mask = adaptive_k.keep_mask(w, t, min(min_k, k))
        rows.append({"threshold": float(t),
                     "dropped_mass": float(adaptive_k.dropped_mass(w, mask).mean()),
                     "activated_per_token": float(mask.sum() / trace.num_tokens)})
    return rows


# ---- prompts --------------------------------------------------------------------------------
@dataclass
class QualitySide:
    """The quality side of adaptive-k for one tuning run (tuner.stages.quality_side): measured
    perplexity increase with real weights, else the trace's dropped gate mass."""

    metric: str  # "perplexity_increase" | "dropped_mass"
    cap: float | None
    table: list[dict[str, float]] | None  # per threshold, for tuning.json and the report
    tables: dict | None = None  # (renormalize, min_k) -> {threshold: loss}, for the study (measured)
    prompt_ids: list[list[int]] | None = None  # the prompts measured on (real weights)
    device: str | None = None  # where it was measured
    dtype: str | None = None
    prompts: str | None = None  # the prompt file given (None: the checkpoint's own or embedded)


def prompt_ids(spec, path=None, *, n_prompts: int | None = None, max_tokens: int = 64,
               min_tokens: int = 8) -> list[list[int]]:
    """Token ids of the prompt set (`path`, else the checkpoint's prompts.jsonl, else the
    embedded set), each cut to `max_tokens`; prompts shorter than `min_tokens` are left out.
    Reads and tokenizes with the profiler's functions (one prompt format for both)."""
    src = path if path is not None else default_prompt_file(spec)
    ids = [x[:max_tokens] for x in tokenize_prompts(spec, load_prompts(src)) if len(x) >= min_tokens]
    if not ids:
        raise DataError(f"no prompt has at least {min_tokens} tokens; pass longer prompts with --prompts")
    return ids[:n_prompts] if n_prompts else ids


# ---- (b) measured with real weights ---------------------------------------------------------
@dataclass
class QualityTable:
    """Measured quality of adaptive-k against full top-k on one prompt set."""

    rows: list[dict[str, float]]  # threshold, perplexity, perplexity_change, kl, dropped_mass
    tokens: int  # next-token predictions scored
    prompts: int
    renormalize: bool = False
    min_k: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def loss_table(self) -> dict[float, float]:
        """{threshold: relative perplexity increase (>= 0)} for the simulator."""
        return {r["threshold"]: max(0.0, r["perplexity_change"]) for r in self.rows}

    def row(self, threshold: float) -> dict[str, float] | None:
        return next((r for r in self.rows if abs(r["threshold"] - threshold) < 1e-9), None)

    def as_dicts(self) -> list[dict[str, float]]:
        return [dict(r) for r in self.rows]


def resident_config(spec, *, device: str = "cpu", dtype: str = "float32"):
    """A RuntimeConfig that keeps every expert of `spec` resident (no offloading at all)."""
    plan = plan_memory(spec, 2**50, max_context_tokens=1024, prefill_chunk_tokens=64, dtype=dtype)
    return default_config(spec, plan, device=device, dtype=dtype).with_values(
        {"prefetch.depth": 0, "cache.warm_start": False})


def _batches(prompts: list[list[int]], batch_size: int):
    """Batches of equal-length prompts (no padding needed): grouped by length."""
    by_len: dict[int, list[list[int]]] = {}
    for ids in prompts:
        by_len.setdefault(len(ids), []).append(ids)
    for n in sorted(by_len):
        group = by_len[n]
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def measure_quality(spec, thresholds=THRESHOLDS, *, prompts: list[list[int]], device: str = "cpu",
                    dtype: str = "float32", renormalize: bool = False, min_k: int = 1,
                    batch_size: int = 32, model=None, progress: bool = False) -> QualityTable:
    """Perplexity / KL of adaptive-k against full top-k on `prompts` (token id lists).

    One forward per batch and threshold on the real runtime; threshold 1.0 is the reference
    and is always measured. `model` may be passed in (built once by the caller).
    """
    import torch

    from expertflow.runtime.loading import build_model  # noqa: PLC0415 - torch, only when it runs
    from expertflow.runtime.offload import offload  # noqa: PLC0415 - torch, only when it runs

    if not prompts:
        raise DataError("no prompts to measure quality on; pass a prompt file with --prompts")
    ths = sorted({float(t) for t in thresholds} | {1.0})
    for t in ths:
        if not 0.0 < t <= 1.0:
            raise DataError(f"adaptive-k threshold {t} must be in (0, 1]")
    if model is None:
        model = build_model(spec, device=device, dtype=dtype)
    base = resident_config(spec, device=device, dtype=dtype)
    nll = {t: 0.0 for t in ths}  # summed negative log-likelihood
    kl = {t: 0.0 for t in ths}
    dropped = {t: 0.0 for t in ths}
    visits = {t: 0 for t in ths}
    n_tok = 0
    batches = list(_batches(prompts, batch_size))
    with torch.no_grad(), Reporter(progress, tty_only=False, transient=True) as bars:
        bar = bars.task("measuring adaptive-k quality", len(batches) * len(ths))
        for batch in batches:
            ids = torch.tensor(batch, device=device)  # [B, S]
            target = ids[:, 1:]  # [B, S-1]
            ref = None
            for t in sorted(ths, reverse=True):  # 1.0 first: the reference
                cfg = base.with_values({"adaptive_k.threshold": t, "adaptive_k.renormalize": renormalize,
                                        "adaptive_k.min_k": min(min_k, spec.top_k)})
                with offload(model, cfg, device=device) as handle:
                    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, S-1, V]
                    stats = handle.stats["total"]
                logp = torch.log_softmax(logits, dim=-1)
                nll[t] += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
                dropped[t] += stats["dropped_mass"]
                visits[t] += stats["tokens"]
                if ref is None:
                    ref = logp
                else:
                    kl[t] += float((ref.exp() * (ref - logp)).sum())
                bar.advance()
            n_tok += target.numel()
    ppl_full = math.exp(nll[1.0] / n_tok)
    rows = []
    for t in ths:
        ppl = math.exp(nll[t] / n_tok)
        rows.append({"threshold": t, "perplexity": ppl, "perplexity_change": ppl / ppl_full - 1.0,
                     "kl": kl[t] / n_tok, "dropped_mass": dropped[t] / visits[t] if visits[t] else 0.0})
    return QualityTable(rows, n_tok, len(prompts), renormalize, min_k, str(device), dtype)


def measure_config_quality(spec, config, *, prompts: list[list[int]], device: str = "cpu",
                           dtype: str = "float32", model=None) -> dict[str, float]:
    """The quality of one config's adaptive-k settings, measured like `measure_quality`:
    {'perplexity', 'perplexity_change', 'kl', 'dropped_mass', 'quality_loss'}."""
    a = config.adaptive_k
    table = measure_quality(spec, [a.threshold], prompts=prompts, device=device, dtype=dtype,
                            renormalize=a.renormalize, min_k=a.min_k, model=model)
    row = table.row(a.threshold)
    return {**{k: float(v) for k, v in row.items() if k != "threshold"},
            "quality_loss": max(0.0, row["perplexity_change"])}


def searched_min_ks(space, top_k: int, default: int = 1) -> list[int]:
    """The adaptive_k.min_k values a (resolved) search space can pick, else [default]."""
    p = space.params.get("adaptive_k.min_k") if space is not None else None
    if p is None:
        return [min(default, top_k)]
    vals = p.values() if p.type in ("categorical", "bool") else p.grid(64)
    return sorted({min(int(v), top_k) for v in vals})


def measure_tables(spec, thresholds, *, prompts: list[list[int]], min_ks=(1,), renorms=(False,),
                   device: str = "cpu", dtype: str = "float32", progress: bool = False
                   ) -> tuple[dict[tuple[bool, int], dict[float, float]], list[dict[str, float]]]:
    """The quality tables the study reads, one per (renormalize, min_k) searched:
    ({(renormalize, min_k): {threshold: loss}}, the measured rows with both keys as columns).
    min_k >= top_k keeps every expert (exact top-k): its table is 0 without a measurement."""
    from expertflow.runtime.loading import build_model  # noqa: PLC0415 - torch, only when it runs

    model = build_model(spec, device=device, dtype=dtype)
    tables: dict[tuple[bool, int], dict[float, float]] = {}
    rows: list[dict[str, float]] = []
    for r in renorms:
        for mk in sorted(set(min_ks)):
            if mk >= spec.top_k:
                tables[(bool(r), mk)] = {float(t): 0.0 for t in sorted(set(thresholds) | {1.0})}
                continue
            t = measure_quality(spec, thresholds, prompts=prompts, device=device, dtype=dtype,
                                renormalize=r, min_k=mk, model=model, progress=progress)
            tables[(bool(r), mk)] = t.loss_table()
            rows += [{**row, "min_k": mk, "renormalize": bool(r)} for row in t.as_dicts()]
    return tables, rows


def format_table(rows: list[dict[str, float]]) -> str:
    """A plain-text table: threshold, perplexity, relative change, KL, dropped mass."""
    head = f"{'threshold':>9}  {'perplexity':>10}  {'change':>8}  {'KL':>8}  {'dropped mass':>12}"
    lines = [head]
    for r in rows:
        ppl = f"{r['perplexity']:.4f}" if "perplexity" in r else "-"
        ch = f"{r['perplexity_change']:+.2%}" if "perplexity_change" in r else "-"
        kl = f"{r['kl']:.5f}" if "kl" in r else "-"
        lines.append(f"{r['threshold']:>9.2f}  {ppl:>10}  {ch:>8}  {kl:>8}  {r.get('dropped_mass', 0.0):>12.4f}")
    return "\n".join(lines)


def as_array(rows: list[dict[str, float]], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)
