"""What `tune()` is asked for and what it returns, and every check of the request that runs
before any work (a bad input raises its ExpertFlowError and nothing is written).

    TuneRequest(target, inputs, study, quality, validate, progress)  -> tuner.pipeline.tune
    TuneResult                                                       <- tuner.pipeline.tune
    check(request) -> Checked       the resolved model, budget plan, space, storage and folder
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertflow.budget import MemoryPlan, ParsedSize, check_max_context, parse_size, plan_memory
from expertflow.config import RuntimeConfig
from expertflow.errors import ConfigError, DeviceError, ModelError, StorageError, UsageError
from expertflow.registry import ModelSpec, resolve_model

from .coordination import DEFAULT_HEARTBEAT_S, DEFAULT_TRIALS
from .profile import Profile
from .profiler.activation import load_prompts
from .profiler.bundled import bundled_hardware_names, load_bundled
from .records import TuningRecord
from .search_space import SearchSpace, load_space, packaged_space
from .storage import StorageURL, mask_url, sqlite_url, study_summaries

DEFAULT_QUALITY_CAP = 0.02  # 2% relative perplexity increase, or 2% of the top-k gate mass
DEFAULT_HARDWARE = "h200"  # the bundled hardware tables used where there is no GPU
STUDY_DECODE_TOKENS = 128  # trace slice each trial simulates (decode tokens)
FINAL_DECODE_TOKENS = 512  # the finalists and references are re-simulated on this slice
QUALITY_PROMPTS = 64  # prompts the quality table is measured on (real weights)
DTYPE = "bfloat16"  # what the config is tuned for on the GPU


# ---- the request ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What to tune for: the model, the GPU memory budget, and the GPU's timing."""

    model: str  # registry alias or checkpoint directory
    budget: str  # e.g. "24GB" (10^9 bytes) or "22GiB"
    hardware: str | None = None  # a bundled hardware profile instead of this machine's GPU
    device: str = "auto"  # where to profile and validate: auto, cuda or cpu
    max_context: int | None = None  # KV-cache tokens to reserve (default: the model's, <= 4096)
    max_batch: int = 1


@dataclass(frozen=True)
class Inputs:
    """Where results go and what to reuse."""

    out: str | os.PathLike | None = None  # default ef-out/<model>-<budget>
    force: bool = False  # write into a folder that holds other files (they are kept)
    profile: str | os.PathLike | Profile | None = None  # reuse a profile (skip profiling)
    prompts: str | os.PathLike | None = None  # prompt file for profiling and quality
    search_space: str | os.PathLike | None = None  # default: search_spaces/<model>.yaml


@dataclass(frozen=True)
class StudyOptions:
    """The Optuna study: its size, storage, sharing and the trace slice a trial simulates."""

    trials: int = DEFAULT_TRIALS  # the study-wide total
    timeout: float | None = None  # seconds
    storage: str | None = None  # an Optuna storage URL (default: SQLite in the output folder)
    name: str | None = None  # with `storage`: workers sharing the study
    resume: bool = False
    export_only: bool = False  # run no trial, export the study's results
    jobs: int | None = None  # worker processes (default 1)
    heartbeat_s: int | None = DEFAULT_HEARTBEAT_S
    seed: int = 0
    decode_tokens: int | None = STUDY_DECODE_TOKENS
    final_decode_tokens: int | None = FINAL_DECODE_TOKENS


@dataclass(frozen=True)
class QualityOptions:
    """The quality side of adaptive-k."""

    max_loss: float | None = None  # the cap (default DEFAULT_QUALITY_CAP; 0 = exact top-k only)
    prompts: int = QUALITY_PROMPTS  # prompts measured with real weights

    @property
    def cap(self) -> float:
        return DEFAULT_QUALITY_CAP if self.max_loss is None else float(self.max_loss)


@dataclass(frozen=True)
class TuneRequest:
    target: Target
    inputs: Inputs = field(default_factory=Inputs)
    study: StudyOptions = field(default_factory=StudyOptions)
    quality: QualityOptions = field(default_factory=QualityOptions)
    validate: bool = True  # measure the finalists on the GPU, when there is one
    progress: bool = True  # rich progress bars


@dataclass
class TuneResult:
    out_dir: Path
    config_path: Path | None  # None when another worker exported these results (exported_by)
    tuning: TuningRecord | None
    config: RuntimeConfig | None
    notes: list[str] = field(default_factory=list)
    exported: bool = True
    exported_by: dict[str, Any] | None = None  # the export record of the worker that did
    trials_run: int = 0  # trials this process ran (a share of the study's when workers share it)

    @property
    def predicted(self) -> dict[str, float | None]:
        return self.tuning.chosen.predicted


# ---- the checks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checked:
    """The request, resolved and checked: what the pipeline runs on."""

    spec: ModelSpec
    budget: ParsedSize
    plan: MemoryPlan
    raw_space: SearchSpace
    profile: Profile | None  # the given --profile, loaded and checked
    out_dir: Path
    storage_url: str
    study_name: str
    join: bool  # an explicit shared --storage and --study: join the study when it exists


#: What an ef-tune output folder holds (anything else in --out is the user's).
OUTPUT_FILES = frozenset({"config.yaml", "profile", "tuning.json", "report.html", "study.sqlite3",
                          "study.sqlite3.lock", "study.sqlite3-wal", "study.sqlite3-shm",
                          "study.sqlite3-journal"})


def is_output_file(name: str) -> bool:
    return name in OUTPUT_FILES


def default_out_dir(spec: ModelSpec, budget_text: str) -> Path:
    name = Path(spec.name).name if spec.checkpoint else spec.name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "", f"{name}-{budget_text}")
    return Path("ef-out") / safe


def check(req: TuneRequest) -> Checked:
    """Every input checked before any work; a bad one raises its ExpertFlowError."""
    t, s = req.target, req.study
    if s.trials < 1:
        raise ConfigError(f"--trials {s.trials} must be >= 1")
    if s.heartbeat_s is not None and s.heartbeat_s < 1:
        raise ConfigError(f"--heartbeat {s.heartbeat_s} must be >= 1 (seconds between a trial's heartbeats)")
    check_device(t.device)
    spec = resolve_model(t.model)
    parsed = parse_size(t.budget)
    max_context = check_max_context(spec, t.max_context)  # the model's own limit by default
    plan = plan_memory(spec, parsed, max_context_tokens=max_context, max_batch=t.max_batch, dtype=DTYPE)
    raw_space = load_space(req.inputs.search_space) if req.inputs.search_space else packaged_space(Path(spec.name).name)
    if req.inputs.prompts is not None:
        check_prompts(req.inputs.prompts)
    if s.timeout is not None and not s.timeout > 0:
        raise UsageError(f"--timeout {s.timeout} must be a positive number of seconds (or leave it out "
                         "to run every trial)")
    if req.quality.max_loss is not None and not req.quality.max_loss >= 0:
        raise UsageError(f"--max-quality-loss {req.quality.max_loss} must be >= 0 (0 = exact top-k only)")
    given = req.inputs.profile
    profile = (given if isinstance(given, Profile) else load_given_profile(given, spec)) if given else None
    if t.hardware is not None and profile is None:
        check_hardware(t.hardware, spec)
    out_dir = Path(req.inputs.out) if req.inputs.out is not None else default_out_dir(spec, parsed.text)
    storage_url = s.storage or sqlite_url(out_dir / "study.sqlite3")
    study_name = s.name or f"{Path(spec.name).name}-{parsed.text}"
    join = s.storage is not None and s.name is not None
    check_fresh_study(storage_url, study_name, s.resume or join or s.export_only, explicit=s.storage is not None,
                      must_exist=s.export_only)
    return Checked(spec, parsed, plan, raw_space, profile, out_dir, storage_url, study_name, join)


def gpu_here(device: str) -> bool:
    """Whether `device` (auto / cuda / cpu) means a CUDA GPU on this machine."""
    if device == "cpu":
        return False
    import torch  # noqa: PLC0415 - torch stays optional for the study and the report

    return bool(torch.cuda.is_available())


def check_device(device: str) -> None:
    """--device cuda without a GPU is an error before anything runs (DeviceError, exit 7)."""
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"--device {device!r} is not known; use auto, cuda or cpu")
    if device == "cuda" and not gpu_here(device):
        raise DeviceError("--device cuda was requested but no CUDA GPU is available "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")


def check_prompts(prompts) -> None:
    """A prompt file that is missing, unreadable or empty fails before profiling (DataError)."""
    load_prompts(prompts)


def check_profile_model(prof: Profile, spec: ModelSpec, where) -> None:
    if prof.fingerprint != spec.fingerprint:
        raise ModelError(f"profile {str(where)!r} was made for {prof.meta.model.name!r} "
                         f"(fingerprint {prof.fingerprint}) not {spec.name!r} ({spec.fingerprint}); "
                         "profile this model or pass its own --profile")


def load_given_profile(profile, spec: ModelSpec) -> Profile:
    """--profile DIR, loaded and checked against the model before anything is written."""
    prof = Profile.load(profile)
    check_profile_model(prof, spec, profile)
    return prof


def check_hardware(hardware: str, spec: ModelSpec) -> None:
    """--hardware NAME must be a bundled profile with tables for this model (before profiling)."""
    names = bundled_hardware_names()
    if hardware not in names:
        raise UsageError(f"--hardware {hardware!r} is not a bundled hardware profile; bundled: "
                         f"{', '.join(names) or 'none'} (ef-tune --help lists them); or leave --hardware "
                         "out to measure this machine's GPU")
    load_bundled(hardware, spec)  # DataError when the bundle has no tables for this model


def check_fresh_study(url: str, name: str, allow_existing: bool, *, explicit: bool = True,
                      must_exist: bool = False) -> None:
    """Fail before profiling when the storage cannot be used (StorageError), when the study
    exists and neither --resume nor a shared --storage/--study was given, or (`must_exist`,
    --export-only) when there is no study with trials to export."""
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
    summaries = [sm for sm in study_summaries(url) if sm.study_name == name and sm.n_trials > 0]
    if must_exist and not summaries:
        raise StorageError(nothing)
    if summaries and not (allow_existing or must_exist):
        raise StorageError(f"study {name!r} already exists in {mask_url(url)} with {summaries[0].n_trials} "
                           "trials; pass --resume to continue it, or a new --study name / --out folder")

