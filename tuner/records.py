"""Typed, versioned records for what crosses a stage or a file of the tuner.

    ProfileMeta      profile.yaml: what a profile is of and how it was measured (the profiler
                     writes it, tuner.profile.Profile carries and saves it, the tuner and the
                     report read it)
    TrialRecord      one completed trial of the study (tuner.trials.completed_trials), handed
                     to the choice, the Pareto front and tuning.json
    TuningRecord     tuning.json: what ef-tune decided and why (the pipeline writes it, the
                     report reads it, the tests build their fixtures through it)

A record is strict: an unknown or misspelt field is an error where the record is built, so a
renamed field breaks the writer, the reader and the fixtures at once. `TuningRecord.load` turns
a file that does not validate into one DataError line; `save` writes atomically.

Shapes: metrics are the simulator's METRICS (tuner.simulator) by name, `dict[str, float]`;
params are a trial's searched values by dotted RuntimeConfig key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from expertflow.errors import DataError
from expertflow.fsutil import atomic_write_text, read_versioned

TUNING_FILE = "tuning.json"
TUNING_VERSION = 1

Metrics = dict[str, float | None]
Params = dict[str, Any]


def validation_summary(exc: ValidationError) -> str:
    """'where: what; N problem(s) in all' for a record that does not validate (the first one)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}; {exc.error_count()} problem(s) in all"


class Record(BaseModel):
    """Strict: unknown fields are errors; types are checked where the record is built."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TimingNoise(Record):
    """The profile's verdict on its own timing (tuner.profiler.robust.noise_verdict)."""

    criterion: str
    threshold_rel_iqr: float
    noisy: bool
    reasons: list[str]
    decode_layer_spread: float | None = None
    rows_over_threshold: int = 0
    rows: int = 0
    max_rel_iqr: float | None = None
    max_fit_ratio: float | None = None
    others_cpu_share: float | None = None


# ---- profile.yaml -----------------------------------------------------------------------------
PROFILE_VERSION = 1


class ProfileModel(Record):
    name: str
    architecture: str
    fingerprint: str
    dims: dict[str, Any] = {}  # expertflow.registry.ModelSpec.dims()
    dtype: str = "bfloat16"  # the dtype the timing was measured in
    bytes_per_expert: int | None = None
    has_weights: bool | None = None


class ProfileRouting(Record):
    kind: Literal["real", "synthetic"]
    tokens: int = 0  # routed tokens in the trace
    prompts: int = 0
    source: str = ""  # where the prompts came from
    tokenizer: str | None = None
    note: str = ""  # what the routing is, in words (SYNTHETIC ... when it is)
    synthetic: dict[str, Any] | None = None  # the generator's settings (tuner.synthetic.SyntheticParams)
    synthetic_targets: str | None = None
    stats: dict[str, Any] | None = None  # tuner.stats.routing_summary


class ProfileTiming(Record):
    kind: str  # measured-gpu, measured-cpu, bundled:<name>
    note: str = ""
    noise: TimingNoise | None = None  # CPU timing's verdict on itself


class ProfileMeta(Record):
    """profile.yaml, version 1 (`files` is what Profile.save wrote beside it)."""

    version: Literal[1] = PROFILE_VERSION
    profile_id: str
    created_at: str = ""
    tool_version: str = ""
    model: ProfileModel
    hardware: dict[str, Any]  # NVML / host facts (tuner.profiler.hardware; bundles add bundle_*)
    routing: ProfileRouting
    timing: ProfileTiming
    summary: dict[str, float | None] = {}  # headline numbers (tuner.profiler.timing.timing_summary)
    timings_s: dict[str, float] = {}
    files: dict[str, str] = {}


# ---- a trial ----------------------------------------------------------------------------------
class TrialRecord(Record):
    number: int
    params: Params
    values: list[float]  # the study's objectives: decode tokens/s, quality loss
    metrics: Metrics  # every simulator metric of the trial
    constraints: dict[str, float]  # tuner.trials.trial_constraints (<= 0 is feasible)
    feasible: bool
    baseline: str | None = None  # the name of an enqueued baseline (default config, plain LRU)
    study_metrics: Metrics | None = None  # after a re-simulation on a longer slice: the study's own


# ---- tuning.json ------------------------------------------------------------------------------
class ModelInfo(Record):
    name: str
    architecture: str
    fingerprint: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    bytes_per_expert: int


class BudgetInfo(Record):
    text: str
    bytes: int
    plan: dict[str, Any]  # expertflow.budget.MemoryPlan.as_dict()
    terms: list[tuple[str, int]]  # (what, bytes) as the budget's summary lists them


class HardwareInfo(Record):
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    pcie_generation: int | None = None
    pcie_width: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    transformers_version: str | None = None
    source: str | None = None  # "measured" or "bundled:<name>"


class RoutingInfo(Record):
    kind: Literal["real", "synthetic"]
    note: str = ""


class StudyInfo(Record):
    name: str
    storage: str  # the storage URL, password masked
    n_trials: int
    objectives: list[str]
    directions: list[str]
    seed: int = 0
    search_space: dict[str, Any]
    jobs: int | None = None
    target: int | None = None  # the study-wide trial target
    complete: bool | None = None
    max_decode_tokens: int | None = None  # decode tokens each trial simulates
    final_decode_tokens: int | None = None  # ... and each finalist / reference


class QualityInfo(Record):
    metric: Literal["perplexity_increase", "dropped_mass"]
    cap: float | None
    table: list[dict[str, Any]] | None  # per threshold: the measured loss columns
    chosen_measured: dict[str, Any] | None = None  # the chosen config's quality, measured for real


class ChosenInfo(Record):
    trial: int
    params: Params
    predicted: Metrics
    rule: str


class Reference(Record):
    name: str
    feasible: bool = True
    predicted: Metrics | None = None
    reason: str | None = None  # why it is infeasible


class ParetoPoint(Record):
    trial: int
    values: list[float]
    params: Params


class Validation(Record):
    label: str  # "chosen", "trial N", ...
    trial: int | None = None
    params: Params | None = None
    predicted: Metrics | None = None
    measured: Metrics | None = None
    error: Metrics | None = None  # relative error per compared metric
    note: str | None = None


class SensitivitySetting(Record):
    label: str
    locality: float
    lru_hit_25: float


class SensitivityRow(Record):
    trial: int
    speeds: list[float]  # predicted tokens/s per setting
    worst: float


class Sensitivity(Record):
    """The speed of the finalists across less and more local synthetic routing (tuner.sensitivity)."""

    settings: list[SensitivitySetting]
    finalists: list[SensitivityRow]
    chosen: int
    speed_rule_choice: int
    changed: bool
    rule: str
    quality_choice: int | None = None  # the band's pick measured over the quality cap


class AdaptiveTraceCheck(Record):
    """Exact top-k trace against traces re-recorded under the finalists' adaptive-k (real weights)."""

    finalists: list[dict[str, Any]]
    max_count_error: float
    what: str


class TuningRecord(Record):
    """tuning.json, version 1."""

    version: Literal[1] = TUNING_VERSION
    created_at: str
    tool_version: str
    model: ModelInfo
    budget: BudgetInfo
    hardware: HardwareInfo
    routing: RoutingInfo
    # what the config runs on, as the study simulated it: the graph engine (CUDA with the
    # engine's timing in the profile) or the eager runtime; None in files written before
    executor: Literal["graph", "eager"] | None = None
    profile_dir: str  # "profile" (inside the output folder) or an absolute path
    study: StudyInfo
    quality: QualityInfo
    chosen: ChosenInfo
    sensitivity: Sensitivity | None = None
    timing_noise: TimingNoise | None = None
    adaptive_trace: AdaptiveTraceCheck | None = None
    references: list[Reference] = []
    pareto: list[ParetoPoint] = []
    validation: list[Validation] = []
    validation_note: str = ""
    notes: list[str] = []
    timings_s: dict[str, float] = {}
    run_command: str = ""

    def reference(self, name: str) -> Reference | None:
        return next((r for r in self.references if r.name == name), None)

    def measured_chosen(self) -> Validation | None:
        """The chosen config's validation entry when it was measured."""
        return next((v for v in self.validation if v.label == "chosen" and v.measured), None)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)

    def save(self, out_dir: str | os.PathLike) -> Path:
        path = Path(out_dir) / TUNING_FILE
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> TuningRecord:
        """tuning.json of an ef-tune output folder; one DataError line when the folder or the
        file is missing, or the file is corrupt, of another version, or not a tuning record."""
        d = Path(out_dir)
        if not d.is_dir():
            raise DataError(f"{str(d)!r} is not a folder; pass the ef-tune output folder (--out of ef-tune)")
        f = d / TUNING_FILE
        if not f.is_file():
            raise DataError(f"{str(d)!r} has no {TUNING_FILE}: not an ef-tune output folder, or the run did "
                            "not finish; run ef-tune --out DIR (or --resume it) first")
        redo = "re-run ef-tune (--resume rewrites it)"
        raw = read_versioned(f, json.loads, version=TUNING_VERSION, source=f"{str(f)!r}", redo=redo,
                             errors=(json.JSONDecodeError,))
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise DataError(f"{str(f)!r} is not a tuning record ({validation_summary(exc)}): it is "
                            f"truncated or from another tool; {redo}") from None
