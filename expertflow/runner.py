"""`ef-run` handler: load a tuned config, build the model straight into offloaded form, generate,
and report tokens/s, hit rate and stall time."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from .budget import check_host_memory, format_bytes
from .config import config_json_schema, load_config
from .errors import ConfigError, DataError, DeviceError, ModelError
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


def _config_device(config, path) -> str:
    """The config's device; a GPU config on a machine without one is refused in plain words."""
    import torch

    dev = config.runtime.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"config {str(path)!r} was tuned for {config.hardware.gpu_name or 'a CUDA GPU'} "
                          f"(runtime.device: {dev}) but this machine has no CUDA GPU; run it on a machine "
                          "with that GPU, or add --device cpu to run it here on the CPU (slowly)")
    return dev


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


@contextlib.contextmanager
def building(what: str):
    """Progress while a model is built or loaded: a rich spinner on a terminal, else one line
    before and one after (stderr). transformers' own weight-loading bars are switched off
    meanwhile, so they do not mix into ours."""
    import time

    from rich.console import Console

    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging = None
    was_enabled = hf_logging.is_progress_bar_enabled() if hf_logging else False
    if hf_logging:
        hf_logging.disable_progress_bar()
    try:
        if console.is_terminal:
            with console.status(f"ef-run: {what} ..."):
                yield
        else:
            print(f"ef-run: {what} ...", file=sys.stderr, flush=True)
            yield
    finally:
        if hf_logging and was_enabled:
            hf_logging.enable_progress_bar()
    print(f"ef-run: model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


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
    from .runtime.loading import engine_kind, load_model, resolve_device

    device = resolve_device(args.device or _config_device(config, args.config))
    if device.type == "cpu" and config.runtime.device.startswith("cuda"):
        print(f"ef-run: note: config was tuned for {config.hardware.gpu_name or 'a CUDA GPU'} "
              f"(runtime.device: {config.runtime.device}); running it on the CPU (--device cpu), so "
              "speeds will not match its predictions", file=sys.stderr)
    gpu = current_gpu_name()
    if config.hardware.gpu_name and gpu and gpu != config.hardware.gpu_name:
        print(f"ef-run: warning: config was tuned for {config.hardware.gpu_name!r} but this GPU is "
              f"{gpu!r}; it runs, but re-tune for best speed", file=sys.stderr)
    input_ids, decode = tokenize(spec, args.prompt, args.prompt_ids)
    need = check_host_memory(spec, dtype=config.runtime.dtype, device=str(device),
                             pin_memory=config.runtime.pin_memory)
    with building(f"building {spec.name} ({_count(need.params)} parameters, "
                  f"{format_bytes(need.total_bytes)} in host memory) on {device}"):
        model, handle = load_model(str(spec.checkpoint or spec.name), config, device=str(device), seed=args.seed)
    with handle:
        handle.reset_stats()
        res = handle.generate(input_ids, args.max_new_tokens)
        stats = handle.stats
    engine = engine_kind(config, device)
    new_ids = res.sequences[0, input_ids.shape[1]:].tolist()
    t = stats["total"]
    decode_tokens = max(res.new_tokens - 1, 0)
    out = {
        "model": spec.name, "config": str(args.config), "device": str(device), "engine": engine,
        "prompt_tokens": int(input_ids.shape[1]), "new_tokens": res.new_tokens,
        "token_ids": new_ids, "text": decode(new_ids) if decode else None,
        "decode_tokens_per_s": res.decode_tokens_per_s, "prefill_ms": res.prefill_s * 1000,
        "hit_rate": t["hit_rate"], "misses": t["misses"],
        "misses_per_token": t["misses"] / res.new_tokens if res.new_tokens else 0.0,
        "stall_ms_per_token": t["stall_ms"] / decode_tokens if decode_tokens else 0.0,
        "bytes_moved": t["bytes_moved"], "prefetch_issued": t["prefetch_issued"],
        "prefetch_used": t["prefetch_used"], "activated_per_token": t["activated_per_token"],
    }
    if args.json:
        print(json.dumps(out))
    else:
        shown = out["text"] if out["text"] is not None else " ".join(map(str, new_ids))
        print(shown)
        print(f"\n{res.new_tokens} tokens on {device} ({engine} engine): {out['decode_tokens_per_s']:.2f} "
              f"tokens/s decode, prefill {out['prefill_ms']:.1f} ms, hit rate {out['hit_rate']:.1%}, "
              f"{out['misses']} misses ({out['misses_per_token']:.1f} per token), "
              f"stall {out['stall_ms_per_token']:.2f} ms/token", file=sys.stderr)
    return 0
