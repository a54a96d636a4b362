"""`ef-run` handler: load a tuned config, build the model straight into offloaded form, generate,
and report tokens/s, hit rate and stall time."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import config_json_schema, load_config
from .errors import ConfigError, DataError, ModelError
from .registry import ModelSpec, resolve_model

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def check_model_matches(config, spec: ModelSpec) -> None:
    """Refuse a config tuned for another model (by dims fingerprint)."""
    if config.model.fingerprint != spec.fingerprint:
        raise ModelError(
            f"config was tuned for {config.model.name!r} (fingerprint {config.model.fingerprint}) but "
            f"--model {spec.name!r} has fingerprint {spec.fingerprint} (different dims); tune a config "
            f"for it: ef-tune --model {spec.name} --budget ...")


def current_gpu_name() -> str | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None


def tokenize(spec: ModelSpec, prompt: str | None, prompt_ids: str | None):
    """(input_ids [1, S], decode function). Checkpoints use their tokenizer.json; aliases (random
    weights, no tokenizer) map the prompt's UTF-8 bytes to ids modulo the vocabulary."""
    import torch

    if prompt_ids:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {prompt_ids!r} is not a comma-separated list of integers; "
                              "write e.g. --prompt-ids 1,2,3") from None
        if not ids or any(i < 0 or i >= spec.vocab_size for i in ids):
            raise ConfigError(f"--prompt-ids {prompt_ids!r}: need at least one id, each in "
                              f"[0, {spec.vocab_size}) for {spec.name}")
        return torch.tensor([ids]), None
    text = DEFAULT_PROMPT if prompt is None else prompt
    if not text:
        raise DataError("--prompt is empty; pass some text (or --prompt-ids)")
    tok_file = Path(spec.checkpoint) / "tokenizer.json" if spec.checkpoint else None
    if tok_file is not None and tok_file.is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        return torch.tensor([tok.encode(text)]), tok.decode
    ids = [b % spec.vocab_size for b in text.encode("utf-8")]
    return torch.tensor([ids]), None


def cli_run(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    if not args.config:
        raise ConfigError("--config is required (the config.yaml ef-tune wrote); or pass --schema")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    config = load_config(args.config)
    spec = resolve_model(args.model or config.model.name)
    check_model_matches(config, spec)
    from .runtime.generate import greedy_generate
    from .runtime.loading import load_model, resolve_device

    device = resolve_device(args.device or config.runtime.device)
    gpu = current_gpu_name()
    if config.hardware.gpu_name and gpu and gpu != config.hardware.gpu_name:
        print(f"ef-run: warning: config was tuned for {config.hardware.gpu_name!r} but this GPU is "
              f"{gpu!r}; it runs, but re-tune for best speed", file=sys.stderr)
    input_ids, decode = tokenize(spec, args.prompt, args.prompt_ids)
    model, handle = load_model(str(spec.checkpoint or spec.name), config, device=str(device), seed=args.seed)
    with handle:
        handle.reset_stats()
        res = greedy_generate(model, input_ids, args.max_new_tokens)
        stats = handle.stats
    new_ids = res.sequences[0, input_ids.shape[1]:].tolist()
    t = stats["total"]
    decode_tokens = max(res.new_tokens - 1, 0)
    out = {
        "model": spec.name, "config": str(args.config), "device": str(device),
        "prompt_tokens": int(input_ids.shape[1]), "new_tokens": res.new_tokens,
        "token_ids": new_ids, "text": decode(new_ids) if decode else None,
        "decode_tokens_per_s": res.decode_tokens_per_s, "prefill_ms": res.prefill_s * 1000,
        "hit_rate": t["hit_rate"], "stall_ms_per_token": t["stall_ms"] / decode_tokens if decode_tokens else 0.0,
        "bytes_moved": t["bytes_moved"], "prefetch_issued": t["prefetch_issued"],
        "prefetch_used": t["prefetch_used"], "activated_per_token": t["activated_per_token"],
    }
    if args.json:
        print(json.dumps(out))
    else:
        shown = out["text"] if out["text"] is not None else " ".join(map(str, new_ids))
        print(shown)
        print(f"\n{res.new_tokens} tokens on {device}: {out['decode_tokens_per_s']:.2f} tokens/s decode, "
              f"prefill {out['prefill_ms']:.1f} ms, hit rate {out['hit_rate']:.1%}, "
              f"stall {out['stall_ms_per_token']:.2f} ms/token", file=sys.stderr)
    return 0
