"""`ef-tune` and `ef-profile` command lines (argparse only; handlers import lazily)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from expertflow._cli import new_parser, run_handler

from .coordination import DEFAULT_HEARTBEAT_S, DEFAULT_TRIALS


def build_profile_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-profile", "Profile a MoE model and this machine: per-expert activation "
                                 "frequency, host->device transfer latency, expert kernel time, "
                                 "hardware. Writes a versioned profile directory.")
    p.add_argument("--model", required=True, help="registry alias (e.g. qwen2-moe) or local "
                                                  "Hugging Face checkpoint directory")
    p.add_argument("--prompts", default=None, help="prompt file: text (one prompt per blank-line "
                                                   "separated block) or JSONL with a 'prompt' field "
                                                   "(default: the embedded prompt set)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where to measure (default: cuda if present, else cpu)")
    p.add_argument("--out", required=True, help="output profile directory")
    p.add_argument("--routing", default="auto", choices=["auto", "real", "synthetic"],
                   help="real = run the model's router (needs weights); synthetic = calibrated "
                        "generator (default: real when weights exist)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on routed tokens to record (default: all prompts)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def build_tune_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-tune", "Profile (or reuse a profile), tune ExpertFlow's scheduler with an "
                              "Optuna study over a trace-driven simulator, validate, and write a "
                              "deployable config.yaml and an HTML report.")
    p.add_argument("--model", required=True, help="registry alias (e.g. qwen2-moe) or local "
                                                  "checkpoint directory")
    p.add_argument("--budget", required=True, help="GPU memory budget, e.g. 24GB (10^9 bytes) or "
                                                   "22GiB (2^30 bytes)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                   help=f"the study's total trials (default {DEFAULT_TRIALS}); workers sharing a study "
                        "split them: give each the same N")
    p.add_argument("--timeout", type=float, default=None, help="stop the study after this many seconds")
    p.add_argument("--out", default=None, help="output folder (default: ef-out/<model>-<budget>)")
    p.add_argument("--hardware", default=None,
                   help="tune for a bundled hardware profile (e.g. h200) instead of this machine; "
                        "default: this GPU if present, else h200")
    p.add_argument("--profile", default=None, help="reuse this profile directory (skip profiling)")
    p.add_argument("--prompts", default=None, help="prompt file for profiling (see ef-profile)")
    p.add_argument("--search-space", default=None,
                   help="search-space YAML (default: search_spaces/<model>.yaml or default.yaml)")
    p.add_argument("--max-quality-loss", type=float, default=None,
                   help="cap on quality loss of adaptive-k: relative perplexity increase when "
                        "weights are present, else mean dropped gate mass per token (default 0.02; "
                        "0 = exact top-k only)")
    p.add_argument("--max-context", type=int, default=4096, help="KV-cache tokens to reserve (default 4096)")
    p.add_argument("--max-batch", type=int, default=1, help="sequences per batch to reserve for (default 1)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://user@host/db (default: SQLite in --out); "
                        "with --study, workers on many machines share one study")
    p.add_argument("--study", default=None, help="study name (default: derived from model and budget); "
                                                 "with --storage, joins the study when it exists")
    p.add_argument("--resume", action="store_true", help="continue an existing study in the storage")
    p.add_argument("--export-only", action="store_true",
                   help="run no trial: export the existing study's results into --out")
    p.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_S, metavar="SECONDS",
                   help=f"a running trial's heartbeat interval (default {DEFAULT_HEARTBEAT_S}); a worker "
                        "silent for 3 beats is taken as dead and its trial re-run by another")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="device for profiling and validation (default: cuda if present)")
    p.add_argument("--jobs", type=int, default=None,
                   help="study worker processes sharing the storage (default 1; more pays with a "
                        "server storage such as PostgreSQL, not with SQLite)")
    p.add_argument("--no-validate", action="store_true", help="skip validation on the real runtime")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--json", action="store_true",
                   help="last stdout line: one JSON object with config_path, report_path, predicted metrics")
    return p


def profile_main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-profile", build_profile_parser(), "tuner.profiler:cli_profile", argv)


def tune_main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-tune", build_tune_parser(), "tuner.pipeline:cli_tune", argv)
