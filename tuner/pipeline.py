"""`ef-tune`: profile (or reuse a profile), tune, validate, export, report.

    tune(model, budget, ...) -> TuneResult     the library function
    cli_tune(args) -> int                      the handler `ef-tune` calls (tuner/cli.py)

Steps, each a small function below: resolve the model and plan the memory budget (BudgetError
propagates); get a profile (`--profile DIR`, the output folder's own on `--resume`, else the
profiler: this GPU when there is one, else the bundled hardware tables, `h200` by default,
and the output says so); the quality side of adaptive-k (measured perplexity with real
weights, else the trace's dropped gate mass); the Optuna study over the simulator; the choice
(fastest feasible trial within the quality cap, re-simulated on a longer slice; with real
weights its quality is measured for real and a config over the cap is passed over; with
synthetic routing the finalist that stays fastest across a sensitivity band of less and more
local routing: tuner/choice.py);
references; validation on the GPU; config.yaml; tuning.json; report.html.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertflow.errors import ConfigError, DataError, ModelError, UsageError

from . import choice, export, quality, trust
from .coordination import DEFAULT_HEARTBEAT_S, DEFAULT_TRIALS
from .storage import StorageURL, make_storage, mask_url, sqlite_url
from .objective import StudyContext, evaluate, trial_config
from .study import LRU_BASELINE, baseline_values, run_study
from .trials import completed_trials, feasible, finished_count, pareto_front

log = logging.getLogger(__name__)

DEFAULT_QUALITY_CAP = 0.02  # 2% relative perplexity increase, or 2% of the top-k gate mass
DEFAULT_HARDWARE = "h200"
STUDY_DECODE_TOKENS = 128  # trace slice each trial simulates (decode tokens)
FINAL_DECODE_TOKENS = 512  # the finalists and references are re-simulated on this slice
FINALISTS = 3
QUALITY_PROMPTS = 64  # prompts the quality table is measured on (real weights)
VALIDATE_TOKENS = 128  # decode tokens measured per validated config


@dataclass
class TuneResult:
    out_dir: Path
    config_path: Path | None  # None when another worker exported these results (exported_by)
    report_path: Path | None
    tuning: dict[str, Any]
    config: Any
    notes: list[str] = field(default_factory=list)
    exported: bool = True
    exported_by: dict[str, Any] | None = None  # the export record of the worker that did
    trials_run: int = 0  # trials this process ran (a share of the study's when workers share it)

    @property
    def predicted(self) -> dict[str, float]:
        return self.tuning["chosen"]["predicted"]


def default_out_dir(spec, budget_text: str) -> Path:
    name = Path(spec.name).name if spec.checkpoint else spec.name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "", f"{name}-{budget_text}")
    return Path("ef-out") / safe


def _check_device(device: str) -> None:
    """--device cuda without a GPU is an error before anything runs (DeviceError, exit 7)."""
    if device not in ("auto", "cpu", "cuda"):
        from expertflow.errors import DeviceError

        raise DeviceError(f"--device {device!r} is not known; use auto, cuda or cpu")
    if device == "cuda" and not _gpu_here(device):
        from expertflow.errors import DeviceError

        raise DeviceError("--device cuda was requested but no CUDA GPU is available "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")


def _check_prompts(prompts) -> None:
    """A prompt file that is missing, unreadable or empty fails before profiling (DataError)."""
    try:
        from .profiler.activation import load_prompts
    except ImportError:  # the profiler package is optional in a source checkout
        return
    load_prompts(prompts)


def _not_exported(out_dir: Path, run, record: dict[str, Any] | None, notes: list[str]) -> TuneResult:
    """This worker's result when another one exported the same finished study."""
    rec = dict(record or {})
    notes.append(f"study {run.name!r} is complete with {rec.get('finished')} finished trials; another "
                 f"worker ({rec.get('by')}) exported them to {rec.get('out')}, so this one wrote nothing "
                 "(ef-tune --export-only writes them here too)")
    return TuneResult(out_dir.resolve(), None, None, {}, None, notes, exported=False, exported_by=rec)


def _gpu_here(device: str) -> bool:
    if device == "cpu":
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


# ---- profile ----------------------------------------------------------------------------------
def get_profile(spec, out_dir: Path, *, profile_dir=None, resume: bool, hardware: str | None,
                device: str, prompts=None, seed: int = 0, notes: list[str], force: bool = False):
    """(Profile, its directory). Reuse `profile_dir` (a directory or a loaded Profile), or the
    output folder's profile on resume, else run the profiler into out_dir/profile."""
    from .profile import Profile

    target = out_dir / "profile"
    own = target if resume and (target / "profile.yaml").is_file() else None
    loaded = profile_dir if isinstance(profile_dir, Profile) else None
    src = Path(loaded.path if loaded is not None else profile_dir) if profile_dir is not None else own
    if src is not None:
        prof = loaded if loaded is not None else Profile.load(src)
        notes.append(f"profile reused from {src}")
    else:
        try:
            from .profiler import run_profile
        except ImportError as exc:  # the profiler package is optional in a source checkout
            raise DataError(f"the profiler is not available here ({exc}); pass --profile DIR "
                            "(a profile from ef-profile)") from None
        gpu = _gpu_here(device)
        hw = hardware or (None if gpu else DEFAULT_HARDWARE)
        if hw is not None and not hardware:
            notes.append(f"no GPU here: timing from the bundled '{hw}' hardware tables "
                         "(pass --hardware NAME for another GPU)")
        try:
            prof = run_profile(spec, target, device="cuda" if gpu and hw is None else "cpu",
                               hardware=hw, prompts=prompts, seed=seed, force=force)
        except DataError as exc:
            if hardware or hw is None or "bundled" not in str(exc):
                raise
            notes[-1] = (f"no GPU here and no bundled '{hw}' timing for {spec.name}: timing measured "
                         "on this CPU, so predicted speeds are this CPU's, not a GPU's")
            log.info("%s", exc)
            prof = run_profile(spec, target, device="cpu", prompts=prompts, seed=seed, quick=True, force=force)
        src = target
    if prof.fingerprint != spec.fingerprint:
        raise ModelError(f"profile {str(src)!r} was made for {prof.meta['model'].get('name')!r} "
                         f"(fingerprint {prof.fingerprint}) not {spec.name!r} ({spec.fingerprint}); "
                         "profile this model or pass its own --profile")
    if hardware and not str(prof.meta["hardware"].get("source", "")).endswith(hardware) and profile_dir:
        notes.append(f"--hardware {hardware} ignored: the given profile has hardware "
                     f"{prof.meta['hardware'].get('source')}")
    if prof.routing_kind == "synthetic":
        why = ("the profile's routing is synthetic although this checkpoint has trained weights "
               "(profiled with --routing synthetic; profile without it to use its router)"
               if spec.has_weights else "no trained weights")
        notes.append(f"SYNTHETIC routing: {why}, so expert choices come from the "
                     "calibrated generator, not from this model's router")
    return prof, src


def engine_space(space, costs, base):
    """The space for the executor the config will run on: the graph engine (a GPU profile with
    the engine measured and runtime.engine resolving to graph) has no prefetch; the eager
    runtime has no read-through admission."""
    from expertflow.config import resolved_engine

    if costs.engine is not None and resolved_engine(base) == "graph":
        return space.without(("prefetch.depth", "prefetch.adaptive", "prefetch.width"),
                              "the graph engine has no prefetch (misses are read zero-copy in the step)")
    return space.without(("cache.read_through_slots",), "read-through admission is the graph engine's; "
                         "this profile has no engine timing (the eager runtime admits by copy)")


# ---- quality ----------------------------------------------------------------------------------
def quality_side(spec, prof, space, *, cap: float | None, prompts=None, device: str,
                 notes: list[str], n_prompts: int = QUALITY_PROMPTS, progress: bool = True) -> dict[str, Any]:
    """{'metric', 'cap', 'table', 'tables' (renormalize -> {threshold: loss}) | None,
    'prompt_ids'} for the study and tuning.json."""
    out: dict[str, Any] = {"metric": "dropped_mass", "cap": cap, "table": None, "tables": None,
                           "prompt_ids": None}
    thr = space.params.get("adaptive_k.threshold")
    ths = set(quality.THRESHOLDS)
    if thr is not None and thr.type == "float" and thr.step and len(thr.grid(64)) <= 11:
        ths |= {float(x) for x in thr.grid(64)}  # measure exactly at the searched points
    ths = sorted(t for t in ths if 0 < t <= 1)
    ids = None
    if spec.has_weights and spec.checkpoint and thr is not None:
        try:
            ids = quality.prompt_ids(spec, prompts, n_prompts=n_prompts)
        except DataError as exc:
            notes.append(f"quality not measured ({exc}); quality is the trace's dropped gate mass")
        if ids:
            dev = "cuda" if _gpu_here(device) else "cpu"
            dtype = "bfloat16" if dev == "cuda" else "float32"
            renorms = [False, True] if "adaptive_k.renormalize" in space else [False]
            tables, rows = quality.measure_tables(  # per (renormalize, min_k) the space searches
                spec, ths, prompts=ids, min_ks=quality.searched_min_ks(space, spec.top_k),
                renorms=renorms, device=dev, dtype=dtype, progress=progress)
            out.update(metric="perplexity_increase", table=rows, tables=tables, prompt_ids=ids,
                       device=dev, dtype=dtype, prompts=prompts)
            return out
    out["table"] = quality.dropped_mass_table(prof.trace, ths)
    return out


# ---- references -------------------------------------------------------------------------------
def references(ctx: StudyContext, spec, plan, costs, baselines, *, decode_tokens: int | None) -> list[dict]:
    from expertflow.budget import format_bytes

    from .simulator import whole_layer_offload

    refs = []
    total = spec.num_moe_layers * spec.num_experts
    # every expert resident from the first token (uniform priors fill every slot at attach: this
    # reference is the all-on-GPU model, not a cold cache that happens to be big enough)
    allv = {"cache.capacity_experts": total, "cache.scope": "per_layer", "prefetch.depth": 0,
            "adaptive_k.threshold": 1.0, "cache.warm_start": True,
            "cache.priors": [[1.0] * spec.num_experts for _ in range(spec.num_moe_layers)]}
    m, cons = evaluate(ctx, allv, max_decode_tokens=decode_tokens)
    need = int(m["peak_gpu_bytes"] + ctx.base_config.memory.margin_bytes)
    ok = feasible(cons)
    why = {} if ok else {"reason": f"needs {format_bytes(need)} > budget {format_bytes(plan.budget_bytes)}"}
    refs.append({"name": "all experts on GPU", "feasible": ok, "predicted": m, **why})
    named = dict(baselines)
    m, cons = evaluate(ctx, named[LRU_BASELINE], max_decode_tokens=decode_tokens)
    refs.append({"name": LRU_BASELINE, "feasible": feasible(cons), "predicted": m})
    w = whole_layer_offload(ctx.trace, costs, spec.num_experts, plan.bytes_per_expert,
                            ctx.prompt_tokens, decode_tokens)
    ok = plan.capacity_experts >= spec.num_experts
    refs.append({"name": "whole-layer offload", "feasible": ok, "predicted": w,
                 **({} if ok else {"reason": f"one layer's {spec.num_experts} experts do not fit the "
                                             f"budget's {plan.capacity_experts} slots"})})
    m, cons = evaluate(ctx, {}, max_decode_tokens=decode_tokens)
    refs.append({"name": "default config", "feasible": feasible(cons), "predicted": m})
    return refs


# ---- the pipeline -----------------------------------------------------------------------------
def tune(model: str, budget: str, *, trials: int | None = None, timeout: float | None = None,
         out: str | os.PathLike | None = None, hardware: str | None = None,
         profile: str | os.PathLike | None = None, prompts: str | None = None,
         search_space: str | os.PathLike | None = None, max_quality_loss: float | None = None,
         max_context: int | None = None, max_batch: int = 1, storage: str | None = None,
         study: str | None = None, resume: bool = False, seed: int = 0, device: str = "auto",
         validate: bool = True, report: bool = True, jobs: int | None = None,
         progress: bool = True, quality_prompts: int = QUALITY_PROMPTS,
         study_decode_tokens: int | None = STUDY_DECODE_TOKENS,
         final_decode_tokens: int | None = FINAL_DECODE_TOKENS,
         heartbeat: int | None = DEFAULT_HEARTBEAT_S, export_only: bool = False,
         force: bool = False) -> TuneResult:
    """Run the whole ef-tune pipeline; returns where the config and report are.

    Every input is checked before anything is written (a bad one raises its ExpertFlowError and
    leaves no output). With an explicit `storage` and `study` the study is shared: this call
    joins it when it exists, runs trials until the study's total reaches `trials`, and exports
    only if no other worker exported these results yet (`TuneResult.exported`). `export_only`
    runs no trial and exports the shared study's results into `out` (always). An `out` folder
    that holds files ef-tune did not write is refused (OutputError) unless `force`; a run that
    fails with an ExpertFlowError leaves `out` as it found it.
    """
    from expertflow.budget import check_max_context, parse_size, plan_memory
    from expertflow.registry import resolve_model

    from .search_space import load_space, packaged_space

    trials = DEFAULT_TRIALS if trials is None else trials
    if trials < 1:
        raise ConfigError(f"--trials {trials} must be >= 1")
    if heartbeat is not None and heartbeat < 1:
        raise ConfigError(f"--heartbeat {heartbeat} must be >= 1 (seconds between a trial's heartbeats)")
    _check_device(device)
    spec = resolve_model(model)
    parsed = parse_size(budget)
    dtype = "bfloat16"
    max_context = check_max_context(spec, max_context)  # the model's own limit by default
    plan = plan_memory(spec, parsed, max_context_tokens=max_context, max_batch=max_batch, dtype=dtype)
    raw_space = load_space(search_space) if search_space else packaged_space(Path(spec.name).name)
    if prompts is not None:
        _check_prompts(prompts)
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout {timeout} must be a positive number of seconds (or leave it out "
                         "to run every trial)")
    if max_quality_loss is not None and not max_quality_loss >= 0:
        raise UsageError(f"--max-quality-loss {max_quality_loss} must be >= 0 (0 = exact top-k only)")
    given_profile = _load_given_profile(profile, spec) if profile else None
    if hardware is not None and given_profile is None:
        _check_hardware(hardware, spec)
    out_dir = Path(out) if out is not None else default_out_dir(spec, parsed.text)
    storage_url = storage or sqlite_url(out_dir / "study.sqlite3")
    study_name = study or f"{Path(spec.name).name}-{parsed.text}"
    join = storage is not None and study is not None
    _check_fresh_study(storage_url, study_name, resume or join or export_only, explicit=storage is not None,
                       must_exist=export_only)
    from expertflow.errors import ExpertFlowError
    from expertflow.fsutil import claim_out_dir

    folder = claim_out_dir(out_dir, is_output_file, force=force, what="ef-tune")
    try:
        return _tune_in(folder, spec, parsed, plan, dtype, raw_space, given_profile, trials=trials,
                        timeout=timeout, hardware=hardware, prompts=prompts, max_quality_loss=max_quality_loss,
                        storage_url=storage_url, study_name=study_name, join=join, resume=resume, seed=seed,
                        device=device, validate=validate, report=report, jobs=jobs, progress=progress,
                        quality_prompts=quality_prompts, study_decode_tokens=study_decode_tokens,
                        final_decode_tokens=final_decode_tokens, heartbeat=heartbeat,
                        export_only=export_only, force=force)
    except ExpertFlowError:
        folder.restore()  # a user error after the checks: leave the folder as it was found
        raise


#: What an ef-tune output folder holds (anything else in --out is the user's).
OUTPUT_FILES = frozenset({"config.yaml", "profile", "tuning.json", "report.html", "study.sqlite3",
                          "study.sqlite3.lock", "study.sqlite3-wal", "study.sqlite3-shm",
                          "study.sqlite3-journal"})


def is_output_file(name: str) -> bool:
    return name in OUTPUT_FILES


def _load_given_profile(profile, spec):
    """--profile DIR, loaded and checked against the model before anything is written."""
    from .profile import Profile

    prof = Profile.load(profile)
    if prof.fingerprint != spec.fingerprint:
        raise ModelError(f"profile {str(profile)!r} was made for {prof.meta['model'].get('name')!r} "
                         f"(fingerprint {prof.fingerprint}) not {spec.name!r} ({spec.fingerprint}); "
                         "profile this model or pass its own --profile")
    return prof


def _check_hardware(hardware: str, spec) -> None:
    """--hardware NAME must be a bundled profile with tables for this model (before profiling)."""
    try:
        from .profiler.bundled import bundled_hardware_names, load_bundled
    except ImportError:  # the profiler package is optional in a source checkout
        return
    names = bundled_hardware_names()
    if hardware not in names:
        raise UsageError(f"--hardware {hardware!r} is not a bundled hardware profile; bundled: "
                         f"{', '.join(names) or 'none'} (ef-tune --help lists them); or leave --hardware "
                         "out to measure this machine's GPU")
    load_bundled(hardware, spec)  # DataError when the bundle has no tables for this model


def _tune_in(folder, spec, parsed, plan, dtype, raw_space, given_profile, *, trials, timeout, hardware,
             prompts, max_quality_loss, storage_url, study_name, join, resume, seed, device, validate,
             report, jobs, progress, quality_prompts, study_decode_tokens, final_decode_tokens, heartbeat,
             export_only, force) -> TuneResult:
    from expertflow.budget import format_bytes
    from expertflow.config import Hardware, default_config

    from .simulator import Costs

    out_dir = folder.path
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    prof, prof_dir = get_profile(spec, out_dir, profile_dir=given_profile, resume=resume, hardware=hardware,
                                 device=device, prompts=prompts, seed=seed, notes=notes, force=force)
    timings["profile"] = time.perf_counter() - t0
    costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    hw_meta = dict(prof.meta.get("hardware") or {})
    hw = Hardware(**{k: hw_meta.get(k) for k in ("gpu_name", "gpu_memory_bytes", "pcie_generation", "pcie_width")})
    gpu_bytes = hw_meta.get("gpu_memory_bytes")
    if gpu_bytes and plan.budget_bytes > int(gpu_bytes):
        msg = (f"--budget {parsed.text} ({format_bytes(plan.budget_bytes)}) is more than the "
               f"{hw_meta.get('gpu_name') or 'GPU'}'s {format_bytes(int(gpu_bytes))} of memory: the config "
               "assumes memory the GPU does not have; lower --budget to fit it")
        log.warning("%s", msg)
        notes.append(f"WARNING: {msg}")
    # The config is for the GPU it was tuned for (this one, or the bundled profile's): cuda.
    base = default_config(spec, plan, hardware=hw, priors=trust.config_priors(prof, rounded_priors),
                          profile_id=prof.profile_id, routing=prof.routing_kind, device="cuda", dtype=dtype)
    notes.extend(n for n in (trust.timing_note(trust.timing_noise(prof)),
                             trust.SYNTHETIC_PRIORS_NOTE if base.cache.priors is None else None) if n)
    gbps = (prof.meta.get("summary") or {}).get("pinned_gbps")
    if gbps is None:
        gbps = plan.bytes_per_expert / (costs.copy_ms * 1e6) if costs.copy_ms > 0 else None
    layer_ms = max(costs.host_layer_ms, costs.layer(1))
    base = base.with_values({"prefetch.bandwidth_gbps": float(gbps) if gbps else None,
                             "prefetch.layer_time_ms": float(layer_ms) if layer_ms > 0 else None})

    symbols = {"budget": min(plan.capacity_experts, plan.total_experts), "layers": spec.num_moe_layers,
               "experts": spec.num_experts, "total": plan.total_experts, "top_k": spec.top_k,
               "lookahead": prof.trace.lookahead}
    space = engine_space(trust.without_prior_policies(raw_space.resolve(symbols), base), costs, base)
    if symbols["budget"] < spec.num_moe_layers:
        space = space.restrict("cache.scope", ("pooled",), f"the budget holds {symbols['budget']} slots, "
                               f"fewer than the {spec.num_moe_layers} layers: only a pooled cache works")
    notes.extend(space.notes)

    t0 = time.perf_counter()
    cap = DEFAULT_QUALITY_CAP if max_quality_loss is None else float(max_quality_loss)
    q = quality_side(spec, prof, space, cap=cap, prompts=prompts, device=device, notes=notes,
                     n_prompts=quality_prompts, progress=progress)
    timings["quality"] = time.perf_counter() - t0

    ctx = StudyContext(prof.trace, costs, base, space, quality_cap=cap, quality_tables=q["tables"],
                       max_decode_tokens=study_decode_tokens)
    baselines = baseline_values(space, base, symbols["budget"])
    attrs = {"fingerprint": spec.fingerprint, "budget_bytes": plan.budget_bytes,
             "search_space": space.as_dict(), "quality_cap": cap, "quality_metric": q["metric"],
             "max_decode_tokens": study_decode_tokens, "profile_id": prof.profile_id, "seed": seed}
    t0 = time.perf_counter()
    jobs = default_jobs(trials) if jobs is None else max(1, int(jobs))
    run = run_study(ctx, storage_url=storage_url, name=study_name, n_trials=trials, timeout=timeout,
                    seed=seed, resume=resume, jobs=jobs, progress=progress, attrs=attrs,
                    baselines=baselines, join=join, heartbeat_s=heartbeat, run_trials=not export_only)
    notes.extend(run.notes)
    timings["study"] = time.perf_counter() - t0
    try:
        with run.export_claim(out_dir, force=export_only) as claim:
            if not claim.won:
                res = _not_exported(out_dir, run, claim.previous, notes)
                res.trials_run = run.own
                return res
            res = _export(out_dir, spec, parsed, plan, prof, prof_dir, hw_meta, base, ctx, costs, space, q,
                          cap, baselines, run, study_name, seed, validate, report, device, timings, notes,
                          study_decode_tokens, final_decode_tokens)
            claim.done(res.config_path)
            res.trials_run = run.own
            return res
    finally:
        run.close()


def _export(out_dir, spec, parsed, plan, prof, prof_dir, hw_meta, base, ctx, costs, space, q, cap,
            baselines, run, study_name, seed, validate, report, device, timings, notes,
            study_decode_tokens, final_decode_tokens) -> TuneResult:
    """The choice, references, validation, config.yaml, tuning.json and report.html (each file
    written atomically) from the study's shared results."""
    from expertflow.config import now_iso, tool_version
    from expertflow.fsutil import atomic_write_text

    storage_url = run.storage_url
    t0 = time.perf_counter()
    done = completed_trials(run.study)
    chosen, finalists, measured_quality, sens, trace_check = choice.final_choice(
        ctx, done, cap, spec=spec, base=base, prof=prof, q=q, seed=seed, finalists=FINALISTS,
        final_tokens=final_decode_tokens, study_name=study_name, notes=notes, prompts=q.get("prompts"))
    refs = references(ctx, spec, plan, costs, baselines, decode_tokens=final_decode_tokens)
    timings["choose"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    others = [t for t in finalists if t["number"] != chosen["number"]][:2]
    cfgs = [trial_config(base, t["params"]) for t in [chosen] + others]
    labels = ["chosen"] + [f"trial {t['number']}" for t in others]
    if validate and _gpu_here(device):
        from .validate import validate_configs

        pids = None
        if spec.has_weights and q["prompt_ids"]:  # real weights route real text: a real prompt
            import torch

            pids = torch.tensor([q["prompt_ids"][0][:ctx.prompt_tokens]])
        val = validate_configs(spec, cfgs, prof.trace, device="cuda", max_new_tokens=VALIDATE_TOKENS,
                               prompt_tokens=ctx.prompt_tokens, labels=labels, costs=costs,
                               trials=[t["number"] for t in [chosen] + others],
                               replay=not spec.has_weights, prompt_ids=pids)
        vnote = f"validated on {hw_meta.get('gpu_name') or 'this GPU'}" if any(v["measured"] for v in val) \
            else "validation failed to measure"
    else:
        vnote = ("validation skipped (--no-validate)" if not validate
                 else "no GPU here: predictions not validated")
        val = [{"label": "chosen", "trial": chosen["number"], "predicted": chosen["metrics"],
                "measured": None, "error": None}]
    for v, t in zip(val, [chosen] + others):
        v["params"] = t["params"]
    timings["validate"] = time.perf_counter() - t0

    measured = dict(val[0]["measured"] or {})
    measured.pop("decode_tokens", None)
    if measured_quality:
        measured.update(measured_quality)
    config = export.build_config(base, chosen["params"], predicted=chosen["metrics"], measured=measured,
                                 study_name=study_name, trial_number=chosen["number"],
                                 profile_id=prof.profile_id, routing=prof.routing_kind,
                                 hardware_source=str(hw_meta.get("source") or "unknown"))
    config_path = export.write_config(config, out_dir / "config.yaml").resolve()

    tuning = {
        "version": 1, "created_at": now_iso(), "tool_version": tool_version(),
        "model": {"name": spec.name, "architecture": spec.architecture, "fingerprint": spec.fingerprint,
                  "num_moe_layers": spec.num_moe_layers, "num_experts": spec.num_experts,
                  "top_k": spec.top_k, "bytes_per_expert": plan.bytes_per_expert},
        "budget": {"text": parsed.text, "bytes": plan.budget_bytes, "plan": plan.as_dict(),
                   "terms": [[k, int(v)] for k, v in plan.terms()]},
        "hardware": {k: hw_meta.get(k) for k in ("gpu_name", "gpu_memory_bytes", "pcie_generation",
                                                 "pcie_width", "driver_version", "cuda_version",
                                                 "torch_version", "transformers_version", "source")},
        "routing": {"kind": prof.routing_kind, "note": (prof.meta.get("routing") or {}).get("note", "")},
        "profile_dir": ("profile" if prof_dir.resolve() == (out_dir / "profile").resolve()
                        else str(prof_dir.resolve())),
        "study": {"name": study_name, "storage": storage_url, "n_trials": finished_count(run.study),
                  "objectives": ["decode_tokens_per_s", "quality_loss"], "directions": ["maximize", "minimize"],
                  "seed": seed, "search_space": space.as_dict(), "jobs": run.jobs, "target": run.target,
                  "complete": run.complete,
                  "max_decode_tokens": study_decode_tokens, "final_decode_tokens": final_decode_tokens},
        "quality": {"metric": q["metric"], "cap": cap, "table": q["table"],
                    **({"chosen_measured": measured_quality} if measured_quality else {})},
        "chosen": {"trial": chosen["number"], "params": chosen["params"], "predicted": chosen["metrics"],
                   "rule": sens["rule"] if sens else export.RULE},
        "sensitivity": sens, "timing_noise": trust.timing_noise(prof), "adaptive_trace": trace_check,
        "references": refs,
        "pareto": [{"trial": t["number"], "values": t["values"], "params": t["params"]}
                   for t in pareto_front(done)],
        "validation": val,
        "validation_note": vnote,
        "notes": notes,
        "timings_s": timings,
        "run_command": run_command(config_path, gpu_here=_gpu_here(device)),
    }
    if not _gpu_here(device):
        notes.append(f"config.yaml is for {hw_meta.get('gpu_name') or 'a CUDA GPU'} (runtime.device: cuda); "
                     "this machine has no GPU, so the run command adds --device cpu to run it here "
                     "(slowly); on the GPU drop --device")
    _record_in_study(run.study, chosen, config_path)
    tuning_path = out_dir / "tuning.json"
    atomic_write_text(tuning_path, json.dumps(tuning, indent=1, default=_json_default))

    report_path = None
    t0 = time.perf_counter()
    if report:
        report_path = _build_report(out_dir, notes)
        timings["report"] = time.perf_counter() - t0
        tuning["timings_s"] = timings
        atomic_write_text(tuning_path, json.dumps(tuning, indent=1, default=_json_default))
    return TuneResult(out_dir.resolve(), config_path, report_path, tuning, config, notes)


def run_command(config_path, *, gpu_here: bool) -> str:
    """The `ef-run` line to print: it runs on this machine (on its CPU when it has no GPU)."""
    return f"ef-run --config {config_path}" + ("" if gpu_here else " --device cpu")


#: Study user attributes ef-tune records for Optuna's own tools (optuna-dashboard, load_study).
CHOSEN_TRIAL_ATTR = "ef_chosen_trial"
CHOSEN_CONFIG_ATTR = "ef_chosen_config"


def _record_in_study(study, chosen: dict[str, Any], config_path) -> None:
    """The chosen trial, as a study attribute Optuna's tools show (its own best_trials is the
    Pareto front, which does not know the quality cap or the re-simulation)."""
    study.set_user_attr(CHOSEN_TRIAL_ATTR, int(chosen["number"]))
    study.set_user_attr(CHOSEN_CONFIG_ATTR, str(config_path))


def rounded_priors(priors, digits: int = 3) -> list[list[float]]:
    """Activation priors to `digits` significant digits: what the study simulates and what
    config.yaml holds (17-digit floats made the file 32 KB for qwen2-moe; the policies rank
    experts by these, and 3 digits keep every ranking the profile can support)."""
    return [[float(f"{float(v):.{digits}g}") for v in row] for row in priors]


def default_jobs(trials: int) -> int:
    """Worker processes for the study. 1: measured on 2 cores with the default SQLite storage,
    two workers were slower than one (SQLite serialises their writes, and each waits for the
    other's lock); with a server storage (PostgreSQL) pass --jobs N."""
    return 1


def _check_fresh_study(url: str, name: str, allow_existing: bool, *, explicit: bool = True,
                       must_exist: bool = False) -> None:
    """Fail before profiling when the storage cannot be used (StorageError), when the study
    exists and neither --resume nor a shared --storage/--study was given, or (`must_exist`,
    --export-only) when there is no study with trials to export."""
    from expertflow.errors import StorageError

    nothing = (f"--export-only: there is no study {name!r} with trials in {mask_url(url)} to export; "
               "run ef-tune without --export-only first, or pass the --storage and --study of the "
               "study to export")
    sqlite_file = StorageURL(url).sqlite_file
    if sqlite_file is not None:
        path = Path(sqlite_file)
        if not path.is_file() and must_exist:
            raise StorageError(nothing)
        if not path.is_file() and (not explicit or path.parent.is_dir()):
            return  # a new SQLite file (the default one in --out is made below)
    import optuna  # optional at import time (tuner/optuna_private.py)

    storage = make_storage(url)
    if must_exist:
        if not any(s.study_name == name and s.n_trials > 0
                   for s in optuna.get_all_study_summaries(storage, include_best_trial=False)):
            raise StorageError(nothing)
        return
    if allow_existing:
        return
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if s.study_name == name and s.n_trials > 0:
            raise StorageError(f"study {name!r} already exists in {mask_url(url)} with {s.n_trials} trials; "
                               "pass --resume to continue it, or a new --study name / --out folder")


def _build_report(out_dir: Path, notes: list[str]) -> Path | None:
    try:
        from reports.build import build_report
    except ImportError as exc:
        notes.append(f"report skipped: the report builder is not importable ({exc})")
        return None
    try:
        return build_report(out_dir).resolve()
    except Exception as exc:  # noqa: BLE001 - the config is written; say so instead of failing
        log.warning("report could not be built: %s: %s", exc.__class__.__name__, exc)
        notes.append(f"report could not be built ({exc.__class__.__name__}: {exc}); rebuild it with "
                     f"ef-report {out_dir}")
        return None


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- CLI handler ------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, a batch system's preemption) stops like Ctrl-C: the running trial finishes,
    no file is left half-written, and --resume continues (exit 130)."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cli_tune(args: argparse.Namespace) -> int:
    from expertflow.config import describe_hardware

    from .sensitivity import describe as sensitivity_line

    t0 = time.perf_counter()
    with _sigterm_as_interrupt():
        res = tune(args.model, args.budget, trials=args.trials, timeout=args.timeout, out=args.out,
                   hardware=args.hardware, profile=args.profile, prompts=args.prompts,
                   search_space=args.search_space, max_quality_loss=args.max_quality_loss,
                   max_context=args.max_context, max_batch=args.max_batch, storage=args.storage,
                   study=args.study, resume=args.resume, seed=args.seed, device=args.device,
                   validate=not args.no_validate, report=not args.no_report,
                   jobs=getattr(args, "jobs", None), progress=True,
                   heartbeat=getattr(args, "heartbeat", DEFAULT_HEARTBEAT_S),
                   export_only=getattr(args, "export_only", False), force=getattr(args, "force", False))
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
    p = res.predicted
    t = res.tuning
    say(f"tuned {t['model']['name']} for a {t['budget']['text']} budget "
        f"({describe_hardware(t['hardware'])}, routing: {t['routing']['kind']}) in {time.perf_counter() - t0:.1f} s")
    say(f"chosen trial {t['chosen']['trial']}: predicted {p['decode_tokens_per_s']:.2f} tokens/s decode, "
        f"hit rate {p['hit_rate']:.1%}, stall {p['stall_ms_per_token']:.2f} ms/token, "
        f"quality loss {p['quality_loss']:.4f} ({t['quality']['metric']}, cap {t['quality']['cap']})")
    band = sensitivity_line(t.get("sensitivity"))
    if band:
        say(band)
    say(f"config: {res.config_path}")
    say(f"report: {res.report_path if res.report_path else '(not built)'}")
    say(f"run it: {t['run_command']}")
    if args.json:
        print(json.dumps({"exported": True, "trials_run": res.trials_run, "config_path": str(res.config_path),
                          "report_path": str(res.report_path) if res.report_path else None,
                          "tuning_path": str(res.out_dir / "tuning.json"),
                          "chosen_trial": t["chosen"]["trial"], "predicted": p,
                          "hardware_source": t["hardware"].get("source"), "routing": t["routing"]["kind"],
                          "timing_noisy": bool((t.get("timing_noise") or {}).get("noisy"))},
                         default=_json_default))
    return 0
