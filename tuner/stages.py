"""The stages of `tune()` before and around the study, each a small function over `Run`, the
record of one tuning run that the stages fill in order (tuner/pipeline.py composes them):

    profile       reuse a profile (--profile, the folder's own on --resume) or run the profiler:
                  this GPU when there is one, else the bundled hardware tables (h200 by default)
    base_config   the untuned config of this model and budget, for the GPU it is tuned for
    space         the search space resolved for the budget and for the executor the config runs on
    quality       the quality side of adaptive-k: measured perplexity with real weights, else the
                  trace's dropped gate mass
    references    the reference points the report compares with (same simulator, same trace)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertflow.budget import format_bytes
from expertflow.config import Hardware, RuntimeConfig, default_config, resolved_engine
from expertflow.errors import DataError

from . import quality, trust
from .objective import StudyContext, evaluate
from .profile import Profile
from .request import DEFAULT_HARDWARE, DTYPE, Checked, TuneRequest, check_profile_model, gpu_here
from .search_space import SearchSpace
from .simulator import Costs, whole_layer_offload
from .study import LRU_BASELINE, StudyRun
from .trials import feasible

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One tuning run: the request, its checks, and what each stage produced."""

    req: TuneRequest
    chk: Checked
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    prof: Profile | None = None
    prof_dir: Path | None = None
    costs: Costs | None = None
    base: RuntimeConfig | None = None
    space: SearchSpace | None = None
    quality: quality.QualitySide | None = None
    ctx: StudyContext | None = None
    baselines: list[tuple[str, dict]] = field(default_factory=list)
    study: StudyRun | None = None

    @property
    def out_dir(self) -> Path:
        return self.chk.out_dir

    @property
    def hw_meta(self) -> dict[str, Any]:
        return dict(self.prof.meta.hardware)

    @property
    def gpu_here(self) -> bool:
        return gpu_here(self.req.target.device)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = time.perf_counter() - t0


# ---- profile ----------------------------------------------------------------------------------
def profile(run: Run) -> None:
    """run.prof and run.prof_dir: the given profile, the output folder's own on --resume, or a
    new one in out_dir/profile."""
    spec, hardware = run.chk.spec, run.req.target.hardware
    target = run.out_dir / "profile"
    given = run.chk.profile
    if given is None and run.req.study.resume and (target / "profile.yaml").is_file():
        given = Profile.load(target)
    if given is not None:
        prof, src = given, Path(given.path) if given.path is not None else target
        run.notes.append(f"profile reused from {src}")
        source = prof.meta.hardware.get("source")
        if hardware and not str(source or "").endswith(hardware) and run.chk.profile:
            run.notes.append(f"--hardware {hardware} ignored: the given profile has hardware {source}")
    else:
        prof, src = _new_profile(run, target), target
    check_profile_model(prof, spec, src)
    if prof.routing_kind == "synthetic":
        why = ("the profile's routing is synthetic although this checkpoint has trained weights "
               "(profiled with --routing synthetic; profile without it to use its router)"
               if spec.has_weights else "no trained weights")
        run.notes.append(f"SYNTHETIC routing: {why}, so expert choices come from the "
                         "calibrated generator, not from this model's router")
    run.prof, run.prof_dir = prof, src


def _new_profile(run: Run, target: Path) -> Profile:
    from .profiler import run_profile  # noqa: PLC0415 - the profiler imports torch and transformers

    req, spec = run.req, run.chk.spec
    hardware, gpu = req.target.hardware, run.gpu_here
    hw = hardware or (None if gpu else DEFAULT_HARDWARE)
    kw = dict(prompts=req.inputs.prompts, seed=req.study.seed, force=req.inputs.force)
    if hw is not None and not hardware:
        run.notes.append(f"no GPU here: timing from the bundled '{hw}' hardware tables "
                         "(pass --hardware NAME for another GPU)")
    try:
        return run_profile(spec, target, device="cuda" if gpu and hw is None else "cpu", hardware=hw, **kw)
    except DataError as exc:
        if hardware or hw is None or "bundled" not in str(exc):
            raise
        run.notes[-1] = (f"no GPU here and no bundled '{hw}' timing for {spec.name}: timing measured "
                         "on this CPU, so predicted speeds are this CPU's, not a GPU's")
        log.info("%s", exc)
        return run_profile(spec, target, device="cpu", quick=True, **kw)


# ---- the base config --------------------------------------------------------------------------
def rounded_priors(priors, digits: int = 3) -> list[list[float]]:
    """Activation priors to `digits` significant digits: what the study simulates and what
    config.yaml holds (17-digit floats made the file 32 KB for qwen2-moe; the policies rank
    experts by these, and 3 digits keep every ranking the profile can support)."""
    return [[float(f"{float(v):.{digits}g}") for v in row] for row in priors]


def base_config(run: Run) -> None:
    """run.costs and run.base: the profile's costs, and the untuned config for the GPU it is
    tuned for (this one or the bundled profile's: runtime.device cuda)."""
    spec, plan, prof = run.chk.spec, run.chk.plan, run.prof
    run.costs = costs = Costs.from_profile(prof, plan.bytes_per_expert, spec.num_layers)
    hw_meta = run.hw_meta
    gpu_bytes = hw_meta.get("gpu_memory_bytes")
    if gpu_bytes and plan.budget_bytes > int(gpu_bytes):
        msg = (f"--budget {run.chk.budget.text} ({format_bytes(plan.budget_bytes)}) is more than the "
               f"{hw_meta.get('gpu_name') or 'GPU'}'s {format_bytes(int(gpu_bytes))} of memory: the config "
               "assumes memory the GPU does not have; lower --budget to fit it")
        log.warning("%s", msg)
        run.notes.append(f"WARNING: {msg}")
    hw = Hardware(**{k: hw_meta.get(k) for k in ("gpu_name", "gpu_memory_bytes", "pcie_generation", "pcie_width")})
    base = default_config(spec, plan, hardware=hw, priors=trust.config_priors(prof, rounded_priors),
                          profile_id=prof.profile_id, routing=prof.routing_kind, device="cuda", dtype=DTYPE)
    run.notes.extend(n for n in (trust.timing_note(trust.timing_noise(prof)),
                                 trust.SYNTHETIC_PRIORS_NOTE if base.cache.priors is None else None) if n)
    gbps = prof.meta.summary.get("pinned_gbps")
    if gbps is None:
        gbps = plan.bytes_per_expert / (costs.copy_ms * 1e6) if costs.copy_ms > 0 else None
    layer_ms = max(costs.host_layer_ms, costs.layer(1))
    run.base = base.with_values({"prefetch.bandwidth_gbps": float(gbps) if gbps else None,
                                 "prefetch.layer_time_ms": float(layer_ms) if layer_ms > 0 else None})


# ---- the search space -------------------------------------------------------------------------
def symbols(run: Run) -> dict[str, int]:
    """The symbols a search space's bounds may name, for this model and budget."""
    spec, plan = run.chk.spec, run.chk.plan
    return {"budget": min(plan.capacity_experts, plan.total_experts), "layers": spec.num_moe_layers,
            "experts": spec.num_experts, "total": plan.total_experts, "top_k": spec.top_k,
            "lookahead": run.prof.trace.lookahead}


def executor(costs, base) -> str:
    """What the config runs on as the simulator models it: "graph" (runtime.engine resolves to
    the graph engine and the profile has its timing), else "eager"."""
    return "graph" if costs.engine is not None and resolved_engine(base) == "graph" else "eager"


def engine_space(space, costs, base):
    """The space for the executor the config will run on: the graph engine has no prefetch; the
    eager runtime has no read-through admission."""
    if executor(costs, base) == "graph":
        return space.without(("prefetch.depth", "prefetch.adaptive", "prefetch.width"),
                             "the graph engine has no prefetch (misses are read zero-copy in the step)")
    return space.without(("cache.read_through_slots",), "read-through admission is the graph engine's; "
                         "this profile has no engine timing (the eager runtime admits by copy)")


def space(run: Run) -> None:
    """run.space: resolved for the budget, without what the base config or executor rules out."""
    sym, spec = symbols(run), run.chk.spec
    sp = engine_space(trust.without_prior_policies(run.chk.raw_space.resolve(sym), run.base), run.costs, run.base)
    if sym["budget"] < spec.num_moe_layers:
        sp = sp.restrict("cache.scope", ("pooled",), f"the budget holds {sym['budget']} slots, "
                         f"fewer than the {spec.num_moe_layers} layers: only a pooled cache works")
    run.notes.extend(sp.notes)
    run.space = sp


# ---- quality ----------------------------------------------------------------------------------
def quality_side(spec, prof, space, *, cap: float | None, prompts=None, device: str,
                 notes: list[str], n_prompts: int, progress: bool = True) -> quality.QualitySide:
    """The quality tables for the study and tuning.json: measured on the checkpoint's prompts
    when it has weights and the space searches adaptive-k, else the trace's dropped gate mass."""
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
            dev = "cuda" if gpu_here(device) else "cpu"
            dtype = "bfloat16" if dev == "cuda" else "float32"
            renorms = [False, True] if "adaptive_k.renormalize" in space else [False]
            tables, rows = quality.measure_tables(  # per (renormalize, min_k) the space searches
                spec, ths, prompts=ids, min_ks=quality.searched_min_ks(space, spec.top_k),
                renorms=renorms, device=dev, dtype=dtype, progress=progress)
            return quality.QualitySide("perplexity_increase", cap, rows, tables, ids, dev, dtype,
                                       None if prompts is None else str(prompts))
    return quality.QualitySide("dropped_mass", cap, quality.dropped_mass_table(prof.trace, ths))


def quality_stage(run: Run) -> None:
    req = run.req
    run.quality = quality_side(run.chk.spec, run.prof, run.space, cap=req.quality.cap, prompts=req.inputs.prompts,
                               device=req.target.device, notes=run.notes, n_prompts=req.quality.prompts,
                               progress=req.progress)


# ---- references -------------------------------------------------------------------------------
def references(ctx: StudyContext, spec, plan, costs, baselines, *, decode_tokens: int | None) -> list[dict]:
    """The reference points (all experts on GPU, plain LRU, whole-layer offload, the default
    config), each from the same simulator and trace as the trials."""
    refs = []
    total = spec.num_moe_layers * spec.num_experts
    # every expert resident from the first token (uniform priors fill every slot at attach: this
    # reference is the all-on-GPU model, not a cold cache that happens to be big enough)
    allv = {"cache.capacity_experts": total, "cache.scope": "per_layer", "prefetch.depth": 0,
            "cache.read_through_slots": 0,  # nothing to admit: no slot held back for staging
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
