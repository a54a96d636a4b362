"""`ef-run`: load a tuned config and generate with the built-in scheduler, then say how fast
(tokens/s, hit rate, misses, stall) on stderr, or all of it as one JSON object."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence

from expertflow import runner
from expertflow.budget import format_bytes
from expertflow.config import config_json_schema
from expertflow.errors import ConfigError

from .common import (
    examples_epilog,
    models_epilog,
    new_parser,
    positive_int,
    run_handler,
)

_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


def device_arg(text: str) -> str:
    """--device: cpu, cuda or cuda:N (a usage error otherwise, exit 2)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device ExpertFlow runs on; use cpu, cuda or "
                                         "cuda:N")
    return text


def build_run_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-run", "Generate text with a MoE model offloaded by ExpertFlow's scheduler, "
                             "following a tuned config.yaml (from ef-tune).",
                   extra_epilog=[examples_epilog([
                       "ef-run --config ef-out/qwen2-moe-24GB/config.yaml",
                       "ef-run --config ef-out/tiny-qwen2-moe-1GB/config.yaml --device cpu --prompt 'def add(a, b):'"]),
                       models_epilog()])
    p.add_argument("--config", help="the config.yaml ef-tune wrote (required unless --schema)")
    p.add_argument("--model", help="registry alias or local checkpoint directory (default: the "
                                   "model the config was tuned for; an alias runs random weights)")
    p.add_argument("--prompt", default=None, help="prompt text (default: a short built-in prompt)")
    p.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids instead of text (for models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--device", default=None, type=device_arg,
                   help="cuda, cuda:N or cpu (default: the config's runtime.device; --device cpu runs a "
                        "GPU-tuned config on this machine's CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights for aliases (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens/s, "
                                                       "hit rate, stall, counters) on stdout")
    p.add_argument("--schema", action="store_true", help="print the config's JSON Schema and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-run", build_run_parser(), handle, argv)


def handle(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    if not args.config:
        raise ConfigError("--config is required (the config.yaml ef-tune wrote); or pass --schema")
    prep = runner.prepare(args.config, model=args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    for note in prep.notes:
        print(f"ef-run: {note}", file=sys.stderr)
    input_ids, decode = runner.tokenize(prep.spec, args.prompt, args.prompt_ids)
    with building(f"building {prep.spec.name} ({_count(prep.host_need.params)} parameters, "
                  f"{format_bytes(prep.host_need.total_bytes)} in host memory) on {prep.device}"):
        _, handle = runner.build(prep, seed=args.seed)
    out = runner.generate(prep, handle, input_ids, decode=decode)
    if args.json:
        print(json.dumps(out))
        return 0
    print(out["text"] if out["text"] is not None else " ".join(map(str, out["token_ids"])))
    print(f"\n{out['new_tokens']} tokens on {out['device']} ({out['engine']} engine): "
          f"{out['decode_tokens_per_s']:.2f} tokens/s decode, prefill {out['prefill_ms']:.1f} ms, "
          f"hit rate {out['hit_rate']:.1%}, {out['misses']} misses ({out['misses_per_token']:.1f} per token), "
          f"stall {out['stall_ms_per_token']:.2f} ms/token", file=sys.stderr)
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


@contextlib.contextmanager
def building(what: str) -> Iterator[None]:
    """Progress while a model is built or loaded: a rich spinner on a terminal, else one line
    before (stderr). transformers' own weight-loading bars are switched off meanwhile, so they
    do not mix into ours."""
    from rich.console import Console  # noqa: PLC0415 - rich, only when it runs
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - transformers, only when it runs

    console = Console(stderr=True)
    t0 = time.perf_counter()
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if console.is_terminal:
            with console.status(f"ef-run: {what} ..."):
                yield
        else:
            print(f"ef-run: {what} ...", file=sys.stderr, flush=True)
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    print(f"ef-run: model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
