"""The study's numbers for the report: trials, history, importances, Pareto front, parallel
coordinates. Pure functions over an Optuna study (optuna imported lazily) and the
`tuner.records.TuningRecord` of tuning.json."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

from tuner.records import TuningRecord
from tuner.storage import StorageURL
from tuner.trials import complete_trials, pareto_mask, trial_feasible

from .metrics import METRICS, _num, metric_label


def load_study(rec: TuningRecord, out_dir: str | os.PathLike | None = None):
    """(optuna Study or None, note or None). Never creates a storage: a missing SQLite file is
    looked for beside tuning.json (a moved folder) before giving up."""
    url, name = rec.study.storage, rec.study.name
    if not url or not name:
        return None, "tuning.json names no study storage; study figures are left out."
    note = None
    sqlite_file = StorageURL(str(url)).sqlite_file
    if sqlite_file is not None:
        path = Path(sqlite_file)
        if not path.is_file():
            local = Path(out_dir) / path.name if out_dir is not None else None
            if local is None or not local.is_file():
                return None, (f"the study storage {url} does not exist (folder moved or storage "
                              "deleted); study figures use tuning.json only.")
            url, note = StorageURL.for_sqlite_file(local.resolve()).text, f"study read from {local} (folder was moved)."
    try:
        import optuna

        return optuna.load_study(study_name=str(name), storage=str(url)), note
    except Exception as exc:  # noqa: BLE001 - unreachable DB, missing study: a sentence, not a crash
        return None, (f"the study {name!r} could not be read from {url} ({exc.__class__.__name__}: "
                      f"{' '.join(str(exc).split())[:160]}); study figures use tuning.json only.")


#: Constraint name (tuner/study.py) -> the words a reader sees for a trial that broke it.
CONSTRAINT_WORDS = {"memory_over_budget": "over the memory budget", "quality_over_cap": "over the quality cap"}


def broken_constraints(trial) -> list[str]:
    """The names of the constraints a trial broke (value > 0), in CONSTRAINT_WORDS order."""
    cons = dict(getattr(trial, "constraints", None) or {})
    broke = [k for k, v in cons.items() if float(v) > 0]
    return sorted(broke, key=lambda k: (list(CONSTRAINT_WORDS).index(k) if k in CONSTRAINT_WORDS else 99, k))


def infeasible_label(broke: list[str]) -> str:
    """'infeasible: over the quality cap' (or both, or 'infeasible' when the trial says no more)."""
    if not broke:
        return "infeasible"
    return "infeasible: " + " and ".join(CONSTRAINT_WORDS.get(k, k.replace("_", " ")) for k in broke)


def study_trials(study) -> list[dict]:
    """Completed trials as dicts: number, values, params, feasible, broke (constraint names)."""
    if study is None:
        return []
    return [{"number": t.number, "values": [float(v) for v in t.values], "params": dict(t.params),
             "feasible": trial_feasible(t), "broke": broken_constraints(t)} for t in complete_trials(study)]


def objective_names(rec: TuningRecord, n: int) -> list[str]:
    names = list(rec.study.objectives)
    return (names + [f"objective {i}" for i in range(len(names), n)])[:n]


def _directions(rec: TuningRecord, study, n: int) -> list[str]:
    if study is not None:
        return [d.name.lower() for d in study.directions]
    d = list(rec.study.directions)
    return (d + ["minimize"] * n)[:n]


def history_data(rec: TuningRecord, trials: list[dict], study=None) -> dict | None:
    """Per objective: each trial's value and the best feasible value so far."""
    if not trials:
        return None
    n = len(trials[0]["values"])
    names, dirs = objective_names(rec, n), _directions(rec, study, n)
    objectives = []
    for i in range(n):
        best, best_so_far = None, []
        for t in trials:
            v = t["values"][i]
            if t["feasible"] and (best is None or (v > best if dirs[i] == "maximize" else v < best)):
                best = v
            best_so_far.append(best)
        objectives.append({"name": names[i], "label": metric_label(names[i]), "direction": dirs[i],
                           "scale": METRICS[names[i]].scale if names[i] in METRICS else 1.0,
                           "trial": [t["number"] for t in trials],
                           "value": [t["values"][i] for t in trials],
                           "feasible": [t["feasible"] for t in trials], "best_so_far": best_so_far,
                           "infeasible_label": [None if t["feasible"] else infeasible_label(t.get("broke") or [])
                                                for t in trials]})
    chosen = rec.chosen.trial
    by_label: dict[str, int] = {}
    for t in trials:
        if not t["feasible"]:
            label = infeasible_label(t.get("broke") or [])
            by_label[label] = by_label.get(label, 0) + 1
    return {"objectives": objectives, "chosen_trial": chosen, "n_trials": len(trials),
            "n_infeasible": sum(not t["feasible"] for t in trials), "infeasible_by_label": by_label}


def importance_data(rec: TuningRecord, study) -> dict | None:
    """Parameter importances per objective, computed with optuna.importance.

    PED-ANOVA first (no scikit-learn needed; it ranks by "lower is better", so maximised
    objectives are negated), then mean decrease in impurity when scikit-learn is installed.
    Only feasible trials count. The note says which evaluator ran, or why none could.
    """
    if study is None:
        return None
    import optuna
    from optuna.importance import (
        MeanDecreaseImpurityImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    trials = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if t.values is not None and trial_feasible(t)]
    if len(trials) < 2:
        return {"objectives": [], "evaluator": None,
                "note": f"only {len(trials)} feasible completed trial(s): importances need at least 2."}
    optuna_log = logging.getLogger("optuna")
    level = optuna_log.level
    optuna_log.setLevel(logging.WARNING)  # no "A new study created in memory" line
    try:
        view = optuna.create_study(directions=study.directions)  # in memory: feasible trials only
    finally:
        optuna_log.setLevel(level)
    view.add_trials(trials)
    n = len(study.directions)
    names, dirs = objective_names(rec, n), _directions(rec, study, n)
    candidates = [("PED-ANOVA", lambda: PedAnovaImportanceEvaluator()),
                  ("mean decrease in impurity (random forest)",
                   lambda: MeanDecreaseImpurityImportanceEvaluator(seed=0))]
    failures = []
    for label, make in candidates:
        objectives, notes = [], []
        try:
            for i in range(n):
                sign = -1.0 if (dirs[i] == "maximize" and label == "PED-ANOVA") else 1.0
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    imp = get_param_importances(view, evaluator=make(),
                                                target=lambda t, i=i, s=sign: s * t.values[i])
                notes += [str(w.message) for w in caught if "importance" in str(w.message).lower()]
                ordered = sorted(imp.items(), key=lambda kv: -kv[1])
                objectives.append({"name": names[i], "label": metric_label(names[i]),
                                   "params": [k for k, _ in ordered],
                                   "importance": [float(v) for _, v in ordered]})
        except (ImportError, ModuleNotFoundError) as exc:
            failures.append(f"{label}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - an evaluator's corner case must not kill the report
            failures.append(f"{label}: {exc.__class__.__name__}: {exc}")
            continue
        note = f"computed with {label} over {len(trials)} feasible trials"
        if failures:
            note += f" (fell back: {'; '.join(failures)})"
        if notes or all(sum(o["importance"]) == 0 for o in objectives):
            note += "; too few trials to separate the parameters, so treat the ranking as rough"
        return {"objectives": objectives, "evaluator": label, "note": note + "."}
    return {"objectives": [], "evaluator": None,
            "note": "no importance evaluator could run: " + "; ".join(failures) + "."}


def pareto_data(rec: TuningRecord, trials: list[dict], study=None) -> dict | None:
    """All trials in objective space (first two objectives), the feasible Pareto front, the
    chosen trial. Without the study, tuning.json's Pareto list alone. None if single-objective."""
    n = len(trials[0]["values"]) if trials else len(rec.study.objectives)
    if n < 2:
        return None
    if not trials:
        trials = [{"number": p.trial, "values": list(p.values), "params": p.params, "feasible": True}
                  for p in rec.pareto if len(p.values) >= 2]
        if not trials:
            return None
    names, dirs = objective_names(rec, n), _directions(rec, study, n)
    feas = [t for t in trials if t["feasible"]]
    mask = pareto_mask([t["values"][:2] for t in feas], dirs[:2]) if feas else []
    front = sorted((t for t, m in zip(feas, mask) if m), key=lambda t: t["values"][0])
    chosen_no = rec.chosen.trial
    chosen = next((t for t in trials if t["number"] == chosen_no), None)
    if chosen is None and rec.chosen.predicted:
        vals = [_num(rec.chosen.predicted.get(k)) for k in names[:2]]
        if None not in vals:
            chosen = {"number": chosen_no, "values": vals, "params": rec.chosen.params}

    def pts(ts):
        return {"trial": [t["number"] for t in ts], "x": [t["values"][0] for t in ts],
                "y": [t["values"][1] for t in ts],
                "text": [", ".join(f"{k}={v}" for k, v in t["params"].items()) for t in ts]}

    infeasible = [t for t in trials if not t["feasible"]]
    groups: dict[str, list[dict]] = {}
    for t in infeasible:
        groups.setdefault(infeasible_label(t.get("broke") or []), []).append(t)

    return {"x_name": names[0], "y_name": names[1], "x_label": metric_label(names[0]),
            "y_label": metric_label(names[1]), "directions": dirs[:2],
            "x_scale": METRICS[names[0]].scale if names[0] in METRICS else 1.0,
            "y_scale": METRICS[names[1]].scale if names[1] in METRICS else 1.0,
            "feasible": pts([t for t in trials if t["feasible"]]),
            "infeasible": pts(infeasible),
            "infeasible_groups": [{"label": k, **pts(v)} for k, v in sorted(groups.items())],
            "front": pts(front),
            "chosen": pts([chosen]) if chosen else None,
            "cap": _num(rec.quality.cap) if names[1] == "quality_loss" else None}


def parallel_coordinates_data(rec: TuningRecord, trials: list[dict]) -> dict | None:
    """Each trial as a line over the searched parameters and the objectives, every axis scaled
    to [0, 1] (categorical axes spaced evenly), coloured by the first objective."""
    feas = [t for t in trials if t["feasible"]]
    if len(feas) < 2:
        return None
    space = rec.study.search_space
    keys = [k for k in space if any(k in t["params"] for t in feas)]
    keys += sorted({k for t in feas for k in t["params"]} - set(keys))
    n = len(feas[0]["values"])
    names = objective_names(rec, n)
    axes = []
    for key in keys:
        raw = [t["params"].get(key) for t in feas]
        spec = space.get(key) or {}
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in raw if v is not None)
        if numeric and spec.get("type") != "categorical":
            axes.append(_numeric_axis(key, raw, log=bool(spec.get("log"))))
        else:
            cats = [str(c) for c in spec.get("choices", [])] or []
            cats += sorted({str(v) for v in raw} - set(cats))
            pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
            axes.append({"name": key, "kind": "categorical", "raw": [str(v) for v in raw],
                         "norm": [pos.get(str(v)) for v in raw],
                         "ticks": [{"at": pos[c], "text": c} for c in cats]})
    for i in range(n):
        scale = METRICS[names[i]].scale if names[i] in METRICS else 1.0
        axes.append({**_numeric_axis(metric_label(names[i]), [t["values"][i] * scale for t in feas]),
                     "objective": True})
    color = [t["values"][0] for t in feas]
    chosen_no = rec.chosen.trial
    return {"axes": axes, "trial": [t["number"] for t in feas], "color": color,
            "color_label": metric_label(names[0]), "chosen_trial": chosen_no}


def _numeric_axis(name: str, raw: list, log: bool = False) -> dict:
    vals = [float(v) if v is not None else None for v in raw]
    present = [v for v in vals if v is not None]
    use_log = log and present and min(present) > 0
    f = (lambda v: math.log10(v)) if use_log else (lambda v: v)
    lo, hi = (min(map(f, present)), max(map(f, present))) if present else (0.0, 1.0)
    span = hi - lo
    norm = [None if v is None else ((f(v) - lo) / span if span > 0 else 0.5) for v in vals]
    distinct = sorted(set(present))
    if all(float(v).is_integer() for v in present) and 0 < len(distinct) <= 6 and not use_log:
        ticks = [{"at": (v - lo) / span if span > 0 else 0.5, "text": f"{int(v)}"} for v in distinct]
    else:
        ticks = [{"at": q, "text": f"{(10 ** (lo + q * span) if use_log else lo + q * span):.3g}"}
                 for q in ((0.0, 0.5, 1.0) if span > 0 else (0.5,))]
    return {"name": name, "kind": "numeric", "raw": vals, "norm": norm, "ticks": ticks,
            "log": bool(use_log)}
