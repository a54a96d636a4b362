"""`ef-tune` and `ef-profile` command lines (argparse only; handlers import lazily)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from expertflow._cli import (
    bundled_hardware_names,
    examples_epilog,
    models_epilog,
    nonnegative_float,
    positive_float,
    positive_int,
    new_parser,
    run_handler,
)

from .coordination import DEFAULT_HEARTBEAT_S, DEFAULT_TRIALS


def _hardware_epilog() -> str:
    names = bundled_hardware_names()
    return ("bundled hardware profiles (--hardware): " + (", ".join(names) or "none") +
            "; timing measured on that GPU and shipped with ExpertFlow")


def build_profile_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-profile", "Profile a MoE model and this machine: per-expert activation "
                                 "frequency, host->device transfer latency, expert kernel time, "
                                 "hardware. Writes a versioned profile directory.",
                   extra_epilog=[examples_epilog([
                       "ef-profile --model qwen2-moe --out prof/qwen2-moe",
                       "ef-profile --model ./my-checkpoint --out prof/mine --prompts prompts.txt --quick"]),
                       models_epilog()])
    p.add_argument("--model", required=True, help="registry alias (e.g. qwen2-moe) or local "
                                                  "Hugging Face checkpoint directory")
    p.add_argument("--prompts", default=None, help="prompt file: text (one prompt per blank-line "
                                                   "separated block) or JSONL with a 'prompt' field "
                                                   "(default: the embedded prompt set)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where to measure (default: cuda if present, else cpu)")
    p.add_argument("--out", required=True, help="output profile directory (new, empty, or a profile "
                                                "written before, which is replaced)")
    p.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds other files (they are kept)")
    p.add_argument("--routing", default="auto", choices=["auto", "real", "synthetic"],
                   help="real = run the model's router (needs weights); synthetic = calibrated "
                        "generator (default: real when weights exist)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on routed tokens to record (default: all prompts)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and synthetic routing "
                                                        "(default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def build_tune_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-tune", "Profile (or reuse a profile), tune ExpertFlow's scheduler with an "
                              "Optuna study over a trace-driven simulator, validate, and write a "
                              "deployable config.yaml and an HTML report.",
                   extra_epilog=[examples_epilog([
                       "ef-tune --model qwen2-moe --budget 24GB",
                       "ef-tune --model mixtral-8x7b --budget 40GiB --hardware h200 --trials 100 "
                       "--out ef-out/mixtral"]),
                       models_epilog(), _hardware_epilog()])
    p.add_argument("--model", required=True, help="registry alias (e.g. qwen2-moe) or local "
                                                  "checkpoint directory")
    p.add_argument("--budget", required=True, help="GPU memory budget, e.g. 24GB (10^9 bytes) or "
                                                   "22GiB (2^30 bytes)")
    p.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS,
                   help=f"the study's total trials (default {DEFAULT_TRIALS}); workers sharing a study "
                        "split them: give each the same N")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop the study after this many seconds (> 0; default: run all --trials)")
    p.add_argument("--out", default=None, help="output folder (default: ef-out/<model>-<budget>); a "
                                               "folder of other files is refused unless --force")
    p.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds other files (they are kept)")
    p.add_argument("--hardware", default=None,
                   help="tune for a bundled hardware profile (" + (", ".join(bundled_hardware_names()) or "none")
                        + ") instead of this machine; default: this GPU if present, else h200")
    p.add_argument("--profile", default=None, help="reuse this profile directory (skip profiling)")
    p.add_argument("--prompts", default=None, help="prompt file for profiling (see ef-profile)")
    p.add_argument("--search-space", default=None,
                   help="search-space YAML (default: search_spaces/<model>.yaml or default.yaml)")
    p.add_argument("--max-quality-loss", type=nonnegative_float, default=None,
                   help="cap on quality loss of adaptive-k: relative perplexity increase when "
                        "weights are present, else mean dropped gate mass per token (default 0.02; "
                        "0 = exact top-k only)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="KV-cache tokens to reserve (default: the model's max_position_embeddings, "
                        "at most 4096; more than the model's is refused)")
    p.add_argument("--max-batch", type=positive_int, default=1,
                   help="sequences per batch to reserve for (default 1)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://user@host/db (default: SQLite in --out); "
                        "with --study, workers on many machines share one study")
    p.add_argument("--study", default=None, help="study name (default: derived from model and budget); "
                                                 "with --storage, joins the study when it exists")
    p.add_argument("--resume", action="store_true", help="continue an existing study in the storage")
    p.add_argument("--export-only", action="store_true",
                   help="run no trial: export the existing study's results into --out")
    p.add_argument("--heartbeat", type=positive_int, default=DEFAULT_HEARTBEAT_S, metavar="SECONDS",
                   help=f"a running trial's heartbeat interval (default {DEFAULT_HEARTBEAT_S}); a worker "
                        "silent for 3 beats is taken as dead and its trial re-run by another")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, random weights and "
                                                        "synthetic routing (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="device for profiling and validation (default: cuda if present)")
    p.add_argument("--jobs", type=positive_int, default=None,
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
