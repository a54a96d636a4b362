"""build_report / ef-report: a self-contained page with every section, plain sentences for the
missing optional parts, one-line DataError for a bad folder. (The browser test renders it.)"""

from __future__ import annotations

import html
import json
import re

import pytest

from expertflow.errors import EXIT_DATA, DataError
from reports import data, figures
from reports.build import build_report, load_output
from efcli.report import main as report_main
from tuner.records import TuningRecord

FIGURE_IDS = ["activation_heatmap", "frequency_distribution", "transfer", "kernel", "predictor",
              "history", "importances", "pareto", "parallel_coordinates", "memory", "validation"]


@pytest.fixture(scope="module")
def report_html(output_folder, tmp_path_factory) -> str:
    path = build_report(output_folder, tmp_path_factory.mktemp("report") / "report.html")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sparse_folder(build_output_folder, tmp_path_factory):
    """Real routing, single objective, no validation, no quality table."""
    return build_output_folder(tmp_path_factory.mktemp("sparse") / "run", validated=False,
                               quality_table=False, synthetic=False, multi_objective=False,
                               n_trials=12)


def test_report_is_self_contained_and_offline(report_html):
    import plotly.offline

    bundle = plotly.offline.get_plotlyjs()
    header = bundle[:bundle.index("\n", 4)]  # "/**\n* plotly.js vX.Y.Z"
    assert report_html.count(bundle) == 1 and report_html.count(header) == 1  # inlined, once
    assert report_html.count("Plotly.newPlot") == len(FIGURE_IDS)
    assert not re.search(r"<script[^>]+src=", report_html)  # nothing fetched (the browser test
    assert not re.search(r"<link[^>]+href=", report_html)  # also watches the network)


def test_report_has_every_section_and_figure(report_html, output_folder):
    for section in ("summary", "environment", "profile", "study", "validation", "config"):
        assert f'<section id="{section}">' in report_html
    for fig in FIGURE_IDS:
        assert f'id="plot-{fig}"' in report_html, fig
    assert 'id="synthetic-banner"' in report_html and "SYNTHETIC routing" in report_html
    tuning = TuningRecord.load(output_folder)
    assert f'<pre id="run-command">{tuning.run_command}</pre>' in report_html
    assert 'data-target="config-yaml"' in report_html and 'data-target="run-command"' in report_html
    assert "navigator.clipboard" in report_html and 'execCommand("copy")' in report_html
    shown = re.search(r'<pre class="yaml" id="config-yaml">(.*?)</pre>', report_html, re.S).group(1)
    assert html.unescape(shown) == (output_folder / "config.yaml").read_text()  # the YAML, exactly
    assert "plain LRU, no prefetch" in report_html and "does not fit: needs" in report_html
    assert "What to look for" in report_html


def test_missing_optional_parts_are_sentences(sparse_folder, tmp_path):
    html = build_report(sparse_folder, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="synthetic-banner"' not in html
    assert "Not validated (no GPU here: predictions not validated)" in html
    assert 'id="plot-validation"' not in html
    assert "Single-objective study: there is no trade-off front" in html
    assert 'id="plot-pareto"' not in html
    assert "No measured quality table" in html
    for fig in ("history", "importances", "parallel_coordinates", "memory", "activation_heatmap"):
        assert f'id="plot-{fig}"' in html, fig


def test_unreadable_study_and_missing_profile_still_render(output_copy, tmp_path):
    t = TuningRecord.load(output_copy)
    t.study.storage = f"sqlite:///{tmp_path / 'nowhere' / 'x.sqlite3'}"
    t.save(output_copy)
    (output_copy / "study.sqlite3").unlink()
    import shutil

    shutil.rmtree(output_copy / "profile")
    html = build_report(output_copy).read_text(encoding="utf-8")
    assert (output_copy / "report.html").is_file()
    assert "does not exist" in html and "no profile folder at" in html
    assert 'id="plot-pareto"' in html  # from tuning.json's Pareto list
    assert 'id="plot-history"' not in html and 'id="plot-activation_heatmap"' not in html


@pytest.mark.parametrize("breakage, expected", [
    ("nofolder", "is not a folder"),
    ("empty", "has no tuning.json"),
    ("corrupt", "is corrupt"),
    ("version", "has version 7"),
    ("truncated", "is not a tuning record (chosen: Field required; 1 problem(s) in all)"),
    ("stub", "is not a tuning record (created_at: Field required;"),
    ("renamed", "is not a tuning record (chosen.predicted: Field required; 2 problem(s) in all)"),
])
def test_bad_folder_is_one_line_data_error(output_folder, tmp_path, capsys, breakage, expected):
    d = tmp_path / "out"
    if breakage != "nofolder":
        d.mkdir()
    good = json.loads((output_folder / "tuning.json").read_text())  # raw on purpose: broken below
    if breakage == "corrupt":
        (d / "tuning.json").write_text("{not json")
    elif breakage == "version":
        (d / "tuning.json").write_text(json.dumps({"version": 7}))
    elif breakage == "truncated":  # a whole record but for one part
        (d / "tuning.json").write_text(json.dumps({k: v for k, v in good.items() if k != "chosen"}))
    elif breakage == "stub":
        (d / "tuning.json").write_text(json.dumps({"version": 1, "model": {}, "budget": {}}))
    elif breakage == "renamed":  # a field renamed by a writer the reader does not know
        good["chosen"]["prediction"] = good["chosen"].pop("predicted")
        (d / "tuning.json").write_text(json.dumps(good))
    with pytest.raises(DataError, match=re.escape(expected)):
        build_report(d)
    assert report_main([str(d)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert err.startswith("ef-report: error: ") and "\n" not in err and expected in err
    assert not (d / "report.html").exists()


def test_report_speaks_of_the_executor_the_config_runs_on(output_copy, tmp_path):
    """The fixture's study searched prefetch (eager runtime); the same folder recorded as tuned
    for the graph engine must not tell the reader about prefetch depth or copies hidden by it."""
    eager = build_report(output_copy, tmp_path / "eager.html").read_text()
    assert "the tuner chose depth" in eager and "prefetch can only partly hide it" in eager
    rec = TuningRecord.load(output_copy)
    rec.executor = "graph"
    rec.save(output_copy)
    graph = build_report(output_copy, tmp_path / "graph.html").read_text()
    assert "the tuner chose depth" not in graph and "prefetch can only partly hide it" not in graph
    assert "does not prefetch" in graph and "zero-copy" in graph


def test_cli_writes_the_report(output_copy, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "r.html"
    assert report_main([str(output_copy), "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert target.is_file() and not (output_copy / "report.html").exists()
    assert report_main([str(output_copy)]) == 0
    assert (output_copy / "report.html").is_file()


def test_every_figure_draws_from_its_data(output_folder):
    """Each drawing function turns its data function's output into a figure with data."""
    run = load_output(output_folder)
    t, p, trials = run.tuning, run.profile, run.trials
    cfg = data.config_data(t, run.config_text)["config"]
    inputs = {
        "activation_heatmap": data.activation_heatmap_data(p),
        "frequency_distribution": data.frequency_distribution_data(p, data.slots_per_layer(cfg)),
        "transfer": data.transfer_data(p, t.model.bytes_per_expert),
        "kernel": data.kernel_data(p), "predictor": data.predictor_data(p),
        "history": data.history_data(t, trials, run.study),
        "importances": data.importance_data(t, run.study),
        "pareto": data.pareto_data(t, trials, run.study),
        "parallel_coordinates": data.parallel_coordinates_data(t, trials),
        "memory": data.memory_data(t), "validation": data.validation_data(t),
    }
    assert set(inputs) == set(figures.FIGURES) == set(FIGURE_IDS)
    for name, d in inputs.items():
        fig = figures.FIGURES[name](d)
        assert fig.data, name
        assert not any(tr.type in ("parcoords", "scattergl", "heatmapgl") for tr in fig.data), name
        assert any(len([v for v in (getattr(tr, "x", None) or getattr(tr, "z", None) or []) if v is not None])
                   for tr in fig.data), name
