"""What a new user reads first (issue 11), on real ef-tune output folders made through the
console entry point: the README's run (qwen2-moe, 24GB, bundled H200 timing, synthetic routing)
and a tiny run with a quality cap that most trials break. Checks the report's words (the
hardware it was tuned for, infeasible trials by the constraint they broke, "tuning buys
nothing", no internal citation), config.yaml's size, and that Optuna's own API reads the
study the way ef-tune meant it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tuner.records import TuningRecord

CAP_SPACE = """version: 1
params:
  adaptive_k.threshold: {type: float, low: 0.5, high: 1.0, step: 0.1}
  cache.policy: {type: categorical, choices: [lru, lfu]}
"""


def _tune(argv) -> None:
    from efcli.tune import main as tune_main

    assert tune_main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> Path:
    """ef-tune --model qwen2-moe --budget 24GB, as in the README (fewer trials)."""
    out = tmp_path_factory.mktemp("readme") / "qwen2-moe-24GB"
    _tune(["--model", "qwen2-moe", "--budget", "24GB", "--trials", "12", "--out", out])
    return out


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory) -> Path:
    """A tiny run whose quality cap (0.001 of the gate mass) most dropping trials break."""
    root = tmp_path_factory.mktemp("capped")
    space = root / "space.yaml"
    space.write_text(CAP_SPACE)
    out = root / "out"
    _tune(["--model", "tiny-qwen2-moe", "--budget", "1GB", "--trials", "14", "--out", out,
           "--search-space", space, "--max-quality-loss", "0.001", "--no-validate"])
    return out


def _study(out: Path):
    import optuna

    t = TuningRecord.load(out)
    return optuna.load_study(study_name=t.study.name, storage=t.study.storage)


def _figure_json(html: str, fig_id: str) -> dict:
    """{'data', 'layout'} of one figure, read back from the report's Plotly.newPlot call."""
    m = re.search(r'Plotly\.newPlot\(\s*"plot-' + re.escape(fig_id) + r'",\s*', html)
    assert m, f"no figure {fig_id} in the report"
    dec = json.JSONDecoder()
    data, end = dec.raw_decode(html, m.end())
    layout, _ = dec.raw_decode(html, re.compile(r"\s*,\s*").match(html, end).end())
    return {"data": data, "layout": layout}


# ---- Optuna's own tools see what ef-tune meant ---------------------------------------------------------
def test_optuna_reads_objective_names_constraints_and_the_chosen_trial(readme_run):
    from optuna.trial import TrialState

    study = _study(readme_run)
    t = TuningRecord.load(readme_run)
    assert study.metric_names == t.study.objectives == ["decode_tokens_per_s", "quality_loss"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert done and all(set(tr.constraints) >= {"memory_over_budget"} for tr in done)
    assert study.user_attrs["ef_chosen_trial"] == t.chosen.trial
    chosen = next(tr for tr in done if tr.number == t.chosen.trial)
    assert all(v <= 0 for v in chosen.constraints.values())  # feasible, as Optuna judges it


def test_optuna_sees_which_trials_broke_the_quality_cap(capped_run):
    from optuna.trial import TrialState

    done = _study(capped_run).get_trials(states=(TrialState.COMPLETE,))
    over_cap = [tr for tr in done if tr.constraints.get("quality_over_cap", 0) > 0]
    assert over_cap and all(tr.params["adaptive_k.threshold"] < 1.0 for tr in over_cap)


# ---- the report's words ---------------------------------------------------------------------------------
def test_infeasible_trials_are_labelled_by_the_constraint_they_broke(capped_run):
    from optuna.trial import TrialState

    html = (capped_run / "report.html").read_text()
    assert "infeasible (over budget)" not in html
    done = _study(capped_run).get_trials(states=(TrialState.COMPLETE,))
    over_cap = sum(1 for tr in done if tr.constraints.get("quality_over_cap", 0) > 0)
    over_mem = sum(1 for tr in done if tr.constraints.get("memory_over_budget", 0) > 0)
    names = {tr.get("name") for fig in ("history", "pareto") for tr in _figure_json(html, fig)["data"]}
    assert over_cap > 0, "the fixture run should have trials over the quality cap"
    assert any(n and n.startswith("infeasible: ") and "quality cap" in n for n in names), names
    if over_mem == 0:
        assert not any(n and "memory budget" in n for n in names), names
        assert f"{over_cap} over the quality cap" in html  # the study's intro counts them by constraint


def test_report_headline_says_bundled_profile_without_a_gpu(readme_run):
    import torch

    html = (readme_run / "report.html").read_text()
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the run measured it")
    assert "tuned for the bundled H200 profile" in html
    m = re.search(r'<p class="sub">(.*?)</p>', html, flags=re.DOTALL)
    assert m and "tuned for the bundled H200 profile" in m.group(0)


def test_report_cites_measurements_not_an_internal_file(readme_run):
    html = (readme_run / "report.html").read_text()
    assert "anchors.md" not in html
    assert "arXiv 2312.17238" in html  # the synthetic routing's calibration names its sources


def test_tuning_that_buys_nothing_is_said_in_words(readme_run, capped_run):
    from reports.data import LRU_REFERENCE, NOISE_FRACTION

    for out in (readme_run, capped_run):
        t = TuningRecord.load(out)
        lru = t.reference(LRU_REFERENCE)
        assert lru is not None and lru.predicted, f"{out}: no predicted {LRU_REFERENCE!r} reference"
        ratio = t.chosen.predicted["decode_tokens_per_s"] / lru.predicted["decode_tokens_per_s"]
        html = (out / "report.html").read_text()
        summary = html.split('<section id="summary">')[1].split("</section>")[0]
        if abs(ratio - 1) <= NOISE_FRACTION:
            assert "Tuning buys nothing" in summary and "ExpertFlow chose" not in summary
            if lru.predicted["stall_ms_per_token"] > 0:  # why, in the words of the executor it ran on
                assert t.executor in ("graph", "eager")
                assert ("reading missed experts from host memory over PCIe" if t.executor == "graph"
                        else "hidden behind host time") in summary
        else:
            assert "Tuning buys nothing" not in summary


# ---- figures: one legend entry per line, readable labels, fitted axes --------------------------------
def test_predictor_legend_has_one_entry_per_drawn_line(readme_run):
    html = (readme_run / "report.html").read_text()
    traces = [tr for tr in _figure_json(html, "predictor")["data"] if tr.get("showlegend", True)]
    ys = [tuple(tr["y"]) for tr in traces]
    assert len(set(ys)) == len(ys), "two legend entries draw the same line"


def test_parallel_coordinates_labels_fit_between_axes(capped_run):
    """Axis names are short lines in two staggered rows: a name never shares its row with the
    name of the next axis, and no line is wider than about two axis gaps."""
    html = (capped_run / "report.html").read_text()
    layout = _figure_json(html, "parallel_coordinates")["layout"]
    labels = sorted((a for a in layout["annotations"] if a.get("name") == "axis-label"), key=lambda a: a["x"])
    assert len(labels) >= 3
    assert all(a["yshift"] != b["yshift"] for a, b in zip(labels, labels[1:]))
    lines = [ln for a in labels for ln in a["text"].split("<br>")]
    assert max(len(ln) for ln in lines) <= 13, lines


def test_transfer_x_axis_is_fitted_to_the_data(readme_run):
    import math

    html = (readme_run / "report.html").read_text()
    fig = _figure_json(html, "transfer")
    xs = [x for tr in fig["data"] for x in tr["x"] if x]
    lo, hi = fig["layout"]["xaxis"]["range"]
    assert math.log10(min(xs)) - 1 <= lo <= math.log10(min(xs)) and math.log10(max(xs)) <= hi <= math.log10(max(xs)) + 1
    for ann in fig["layout"].get("annotations", []):
        if ann.get("xref") == "x":
            assert lo <= ann["x"] <= hi, ann


# ---- config.yaml stays short ----------------------------------------------------------------------------
def test_config_yaml_is_short_and_carries_no_synthetic_priors(readme_run):
    """The README run's routing is synthetic: its expert frequencies are the generator's, so
    config.yaml has no priors (with real routing they are kept, rounded to 3 digits:
    tests/tuner/test_synthetic_honesty.py)."""
    import yaml

    text = (readme_run / "config.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["provenance"]["routing"] == "synthetic" and data["cache"]["priors"] is None
    assert len(text.encode()) < 14_000, f"config.yaml is {len(text.encode())} bytes"  # was 32 KB
    assert len(text.splitlines()) < 80  # the settings are not lost among wrapped prior lines
