"""A realistic ef-tune output folder built without the tuner, for the report's tests.

`build_output_folder(root, **options)` writes, under `root`:
    profile/        a tuner.profile.Profile: a skewed synthetic RoutingTrace (tiny-qwen3-moe dims,
                    4 MoE layers x 16 experts, top-4) and its tables, H200-like transfer numbers
    study.sqlite3   a real multi-objective Optuna study (maximize tokens/s, minimize quality
                    loss) over dotted config keys, with a toy objective, a memory constraint
                    (some trials infeasible) and one failed trial
    config.yaml     expertflow.config.default_config + the chosen trial's params
    tuning.json     a tuner.records.TuningRecord, built through its classes and saved
Options switch the optional parts off (validation, quality table, synthetic routing,
multi-objective) so tests can check that the report says so in a sentence.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _timing import timing_tables

from tuner.records import (
    BudgetInfo,
    ChosenInfo,
    HardwareInfo,
    ModelInfo,
    ParetoPoint,
    QualityInfo,
    Reference,
    RoutingInfo,
    StudyInfo,
    TuningRecord,
    Validation,
)

L, E, K, D = 4, 16, 4, 3  # MoE layers, experts, top-k, predictor lookahead (tiny-qwen3-moe)
BYTES_PER_EXPERT = 12288
CAPACITY = 24
BUDGET_BYTES = 300_000_000
MODEL = "tiny-qwen3-moe"
SEARCH_SPACE = {
    "cache.capacity_experts": {"type": "int", "low": 4, "high": CAPACITY},
    "cache.policy": {"type": "categorical", "choices": ["lru", "lfu", "expertflow"]},
    "prefetch.depth": {"type": "int", "low": 0, "high": 3},
    "adaptive_k.threshold": {"type": "float", "low": 0.6, "high": 1.0},
}


def _trace(seed: int = 0):
    from expertflow.trace import DECODE, PREFILL, RoutingTrace

    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(E, 0.4), size=L)  # [L, E] skewed per layer
    seqs, prefill, decode = 4, 16, 24
    n = seqs * (prefill + decode)
    ids = np.zeros((n, L, K), np.int64)
    for t in range(n):
        for layer in range(L):
            ids[t, layer] = rng.choice(E, size=K, replace=False, p=popularity[layer])
    w = np.sort(rng.dirichlet(np.ones(E), size=(n, L))[..., :K], axis=-1)[..., ::-1]  # [N, L, k]
    pred = np.full((n, L, D, K), -1, np.int64)
    for d in range(1, D + 1):
        hit_p = 0.9 - 0.2 * (d - 1)
        for layer in range(L - d):
            truth = ids[:, layer + d]  # [N, k]
            noise = rng.integers(0, E, size=truth.shape)
            pred[:, layer, d - 1] = np.where(rng.random(truth.shape) < hit_p, truth, noise)
    seq = np.repeat(np.arange(seqs), prefill + decode).astype(np.int32)
    pos = np.tile(np.arange(prefill + decode), seqs).astype(np.int32)
    steps, first = [], 0
    for _ in range(seqs):
        steps.append((first, prefill, PREFILL))
        first += prefill
        for _ in range(decode):
            steps.append((first, 1, DECODE))
            first += 1
    meta = {"num_layers": L, "num_experts": E, "top_k": K, "lookahead": D, "routing": "synthetic",
            "source": "test fixture", "fingerprint": "dims-0061d9ff80270f9d"}
    return RoutingTrace(ids, w.astype(np.float32), pred, seq, pos, np.asarray(steps, np.int64),
                        meta).validate()


def _tables(trace) -> dict[str, pd.DataFrame]:
    counts = np.zeros((L, E))
    for layer in range(L):
        counts[layer] = np.bincount(trace.ids[:, layer].ravel(), minlength=E)
    act = pd.DataFrame([{"layer": lyr, "expert": e, "count": int(counts[lyr, e]),
                         "frequency": counts[lyr, e] / counts[lyr].sum()}
                        for lyr in range(L) for e in range(E)])
    pred_rows = []
    for d in range(1, D + 1):
        for layer in range(L - d):
            hits = [len(set(trace.pred[t, layer, d - 1]) & set(trace.ids[t, layer + d]))
                    for t in range(trace.num_tokens)]
            recall = float(np.mean(hits)) / K
            pred_rows.append({"lookahead": d, "layer": layer, "recall": recall,
                              "precision": recall * 0.95})
    return {"activation": act, "predictor": pd.DataFrame(pred_rows),
            **timing_tables(pinned_gbps=52.0, min_pow=14, max_pow=28)}


HARDWARE = {"gpu_name": "NVIDIA H200", "gpu_memory_bytes": 150_754_820_096, "pcie_generation": 5,
            "pcie_width": 16, "driver_version": "580.95.05", "cuda_version": "13.0",
            "torch_version": "2.11.0+cu130", "transformers_version": "5.17.0", "source": "bundled:h200"}
SYNTHETIC_NOTE = ("SYNTHETIC routing: no trained weights, so expert choices come from the "
                  "calibrated generator, not from this model's router")


def _profile(synthetic: bool):
    from tuner.profile import Profile
    from tuner.records import ProfileMeta, ProfileModel, ProfileRouting, ProfileTiming

    trace = _trace()
    meta = ProfileMeta(
        profile_id="tiny-qwen3-moe-h200-20261129T000000Z", created_at="2026-11-29T00:00:00Z",
        tool_version="0.1.0",
        model=ProfileModel(name=MODEL, architecture="qwen3_moe", fingerprint="dims-0061d9ff80270f9d",
                           dims={"num_experts": E, "top_k": K}, dtype="bfloat16", bytes_per_expert=BYTES_PER_EXPERT),
        hardware={**HARDWARE, "device": "cpu", "host_cpu": "test CPU", "host_memory_bytes": 2**34},
        routing=ProfileRouting(kind="synthetic" if synthetic else "real", tokens=trace.num_tokens, prompts=4,
                               source="fixture",
                               note=SYNTHETIC_NOTE if synthetic else "real routing of the model's router",
                               synthetic={"alpha": 0.4} if synthetic else None),
        timing=ProfileTiming(kind="bundled:h200", note="transfer and kernel times of the bundled H200 profile"),
        summary={"pinned_gbps": 52.0, "expert_copy_ms": 0.24})
    return Profile(meta=meta, trace=trace, tables=_tables(trace))


def toy_metrics(params: dict) -> dict:
    """The toy 'simulator': all METRIC keys from the searched params."""
    cap = params.get("cache.capacity_experts", CAPACITY)
    policy = params.get("cache.policy", "lru")
    depth = params.get("prefetch.depth", 1)
    thr = params.get("adaptive_k.threshold", 1.0)
    hit = min(0.99, cap / (L * E) * 2.2 * (1.1 if policy == "expertflow" else 1.0) + 0.05 * depth)
    speed = 8.0 + 30.0 * hit + 3.0 * depth - 1.5 * max(0, depth - 2) ** 2 + 20.0 * (1.0 - thr)
    loss = round((1.0 - thr) * 0.06, 6)
    return {"decode_tokens_per_s": speed, "prefill_ms": 40.0 - 10 * hit,
            "stall_ms_per_token": (1 - hit) * 2.0, "hit_rate": hit,
            "bytes_per_token": (1 - hit) * L * K * BYTES_PER_EXPERT,
            "peak_gpu_bytes": 299_700_000 + (cap + 4 * depth) * BYTES_PER_EXPERT,
            "activated_per_token": L * K * (0.7 + 0.3 * thr), "dropped_mass_per_token": loss,
            "prefetch_precision": 0.8 if depth else 0.0, "quality_loss": loss}


def _study(path: Path, name: str, n_trials: int, multi: bool):
    import optuna

    from tuner.trials import trial_constraints

    storage = f"sqlite:///{path}"
    directions = ["maximize", "minimize"] if multi else ["maximize"]

    def objective(trial):
        p = {"cache.capacity_experts": trial.suggest_int("cache.capacity_experts", 4, CAPACITY),
             "cache.policy": trial.suggest_categorical("cache.policy", ["lru", "lfu", "expertflow"]),
             "prefetch.depth": trial.suggest_int("prefetch.depth", 0, 3),
             "adaptive_k.threshold": trial.suggest_float("adaptive_k.threshold", 0.6, 1.0)}
        if trial.number == 5:
            raise ValueError("simulated failure")
        m = toy_metrics(p)
        for key, value in trial_constraints(m, budget_bytes=BUDGET_BYTES, margin_bytes=0).items():
            trial.set_constraint(key, value)  # the names and formula the tuner records
        trial.set_user_attr("metrics", m)
        return (m["decode_tokens_per_s"], m["quality_loss"]) if multi else m["decode_tokens_per_s"]

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # quiet; the failed trial is on purpose
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                    sampler=optuna.samplers.RandomSampler(seed=0))  # seeded: stable
        study.optimize(objective, n_trials=n_trials, catch=(ValueError,))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study, storage


def _plan():
    from expertflow.budget import MemoryPlan

    non_expert, kv, margin = 268_928, 2 * 2**20, 15_000_000
    cache = CAPACITY * BYTES_PER_EXPERT + 5000
    work = BUDGET_BYTES - non_expert - kv - margin - cache
    return MemoryPlan(BUDGET_BYTES, non_expert, kv, work, margin, cache, BYTES_PER_EXPERT, CAPACITY,
                      L * E, 4096, 1, 512, 0.05, "300MB")


def build_output_folder(root: Path, *, validated: bool = True, quality_table: bool = True,
                        synthetic: bool = True, multi_objective: bool = True,
                        n_trials: int = 24) -> Path:
    """Write a complete output folder under `root` (see the module docstring); returns `root`."""
    from expertflow.config import Hardware, default_config, save_config
    from expertflow.registry import resolve_model

    root.mkdir(parents=True, exist_ok=True)
    profile = _profile(synthetic)
    profile.save(root / "profile")
    study_name = f"{MODEL}-300MB"
    study, storage = _study((root / "study.sqlite3").resolve(), study_name, n_trials, multi_objective)
    trials = [t for t in study.trials if t.values is not None
              and all(v <= 0 for v in t.constraints.values())]
    cap = 0.02
    ok = [t for t in trials if toy_metrics(t.params)["quality_loss"] <= cap] or trials
    best = max(ok, key=lambda t: t.values[0])
    spec, plan = resolve_model(MODEL), _plan()
    hw = Hardware(**{k: HARDWARE[k] for k in ("gpu_name", "gpu_memory_bytes", "pcie_generation",
                                              "pcie_width")})
    config = default_config(spec, plan, hardware=hw, priors=profile.priors(),
                            profile_id=profile.profile_id,
                            routing="synthetic" if synthetic else "real").with_values(best.params)
    predicted = toy_metrics(best.params)
    measured = {k: v * (0.93 if k == "decode_tokens_per_s" else 1.02) for k, v in predicted.items()}
    save_config(config, root / "config.yaml")
    refs = [
        Reference(name="all experts on GPU", feasible=False, reason="needs 300.6 MB > 300.0 MB budget"),
        Reference(name="plain LRU, no prefetch",
                  predicted=toy_metrics({"cache.policy": "lru", "prefetch.depth": 0})),
        Reference(name="whole-layer offload",
                  predicted={**toy_metrics({"cache.capacity_experts": 4, "prefetch.depth": 0}),
                             "decode_tokens_per_s": 6.5}),
        Reference(name="default config", predicted=toy_metrics({})),
    ]
    directions = [d.name.lower() for d in study.directions]
    objectives = ["decode_tokens_per_s", "quality_loss"][:len(directions)]
    table = [{"threshold": t, "perplexity": 12.0 * (1 + (1 - t) * 0.1), "perplexity_change": (1 - t) * 0.1,
              "kl": (1 - t) * 0.05, "dropped_mass": (1 - t) * 0.06} for t in (1.0, 0.9, 0.8, 0.7)]
    chosen_validation = Validation(
        label="chosen", trial=best.number, params=best.params, predicted=predicted,
        measured=measured if validated else None,
        error={k: (measured[k] - predicted[k]) / predicted[k] for k in predicted if predicted[k]}
        if validated else None)
    record = TuningRecord(
        created_at="2026-11-29T21:00:00+00:00", tool_version="0.1.0",
        model=ModelInfo(name=MODEL, architecture="qwen3_moe", fingerprint=spec.fingerprint,
                        num_moe_layers=L, num_experts=E, top_k=K, bytes_per_expert=BYTES_PER_EXPERT),
        budget=BudgetInfo(text="300MB", bytes=BUDGET_BYTES, plan=plan.as_dict(),
                          terms=[(k, int(v)) for k, v in plan.terms()]),
        hardware=HardwareInfo(**HARDWARE), executor="eager",  # the study searched prefetch
        routing=RoutingInfo(kind="synthetic" if synthetic else "real",
                            note=SYNTHETIC_NOTE if synthetic else "real routing recorded from the router"),
        profile_dir="profile",
        study=StudyInfo(name=study_name, storage=storage, n_trials=n_trials, objectives=objectives,
                        directions=directions, seed=0, search_space=SEARCH_SPACE),
        quality=QualityInfo(metric="dropped_mass", cap=cap, table=table if quality_table else None),
        chosen=ChosenInfo(trial=best.number, params=best.params, predicted=predicted,
                          rule="fastest feasible trial within the quality cap"),
        references=refs,
        pareto=[ParetoPoint(trial=t.number, values=list(t.values), params=t.params)
                for t in study.best_trials] if multi_objective else [],
        validation=[chosen_validation],
        validation_note="validated on NVIDIA H200" if validated else "no GPU here: predictions not validated",
        timings_s={"profile": 1.2, "study": 3.4, "validate": 0.0, "report": 0.0},
        run_command=f"ef-run --config {(root / 'config.yaml').resolve()}",
    )
    record.save(root)
    return root


@pytest.fixture(scope="session")
def output_folder(tmp_path_factory) -> Path:
    """A complete, validated, multi-objective output folder with synthetic routing (read-only!)."""
    return build_output_folder(tmp_path_factory.mktemp("ef-out") / "run")


@pytest.fixture
def output_copy(output_folder, tmp_path) -> Path:
    """A private copy of `output_folder` a test may change (its study storage is still the
    original one, as a copied folder's would be)."""
    return Path(shutil.copytree(output_folder, tmp_path / "run"))


@pytest.fixture(scope="session")
def loaded(output_folder):
    """(TuningRecord, Profile, study, trials, config text) of `output_folder`."""
    from reports import data
    from tuner.profile import Profile

    tuning = TuningRecord.load(output_folder)
    profile = Profile.load(output_folder / "profile")
    study, note = data.load_study(tuning, output_folder)
    assert study is not None, note
    return {"tuning": tuning, "profile": profile, "study": study, "trials": data.study_trials(study),
            "config_text": (output_folder / "config.yaml").read_text(), "dir": output_folder}


@pytest.fixture(name="build_output_folder", scope="session")
def _builder():
    """`build_output_folder(root, **options)` as a fixture, for tests that need a variant."""
    return build_output_folder
