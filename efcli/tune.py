"""`ef-tune`: the tuner, then the report, then what the user reads.

The parser is argparse only (`--help` imports neither torch nor optuna nor plotly); the handler
turns the arguments into a `tuner.request.TuneRequest`, runs `tuner.pipeline.tune`, builds the
report from the output folder (reports.build), and prints the choice and where things are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from expertflow.config import describe_hardware
from tuner.coordination import DEFAULT_HEARTBEAT_S, DEFAULT_TRIALS
from tuner.pipeline import tune
from tuner.profiler.bundled import bundled_hardware_names
from tuner.request import Inputs, QualityOptions, StudyOptions, Target, TuneRequest
from tuner.sensitivity import describe as sensitivity_line

from .common import (
    examples_epilog,
    models_epilog,
    new_parser,
    nonnegative_float,
    positive_float,
    positive_int,
    run_handler,
    sigterm_as_interrupt,
)


def _hardware_epilog() -> str:
    names = bundled_hardware_names()
    return ("bundled hardware profiles (--hardware): " + (", ".join(names) or "none") +
            "; timing measured on that GPU and shipped with ExpertFlow")


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


def main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-tune", build_tune_parser(), handle, argv)


def request(args: argparse.Namespace) -> TuneRequest:
    """The TuneRequest the arguments ask for."""
    return TuneRequest(
        target=Target(model=args.model, budget=args.budget, hardware=args.hardware, device=args.device,
                      max_context=args.max_context, max_batch=args.max_batch),
        inputs=Inputs(out=args.out, force=args.force, profile=args.profile, prompts=args.prompts,
                      search_space=args.search_space),
        study=StudyOptions(trials=args.trials, timeout=args.timeout, storage=args.storage, name=args.study,
                           resume=args.resume, export_only=args.export_only, jobs=args.jobs,
                           heartbeat_s=args.heartbeat, seed=args.seed),
        quality=QualityOptions(max_loss=args.max_quality_loss),
        validate=not args.no_validate)


def handle(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with sigterm_as_interrupt():
        res = tune(request(args))
    report_path = build_report(res) if res.exported and not args.no_report else None
    say = (lambda s: print(s, file=sys.stderr)) if args.json else print
    for n in res.notes:
        say(f"note: {n}")
    if not res.exported:
        rec = res.exported_by or {}
        say(f"nothing written here: the study's results were exported by {rec.get('by')} to {rec.get('out')}")
        if args.json:
            print(json.dumps({"exported": False, "exported_by": rec, "config_path": rec.get("config"),
                              "report_path": None, "tuning_path": None, "trials_run": res.trials_run}))
        return 0
    _print_choice(say, res, report_path, time.perf_counter() - t0)
    if args.json:
        t = res.tuning
        print(json.dumps({"exported": True, "trials_run": res.trials_run, "config_path": str(res.config_path),
                          "report_path": str(report_path) if report_path else None,
                          "tuning_path": str(res.out_dir / "tuning.json"), "chosen_trial": t.chosen.trial,
                          "predicted": t.chosen.predicted, "hardware_source": t.hardware.source,
                          "routing": t.routing.kind, "timing_noisy": bool(t.timing_noise and t.timing_noise.noisy)}))
    return 0


def build_report(res):
    """report.html from the output folder; a report that cannot be built is a note in the
    output and in tuning.json (the config is written: rebuild it with ef-report)."""
    from reports.build import build_report as build  # noqa: PLC0415 - plotly, only when it runs

    t0 = time.perf_counter()
    try:
        path = build(res.out_dir).resolve()
    except Exception as exc:  # noqa: BLE001 - the config is written; say so instead of failing
        path = None
        res.notes.append(f"report could not be built ({exc.__class__.__name__}: {exc}); rebuild it with "
                         f"ef-report {res.out_dir}")
    res.tuning.timings_s["report"] = time.perf_counter() - t0
    res.tuning.notes = res.notes
    res.tuning.save(res.out_dir)
    return path


def _print_choice(say, res, report_path, elapsed_s: float) -> None:
    t, p = res.tuning, res.predicted
    say(f"tuned {t.model.name} for a {t.budget.text} budget ({describe_hardware(t.hardware.model_dump())}, "
        f"routing: {t.routing.kind}) in {elapsed_s:.1f} s")
    say(f"chosen trial {t.chosen.trial}: predicted {p['decode_tokens_per_s']:.2f} tokens/s decode, "
        f"hit rate {p['hit_rate']:.1%}, stall {p['stall_ms_per_token']:.2f} ms/token, "
        f"quality loss {p['quality_loss']:.4f} ({t.quality.metric}, cap {t.quality.cap})")
    band = sensitivity_line(t.sensitivity)
    if band:
        say(band)
    say(f"config: {res.config_path}")
    say(f"report: {report_path if report_path else '(not built)'}")
    say(f"run it: {t.run_command}")
