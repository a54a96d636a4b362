"""`tune(request) -> TuneResult`: profile (or reuse a profile), tune, validate, export.

    request.check          every input, before any work (tuner/request.py)
    stages                 profile, base config, search space, quality (tuner/stages.py)
    study                  the Optuna study over the simulator (tuner/study.py)
    export                 under the study's export claim: the choice (fastest feasible trial
                           within the quality cap, re-simulated on a longer slice; with real
                           weights its quality measured for real; with synthetic routing the
                           finalist that stays fastest across a sensitivity band: tuner/choice.py),
                           the references, validation on the GPU, config.yaml and tuning.json
                           (a TuningRecord, tuner/records.py)

The report is not built here: the `ef-tune` command builds it from the folder after tune()
(efcli/tune.py; reports.build.build_report for the Python API).
"""

from __future__ import annotations

import logging
from typing import Any

from expertflow.config import now_iso, tool_version
from expertflow.errors import ExpertFlowError
from expertflow.fsutil import claim_out_dir

from . import choice, export, stages, trust
from .objective import StudyContext, trial_config
from .records import (AdaptiveTraceCheck, BudgetInfo, ChosenInfo, HardwareInfo, ModelInfo, ParetoPoint, QualityInfo,
                      Reference, RoutingInfo, StudyInfo, TrialRecord, TuningRecord,
                      Validation)
from .request import Checked, TuneRequest, TuneResult, check, is_output_file
from .stages import Run
from .study import baseline_values, run_study
from .trials import completed_trials, finished_count, pareto_front
from .validate import validate_configs

log = logging.getLogger(__name__)

FINALISTS = 3
VALIDATE_TOKENS = 128  # decode tokens measured per validated config

#: Study user attributes ef-tune records for Optuna's own tools (optuna-dashboard, load_study).
CHOSEN_TRIAL_ATTR = "ef_chosen_trial"
CHOSEN_CONFIG_ATTR = "ef_chosen_config"


def tune(request: TuneRequest) -> TuneResult:
    """Run the whole ef-tune pipeline; returns where the config is, and tuning.json's record.

    Every input is checked before anything is written (a bad one raises its ExpertFlowError and
    leaves no output). With an explicit storage and study name the study is shared: this call
    joins it when it exists, runs trials until the study's total reaches `trials`, and exports
    only if no other worker exported these results yet (`TuneResult.exported`). `export_only`
    runs no trial and exports the shared study's results into `out` (always). An `out` folder
    that holds files ef-tune did not write is refused (OutputError) unless `force`; a run that
    fails with an ExpertFlowError leaves `out` as it found it.
    """
    chk = check(request)
    folder = claim_out_dir(chk.out_dir, is_output_file, force=request.inputs.force, what="ef-tune")
    try:
        return _tune_in(Run(request, chk))
    except ExpertFlowError:
        folder.restore()  # a user error after the checks: leave the folder as it was found
        raise


def _tune_in(run: Run) -> TuneResult:
    req = run.req
    with run.timed("profile"):
        stages.profile(run)
    stages.base_config(run)
    stages.space(run)
    with run.timed("quality"):
        stages.quality_stage(run)
    q = run.quality
    run.ctx = StudyContext(run.prof.trace, run.costs, run.base, run.space, quality_cap=req.quality.cap,
                           quality_tables=q.tables, max_decode_tokens=req.study.decode_tokens)
    run.baselines = baseline_values(run.space, run.base, stages.symbols(run)["budget"])
    with run.timed("study"):
        run.study = _study(run)
    run.notes.extend(run.study.notes)
    try:
        with run.study.export_claim(run.out_dir, force=req.study.export_only) as claim:
            if not claim.won:
                return _not_exported(run, claim.previous)
            res = _export(run)
            claim.done(res.config_path)
            res.trials_run = run.study.own
            return res
    finally:
        run.study.close()


def _study(run: Run):
    s, chk = run.req.study, run.chk
    attrs = {"fingerprint": chk.spec.fingerprint, "budget_bytes": chk.plan.budget_bytes,
             "search_space": run.space.as_dict(), "quality_cap": run.req.quality.cap,
             "quality_metric": run.quality.metric, "max_decode_tokens": s.decode_tokens,
             "profile_id": run.prof.profile_id, "seed": s.seed}
    return run_study(run.ctx, storage_url=chk.storage_url, name=chk.study_name, n_trials=s.trials,
                     timeout=s.timeout, seed=s.seed, resume=s.resume, jobs=default_jobs(s.jobs),
                     progress=run.req.progress, attrs=attrs, baselines=run.baselines, join=chk.join,
                     heartbeat_s=s.heartbeat_s, run_trials=not s.export_only)


def default_jobs(jobs: int | None) -> int:
    """Worker processes for the study: 1 unless asked. Measured on 2 cores with the default
    SQLite storage, two workers were slower than one (SQLite serialises their writes, and each
    waits for the other's lock); with a server storage (PostgreSQL) pass --jobs N."""
    return 1 if jobs is None else max(1, int(jobs))


def _not_exported(run: Run, record: dict[str, Any] | None) -> TuneResult:
    """This worker's result when another one exported the same finished study."""
    rec = dict(record or {})
    run.notes.append(f"study {run.study.name!r} is complete with {rec.get('finished')} finished trials; another "
                     f"worker ({rec.get('by')}) exported them to {rec.get('out')}, so this one wrote nothing "
                     "(ef-tune --export-only writes them here too)")
    return TuneResult(run.out_dir.resolve(), None, None, None, run.notes, exported=False, exported_by=rec,
                      trials_run=run.study.own)


# ---- the export -------------------------------------------------------------------------------
def _export(run: Run) -> TuneResult:
    """The choice, references, validation, config.yaml and tuning.json (each file written
    atomically) from the study's shared results."""
    req, chk, s = run.req, run.chk, run.req.study
    with run.timed("choose"):
        done = completed_trials(run.study.study)
        chosen, finalists, measured_quality, sens, trace_check = choice.final_choice(
            run.ctx, done, req.quality.cap, spec=chk.spec, base=run.base, prof=run.prof, q=run.quality,
            seed=s.seed, finalists=FINALISTS, final_tokens=s.final_decode_tokens, study_name=chk.study_name,
            notes=run.notes, prompts=run.quality.prompts)
        refs = stages.references(run.ctx, chk.spec, chk.plan, run.costs, run.baselines,
                                 decode_tokens=s.final_decode_tokens)
    with run.timed("validate"):
        val, vnote = _validate(run, chosen, finalists)
    measured = dict(val[0].measured or {})
    measured.pop("decode_tokens", None)
    measured.update(measured_quality or {})
    config = export.build_config(run.base, chosen.params, predicted=chosen.metrics, measured=measured,
                                 study_name=chk.study_name, trial_number=chosen.number,
                                 profile_id=run.prof.profile_id, routing=run.prof.routing_kind,
                                 hardware_source=str(run.hw_meta.get("source") or "unknown"))
    config_path = export.write_config(config, run.out_dir / "config.yaml").resolve()
    if not run.gpu_here:
        run.notes.append(f"config.yaml is for {run.hw_meta.get('gpu_name') or 'a CUDA GPU'} (runtime.device: "
                         "cuda); this machine has no GPU, so the run command adds --device cpu to run it here "
                         "(slowly); on the GPU drop --device")
    record = TuningRecord(
        created_at=now_iso(), tool_version=tool_version(), model=_model_info(chk), budget=_budget_info(chk),
        hardware=HardwareInfo(**{k: run.hw_meta.get(k) for k in HardwareInfo.model_fields}),
        routing=RoutingInfo(kind=run.prof.routing_kind, note=run.prof.meta.routing.note),
        executor=stages.executor(run.costs, run.base),
        profile_dir=("profile" if run.prof_dir.resolve() == (run.out_dir / "profile").resolve()
                     else str(run.prof_dir.resolve())),
        study=_study_info(run), quality=_quality_info(run, measured_quality),
        chosen=ChosenInfo(trial=chosen.number, params=chosen.params, predicted=chosen.metrics,
                          rule=sens.rule if sens else export.RULE),
        sensitivity=sens,
        timing_noise=trust.timing_noise(run.prof),
        adaptive_trace=AdaptiveTraceCheck(**trace_check) if trace_check else None,
        references=[Reference(**r) for r in refs],
        pareto=[ParetoPoint(trial=t.number, values=t.values, params=t.params) for t in pareto_front(done)],
        validation=val, validation_note=vnote, notes=run.notes, timings_s=run.timings,
        run_command=run_command(config_path, gpu_here=run.gpu_here))
    _record_in_study(run.study.study, chosen, config_path)
    record.save(run.out_dir)
    return TuneResult(run.out_dir.resolve(), config_path, record, config, run.notes)


def _validate(run: Run, chosen: TrialRecord, finalists: list[TrialRecord]) -> tuple[list[Validation], str]:
    """The chosen config and up to two other finalists measured on the GPU (routing replayed
    from the trace without trained weights), or the chosen one's prediction alone."""
    others = [t for t in finalists if t.number != chosen.number][:2]
    trials = [chosen] + others
    if not (run.req.validate and run.gpu_here):
        note = "validation skipped (--no-validate)" if not run.req.validate else "no GPU here: predictions not validated"
        return [Validation(label="chosen", trial=chosen.number, params=chosen.params,
                           predicted=chosen.metrics)], note
    spec, q, prompt_tokens = run.chk.spec, run.quality, run.ctx.prompt_tokens
    pids = None
    if spec.has_weights and q.prompt_ids:  # real weights route real text: a real prompt
        import torch  # noqa: PLC0415 - torch stays optional for the study (validation needs a GPU)

        pids = torch.tensor([q.prompt_ids[0][:prompt_tokens]])
    val = validate_configs(spec, [trial_config(run.base, t.params) for t in trials], run.prof.trace,
                           device="cuda", max_new_tokens=VALIDATE_TOKENS, prompt_tokens=prompt_tokens,
                           labels=["chosen"] + [f"trial {t.number}" for t in others], costs=run.costs,
                           trials=[t.number for t in trials], replay=not spec.has_weights, prompt_ids=pids)
    out = [Validation(**{**v, "params": t.params}) for v, t in zip(val, trials)]
    measured = any(v.measured for v in out)
    return out, (f"validated on {run.hw_meta.get('gpu_name') or 'this GPU'}" if measured
                 else "validation failed to measure")


def _model_info(chk: Checked) -> ModelInfo:
    spec = chk.spec
    return ModelInfo(name=spec.name, architecture=spec.architecture, fingerprint=spec.fingerprint,
                     num_moe_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                     bytes_per_expert=chk.plan.bytes_per_expert)


def _budget_info(chk: Checked) -> BudgetInfo:
    plan = chk.plan
    return BudgetInfo(text=chk.budget.text, bytes=plan.budget_bytes, plan=plan.as_dict(),
                      terms=[(k, int(v)) for k, v in plan.terms()])


def _study_info(run: Run) -> StudyInfo:
    s, study = run.req.study, run.study
    return StudyInfo(name=run.chk.study_name, storage=study.storage_url, n_trials=finished_count(study.study),
                     objectives=["decode_tokens_per_s", "quality_loss"], directions=["maximize", "minimize"],
                     seed=s.seed, search_space=run.space.as_dict(), jobs=study.jobs, target=study.target,
                     complete=study.complete, max_decode_tokens=s.decode_tokens,
                     final_decode_tokens=s.final_decode_tokens)


def _quality_info(run: Run, measured: dict | None) -> QualityInfo:
    q = run.quality
    return QualityInfo(metric=q.metric, cap=run.req.quality.cap, table=q.table, chosen_measured=measured)


def run_command(config_path, *, gpu_here: bool) -> str:
    """The `ef-run` line to print: it runs on this machine (on its CPU when it has no GPU)."""
    return f"ef-run --config {config_path}" + ("" if gpu_here else " --device cpu")


def _record_in_study(study, chosen: TrialRecord, config_path) -> None:
    """The chosen trial, as a study attribute Optuna's tools show (its own best_trials is the
    Pareto front, which does not know the quality cap or the re-simulation)."""
    study.set_user_attr(CHOSEN_TRIAL_ATTR, int(chosen.number))
    study.set_user_attr(CHOSEN_CONFIG_ATTR, str(config_path))
