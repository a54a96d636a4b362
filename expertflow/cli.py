"""`ef-run`: load a tuned config and generate with the built-in scheduler."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ._cli import new_parser, run_handler


def build_run_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-run", "Generate text with a MoE model offloaded by ExpertFlow's scheduler, "
                             "following a tuned config.yaml (from ef-tune).")
    p.add_argument("--config", help="the config.yaml ef-tune wrote (required unless --schema)")
    p.add_argument("--model", help="registry alias or local checkpoint directory (default: the "
                                   "model the config was tuned for; an alias runs random weights)")
    p.add_argument("--prompt", default=None, help="prompt text (default: a short built-in prompt)")
    p.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids instead of text (for models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights for aliases (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens/s, "
                                                       "hit rate, stall, counters) on stdout")
    p.add_argument("--schema", action="store_true", help="print the config's JSON Schema and exit")
    return p


def run_main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-run", build_run_parser(), "expertflow.runner:cli_run", argv)
