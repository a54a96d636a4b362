"""Prompts, tokenization and real routing traces.

Real routing: the model (trained weights when the checkpoint has them, else random weights)
runs one prefill forward per batch of prompts with ExpertFlow's runtime attached, every expert
resident and trace recording on; the runtime records each MoE layer's top-k ids, gate weights
and the next-gate predictor's guesses for 1..4 layers ahead (expertflow/trace.py). For a causal
LM a token is routed the same in prefill as when decoded one at a time, so these traces also
describe decode streams.

Prompt files: JSONL (one object per line with a string "prompt" field; chosen for *.jsonl /
*.json files or when the first non-blank line starts with "{"), else plain text with prompts
separated by blank lines. Without a file: the checkpoint's own prompts.jsonl when it has one
(`default_prompt_file`), else the set that ships in tuner/data/prompts.jsonl.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path

import numpy as np

from expertflow.budget import plan_memory
from expertflow.config import default_config
from expertflow.errors import DataError, ModelError
from expertflow.registry import ModelSpec
from expertflow.trace import RoutingTrace

from ..progress import NULL, Reporter

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 512
BATCH_TOKENS = 4096
MAX_BATCH = 64


# ---- prompts ---------------------------------------------------------------------------------
def default_prompts_path() -> Path:
    return Path(str(resources.files("tuner") / "data" / "prompts.jsonl"))


def default_prompt_file(spec) -> Path | None:
    """The prompt set used when none is given: the checkpoint's own prompts.jsonl when it ships
    one (pydocs-moe does), else None (the embedded set). The profiler's trace and the quality
    table both start from it, so routing and quality are measured on the same prompts."""
    if getattr(spec, "checkpoint", None):
        f = Path(spec.checkpoint) / "prompts.jsonl"
        if f.is_file():
            return f
    return None


def prompt_source(spec, path: str | Path | None) -> str:
    """Where the prompts come from, in words (profile.yaml routing.source)."""
    if path is not None:
        return str(path)
    own = default_prompt_file(spec)
    return f"{own} (the checkpoint's own prompts)" if own else "embedded default prompt set"


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a JSONL or text file (None = the embedded default set). Raises DataError."""
    p = Path(path) if path is not None else default_prompts_path()
    if not p.is_file():
        raise DataError(f"prompt file {str(p)!r} does not exist; pass a JSONL file with a 'prompt' "
                        "field per line, or a text file with prompts separated by blank lines")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"prompt file {str(p)!r} cannot be read as UTF-8 text ({exc.__class__.__name__}); "
                        "pass a UTF-8 JSONL or text file") from None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if p.suffix.lower() in (".jsonl", ".json") or first.startswith("{"):
        prompts = _parse_jsonl(text, p)
    else:
        prompts = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    if not prompts:
        raise DataError(f"prompt file {str(p)!r} holds no prompts (it is empty or blank); write at "
                        "least one prompt")
    return prompts


def _parse_jsonl(text: str, p: Path) -> list[str]:
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"prompt file {str(p)!r} line {i} is not valid JSON ({exc.msg}); write one "
                            "JSON object per line, e.g. {\"prompt\": \"...\"}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise DataError(f"prompt file {str(p)!r} line {i} has no string 'prompt' field; write "
                            "one JSON object per line, e.g. {\"prompt\": \"...\"}")
        if obj["prompt"].strip():
            prompts.append(obj["prompt"])
    return prompts


# ---- tokens ----------------------------------------------------------------------------------
def tokenizer_kind(spec: ModelSpec) -> str:
    if spec.checkpoint and (Path(spec.checkpoint) / "tokenizer.json").is_file():
        return "tokenizer.json"
    return "bytes"


def tokenize_prompts(spec: ModelSpec, prompts: list[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per prompt: the checkpoint's tokenizer.json, or (aliases, checkpoints without
    one) the prompt's UTF-8 bytes modulo the vocabulary. Each prompt is cut to
    min(512, max_position_embeddings) tokens; `max_tokens` caps the total (the last prompt is
    cut to fit). Empty results raise DataError."""
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens {max_tokens} must be >= 1")
    limit = min(MAX_PROMPT_TOKENS, int(spec.config.get("max_position_embeddings") or MAX_PROMPT_TOKENS))
    if tokenizer_kind(spec) == "tokenizer.json":
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(spec.checkpoint) / "tokenizer.json"))
        encoded = [list(tok(p)["input_ids"]) for p in prompts]
    else:
        vocab = spec.vocab_size
        encoded = [[b % vocab for b in p.encode("utf-8")] for p in prompts]
    out, total = [], 0
    for ids in encoded:
        ids = ids[:limit]
        if max_tokens is not None:
            ids = ids[:max_tokens - total]
        if ids:
            out.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not out:
        raise DataError("the prompts tokenize to no tokens; pass prompts with text in them")
    return out


# ---- real routing ----------------------------------------------------------------------------
def _check_host_memory(spec: ModelSpec, dtype: str, device_type: str) -> None:
    from .hardware import host_available_bytes  # noqa: PLC0415 - torch, only when it runs

    avail = host_available_bytes()
    if avail is None or spec.has_weights:
        return
    counts = spec.param_counts()
    need = (counts["total"] if device_type == "cpu" else counts["routed"]) * {"float32": 4}.get(dtype, 2)
    if need > 0.85 * avail:
        raise ModelError(f"real routing of {spec.name} with random weights needs ~{need / 2**30:.1f} GiB "
                         f"of host memory but {avail / 2**30:.1f} GiB is available; use --routing "
                         "synthetic (or a machine with more memory)")


def _batches(token_lists: list[list[int]]):
    """Consecutive prompts of equal length, batched without padding (prompt order kept)."""
    batch: list[list[int]] = []
    for ids in token_lists:
        if batch and (len(ids) != len(batch[0]) or len(batch) >= MAX_BATCH
                      or (len(batch) + 1) * len(ids) > BATCH_TOKENS):
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch


def record_routing(spec: ModelSpec, token_lists: list[list[int]], *, device, dtype: str,
                   seed: int = 0, progress: Reporter = NULL, values: dict | None = None) -> RoutingTrace:
    """Run the prompts through the model with the runtime attached; return the routing trace.

    `values`: dotted config keys for the run, e.g. {"adaptive_k.threshold": 0.8}: the trace then
    records each layer's router top-k while the experts adaptive-k drops are left out of the
    computation, so later layers route the hidden states adaptive-k makes."""
    import torch

    from expertflow.runtime.loading import build_model  # noqa: PLC0415 - torch, only when it runs
    from expertflow.runtime.offload import offload  # noqa: PLC0415 - torch, only when it runs

    dev = torch.device(device)
    _check_host_memory(spec, dtype, dev.type)
    model = build_model(spec, device=dev, dtype=dtype, seed=seed, experts_on_host=True,
                        pin_memory=dev.type == "cuda")
    plan = plan_memory(spec, 2 ** 50, dtype=dtype, max_context_tokens=MAX_PROMPT_TOKENS)
    priors = [[1.0 / spec.num_experts] * spec.num_experts for _ in range(spec.num_moe_layers)]
    config = default_config(spec, plan, priors=priors, device=str(dev), dtype=dtype).with_values(
        {"prefetch.depth": 0, "cache.warm_start": True, "runtime.record_trace": True, **(values or {})})
    source = (f"real routing of {spec.name}" + ("" if spec.has_weights else " (RANDOM weights)")
              + f", {len(token_lists)} prompts, {dtype} on {dev.type}")
    handle = offload(model, config, device=str(dev), record_trace=True,
                     trace_meta={"source": source, "model": spec.name,
                                 "normalize_topk": spec.norm_topk_prob})
    batches = list(_batches(token_lists))
    task = progress.task("routing (real)", len(batches))
    try:
        with torch.inference_mode():
            for batch in batches:
                ids = torch.tensor(batch, dtype=torch.long, device=dev)  # [B, S]
                model(input_ids=ids, use_cache=False)
                task.advance()
        trace = handle.trace()
    finally:
        handle.detach()
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    trace.meta["routing"] = "real"
    return trace.validate("recorded trace")


def token_counts(token_lists: list[list[int]]) -> np.ndarray:
    return np.array([len(t) for t in token_lists], dtype=np.int64)
