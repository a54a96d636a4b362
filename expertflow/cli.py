"""`ef-run`: load a tuned config and generate with the built-in scheduler."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import re

from ._cli import examples_epilog, models_epilog, new_parser, positive_int, run_handler

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


def run_main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-run", build_run_parser(), "expertflow.runner:cli_run", argv)
