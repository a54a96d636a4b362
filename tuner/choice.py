"""The final choice of ef-tune, after the study: the rule on the finalists re-simulated on a
longer slice (tuner/export.py); with synthetic routing, the finalist that stays fastest across
the sensitivity band (tuner/sensitivity.py); with real weights, the chosen config's quality
measured for real, a config over the cap passed over for the next one."""

from __future__ import annotations

from typing import Any

from . import export, quality, sensitivity
from .adaptive_trace import count_error
from .objective import trial_config
from .profiler.activation import default_prompt_file, load_prompts, tokenize_prompts
from .records import Sensitivity, TrialRecord


def final_choice(ctx, done: list[TrialRecord], cap, *, spec, base, prof, q: quality.QualitySide, seed: int, finalists: int,
                 final_tokens: int | None, study_name: str, notes: list[str], prompts=None
                 ) -> tuple[TrialRecord, list[TrialRecord], dict | None, Sensitivity | None, dict | None]:
    """(chosen, rescored finalists, its measured quality or None, the sensitivity record or None,
    the adaptive-k trace check or None)."""
    chosen, scored = export.final_choice(ctx, done, cap, finalists=finalists,
                                         max_decode_tokens=final_tokens, study_name=study_name)
    sens = None
    if prof.routing_kind == "synthetic":
        band = sensitivity.band_traces(prof, seed=seed)
        if band:
            chosen, sens = sensitivity.robust_choice(ctx, chosen, scored, band, cap,
                                                     max_decode_tokens=final_tokens)
        else:
            notes.append("no sensitivity band: the profile does not record the synthetic generator's "
                         "settings (re-profile to get one)")
    measured = None
    if q.prompt_ids:
        before = chosen.number
        chosen, measured = verify_quality(spec, base, chosen, scored, done, ctx, cap, q, final_tokens, notes)
        if sens is not None and chosen.number != before:
            sens.quality_choice = chosen.number  # the band's pick measured over the cap
    check = None
    if q.prompt_ids and prof.routing_kind == "real":  # real weights: re-record under adaptive-k

        tokens = tokenize_prompts(spec, load_prompts(prompts if prompts is not None else default_prompt_file(spec)))
        check = count_error(spec, prof, ctx, scored, token_lists=tokens, device=q.device, dtype=q.dtype,
                            max_decode_tokens=final_tokens, notes=notes)
    return chosen, scored, measured, sens, check


def verify_quality(spec, base, chosen: TrialRecord, finalists, done, ctx, cap, q, final_tokens, notes
                   ) -> tuple[TrialRecord, dict[str, float] | None]:
    """Measure the chosen config's quality for real; walk down the ranking (the chosen config
    first, then the finalists and the other trials by the rule) past any over the cap."""
    rest = export.ranked(finalists, cap) + [t for t in export.ranked(done, cap)
                                            if t.number not in {f.number for f in finalists}]
    ranked = [chosen] + [t for t in rest if t.number != chosen.number]
    from expertflow.runtime.loading import build_model  # noqa: PLC0415 - torch, only when it runs

    model = build_model(spec, device=q.device, dtype=q.dtype)
    cache: dict[tuple, dict[str, Any]] = {}
    for t in ranked[:8]:
        cfg = trial_config(base, t.params)
        a = cfg.adaptive_k
        key = (a.threshold, a.min_k, a.renormalize)
        if key not in cache:
            cache[key] = ({"quality_loss": 0.0, "perplexity_change": 0.0} if a.threshold >= 1.0 else
                          quality.measure_config_quality(spec, cfg, prompts=q.prompt_ids,
                                                         device=q.device, dtype=q.dtype, model=model))
        mq = cache[key]
        if mq["quality_loss"] <= cap + 1e-12:
            if t.number != chosen.number:
                notes.append(f"trial {chosen.number} measured over the quality cap; chose trial {t.number}")
                if t.study_metrics is None:
                    t = export.rescore(ctx, [t], max_decode_tokens=final_tokens)[0]
            return t, {k: float(v) for k, v in mq.items()}
    notes.append("no finalist measured within the quality cap; kept the predicted choice")
    return chosen, None
