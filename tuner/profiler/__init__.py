"""`ef-profile`: measure a MoE model's routing and this machine's costs into a profile directory
(tuner/profile.py format) that `ef-tune`, the simulator and the report read.

    from tuner.profiler import run_profile
    profile = run_profile("qwen2-moe", out="prof/")        # -> tuner.profile.Profile

Stages: prompts -> routing trace (real: the model's router with the runtime attached;
synthetic: tuner.synthetic, calibrated per family, whenever there are no trained weights) ->
activation statistics (tuner.stats) -> timing on the device (profiler.timing) or a bundled GPU
profile (profiler.bundled) -> hardware facts (profiler.hardware) -> profile.yaml + tables.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from expertflow.config import now_iso, tool_version
from expertflow.errors import ConfigError
from expertflow.registry import ModelSpec, resolve_model

from .. import stats, synthetic
from ..profile import Profile, new_profile_id
from ..records import ProfileMeta, ProfileModel, ProfileRouting, ProfileTiming
from ..progress import Reporter
from . import activation
from .bundled import load_bundled

log = logging.getLogger(__name__)

__all__ = ["cli_profile", "profile_summary", "run_profile"]

ROUTING_KINDS = ("auto", "real", "synthetic")


#: What the synthetic presets' "(anchors.md)" citations rest on: a file users do not have.
_MEASUREMENTS = ("published routing measurements: Mixtral first-expert repeats and next-layer gate "
                 "accuracy (mixtral-offloading, arXiv 2312.17238; AdapMoE, ICCAD'24), Qwen3-30B-A3B "
                 "traffic share and LRU hit rates, Qwen2-57B-A14B next-layer gate reuse")


def cite_measurements(text: str) -> str:
    """`text` with the internal "(anchors.md)" citation replaced by the measurements it rests on."""
    text = str(text)
    if "anchors.md" not in text:
        return text
    text = text.replace("(anchors.md)", "").replace("anchors.md", "").replace(" ;", ";")
    return " ".join(text.split()).rstrip(" .;") + f" (sources: {_MEASUREMENTS})"


def _routing_note(kind: str, spec, n_prompts: int, n_tokens: int, params=None, targets=None) -> str:
    if kind == "synthetic":
        why = (f"{spec.name} has trained weights, but synthetic routing was asked for (--routing "
               "synthetic; the default, auto, runs its trained router)" if spec.has_weights
               else f"{spec.name} has no trained weights here")
        return (f"SYNTHETIC routing: {why}, so the routing trace "
                f"({n_tokens} tokens, sized to {n_prompts} prompts) comes from ExpertFlow's synthetic "
                f"generator (preset {params.preset}, calibrated to {cite_measurements(targets.source)}). Hit rates, "
                "prefetch accuracy and quality estimates rest on this generator, not on the model's "
                "own router.")
    if spec.has_weights:
        return (f"real routing: the trained router of {spec.name} over {n_prompts} prompts "
                f"({n_tokens} tokens).")
    return (f"real router of RANDOM weights: {spec.name} has no trained weights here, so this trace "
            f"({n_prompts} prompts, {n_tokens} tokens) shows how a randomly initialised router "
            "routes, not a trained model; use it for smoke tests, not for tuning.")


def run_profile(model, out: str | Path | None = None, *, prompts: str | Path | None = None,
                device: str = "auto", routing: str = "auto", max_tokens: int | None = None,
                quick: bool = False, seed: int = 0, hardware: str | None = None,
                dtype: str | None = None, progress: bool = True, force: bool = False):
    """Profile `model` (alias, checkpoint dir or ModelSpec); save to `out` when given; return
    the Profile.

    hardware: None = measure timing on `device`; a bundled name (e.g. "h200") = take timing and
    hardware facts from that bundle (DataError when it is missing for this model).
    force: write into an `out` folder that holds other files (they are kept; tuner.profile).
    Raises ModelError, DataError, DeviceError, ConfigError (one line each).
    """
    from expertflow.runtime.loading import resolve_device  # noqa: PLC0415 - torch, only when it runs

    if routing not in ROUTING_KINDS:
        raise ConfigError(f"routing {routing!r} is not one of {', '.join(ROUTING_KINDS)}")
    t_start = time.perf_counter()
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    dev = resolve_device(device)
    dt = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    texts = activation.load_prompts(prompts if prompts is not None else activation.default_prompt_file(spec))
    tokens = activation.tokenize_prompts(spec, texts, max_tokens)
    kind = routing if routing != "auto" else ("real" if spec.has_weights else "synthetic")
    n_tokens = int(sum(len(t) for t in tokens))
    timings: dict[str, float] = {}
    bundle = None
    if hardware is not None:  # fail fast, before minutes of routing, when the bundle is missing
        bundle = load_bundled(hardware, spec)
    with Reporter(progress) as rep:
        t0 = time.perf_counter()
        trace, params, targets = _routing(spec, tokens, kind, dev, dt, seed, rep)
        tables = stats.routing_tables(trace)
        routing_stats = stats.routing_summary(trace)
        timings["routing"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hw, timing_tables, timing, timing_dtype = _timing(spec, hardware, bundle, dev, dt, quick, seed, rep)
        timings["timing"] = time.perf_counter() - t0

    from .timing import timing_summary  # noqa: PLC0415 - torch, only when it runs

    bpe = spec.bytes_per_expert(timing_dtype)
    summary = timing_summary(timing_tables, bpe)
    summary.update({
        "top25_traffic_share_mean": round(sum(routing_stats["top25_traffic_share"]) /
                                          len(routing_stats["top25_traffic_share"]), 4),
        "lru_hit_25_mean": round(sum(routing_stats["lru_hit_25"]) / len(routing_stats["lru_hit_25"]), 4),
    })
    if "predictor_recall" in routing_stats and 1 in routing_stats["predictor_recall"]:
        summary["predictor_recall_d1"] = routing_stats["predictor_recall"][1]
    label = f"bundled-{hardware}" if hardware else (hw.get("gpu_name") or dev.type)
    timings["total"] = time.perf_counter() - t_start
    meta = ProfileMeta(
        profile_id=new_profile_id(spec.name, label), created_at=now_iso(), tool_version=tool_version(),
        model=ProfileModel(name=spec.name, architecture=spec.architecture, fingerprint=spec.fingerprint,
                           dims=spec.dims(), dtype=timing_dtype, bytes_per_expert=bpe, has_weights=spec.has_weights),
        hardware=hw,
        routing=ProfileRouting(kind=kind, tokens=n_tokens, prompts=len(tokens),
                               source=activation.prompt_source(spec, prompts),
                               tokenizer=activation.tokenizer_kind(spec),
                               note=_routing_note(kind, spec, len(tokens), n_tokens, params, targets),
                               synthetic=params.as_dict() if params is not None else None,
                               synthetic_targets=targets.source if targets is not None else None,
                               stats=routing_stats),
        timing=ProfileTiming(**timing), summary=summary, timings_s={k: round(v, 3) for k, v in timings.items()})
    profile = Profile(meta=meta, trace=trace, tables={**tables, **timing_tables})
    if out is not None:
        profile.save(out, force=force)
        log.info("profile %s written to %s", profile.profile_id, out)
    return profile


def _routing(spec, tokens, kind: str, dev, dt: str, seed: int, rep):
    """(trace, the synthetic generator's params and targets or None): the model's router on the
    prompts (real), or the calibrated generator at the prompts' lengths (synthetic)."""
    if kind == "real":
        return activation.record_routing(spec, tokens, device=dev, dtype=dt, seed=seed, progress=rep), None, None
    task = rep.task("routing (synthetic)", 1)
    family = synthetic.family_of(spec.architecture)
    params = synthetic.preset_params(family, num_layers=spec.num_moe_layers, num_experts=spec.num_experts,
                                     top_k=spec.top_k, normalize_topk=spec.norm_topk_prob)
    trace = synthetic.generate(params, activation.token_counts(tokens), seed=seed,
                               meta={"fingerprint": spec.fingerprint, "model": spec.name,
                                     "normalize_topk": spec.norm_topk_prob})
    task.advance()
    return trace, params, synthetic.PRESETS[family]


def _timing(spec, hardware: str | None, bundle, dev, dt: str, quick: bool, seed: int, rep):
    """(hardware facts, timing tables, profile.yaml's timing block, the dtype timed): the
    bundle's when `hardware` names one, else measured on `dev`."""
    if bundle is not None:
        hw, tables = bundle
        note = (f"timing bundled with ExpertFlow, measured on {hw.get('gpu_name')} "
                f"({hw.get('bundle_created_at')}), not on this machine: {hw.get('bundle_timing_note') or ''}")
        return hw, tables, {"kind": f"bundled:{hardware}", "note": note.strip()}, hw.get("bundle_dtype") or "bfloat16"
    from .hardware import collect_hardware  # noqa: PLC0415 - torch and NVML, only when measuring
    from .timing import measure_timing  # noqa: PLC0415 - torch, only when measuring

    res = measure_timing(spec, device=dev, dtype=dt, quick=quick, seed=seed, progress=rep)
    timing = {"kind": res.kind, "note": res.note, **({"noise": res.noise} if res.noise is not None else {})}
    return collect_hardware(dev), res.tables, timing, dt


def profile_summary(profile) -> dict:
    """The `--json` object: where, what, and the headline numbers."""
    m = profile.meta
    return {"profile_dir": str(Path(profile.path).resolve()) if profile.path else None,
            "profile_id": profile.profile_id, "model": m.model.name,
            "fingerprint": m.model.fingerprint, "device": m.hardware.get("device"),
            "gpu_name": m.hardware.get("gpu_name"), "hardware_source": m.hardware.get("source"),
            "routing": m.routing.kind, "routing_note": m.routing.note,
            "timing": m.timing.kind, "tokens": m.routing.tokens,
            "timing_noisy": bool(m.timing.noise and m.timing.noise.noisy),
            "summary": m.summary, "elapsed_s": m.timings_s["total"]}
