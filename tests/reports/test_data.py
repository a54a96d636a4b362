"""The report's data functions (reports.data), on the fixture output folder, without plotly."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest

from reports import data
from tuner.records import BudgetInfo, RoutingInfo


@pytest.fixture
def tuning(loaded):
    return loaded["tuning"].model_copy(deep=True)


# ---- metrics ----------------------------------------------------------------------------------
def test_format_metric_carries_units():
    assert data.format_metric("decode_tokens_per_s", 41.234) == "41.23 tokens/s"
    assert data.format_metric("hit_rate", 0.875) == "87.5 %"
    assert data.format_metric("stall_ms_per_token", 0.25) == "0.250 ms/token"
    assert data.format_metric("peak_gpu_bytes", 3 * 2**30) == "3.00 GiB"
    assert data.format_metric("bytes_per_token", 2**20) == "1.00 MiB/token"
    assert data.format_metric("quality_loss", None) == "—"
    assert data.format_metric("quality_loss", float("nan")) == "—"
    assert data.relative_error(10.0, 9.3) == pytest.approx(-0.07)
    assert data.relative_error(0.0, 1.0) is None


# ---- summary ----------------------------------------------------------------------------------
def test_summary_puts_chosen_measured_and_references_side_by_side(tuning):
    s = data.summary_data(tuning)
    kinds = [r["kind"] for r in s["rows"]]
    assert kinds == ["chosen", "measured", "reference", "reference", "reference", "reference"]
    chosen, measured = s["rows"][0], s["rows"][1]
    assert f"trial {tuning.chosen.trial}" in chosen["name"]
    speed = tuning.chosen.predicted["decode_tokens_per_s"]
    assert chosen["values"]["decode_tokens_per_s"] == pytest.approx(speed)
    assert measured["values"]["decode_tokens_per_s"] == pytest.approx(speed * 0.93)
    on_gpu = s["rows"][2]
    assert on_gpu["feasible"] is False and "needs" in on_gpu["reason"]
    assert all(v is None for v in on_gpu["values"].values())
    lru = s["rows"][3]
    ref_speed = tuning.references[1].predicted["decode_tokens_per_s"]
    assert lru["chosen_speedup"] == pytest.approx(speed / ref_speed)
    assert lru["cells"]["hit_rate"].endswith("%") and lru["cells"]["prefill_ms"].endswith("ms")


def test_verdict_flags_what_an_engineer_must_know(tuning):
    levels = {c["text"].split(" ")[0]: c["level"] for c in data.verdict_data(tuning)}
    assert levels["Fits"] == "ok"
    assert levels["Quality"] == "ok"
    assert levels["Routing"] == "warn"  # synthetic routing
    assert levels["Validated"] == "ok"  # -7 % is within the tolerance
    text = " ".join(c["text"] for c in data.verdict_data(tuning))
    assert "7.0% below the prediction" in text and "as fast as 'plain LRU, no prefetch'" in text

    tuning.chosen.predicted["peak_gpu_bytes"] = tuning.budget.bytes + 1
    tuning.chosen.predicted["quality_loss"] = 0.05
    tuning.validation = []
    tuning.routing.kind = "real"
    checks = data.verdict_data(tuning)
    by_word = {c["text"].split(" ")[0]: c for c in checks}
    assert by_word["Exceeds"]["level"] == "bad"
    assert by_word["Quality"]["level"] == "bad" and "above the cap" in by_word["Quality"]["text"]
    assert by_word["Not"]["level"] == "warn" and "(validated on NVIDIA H200)" in by_word["Not"]["text"]
    assert "Routing" not in by_word


def test_verdict_warns_when_a_reference_is_faster(tuning):
    tuning.references[1].predicted["decode_tokens_per_s"] = 1e6
    speed = next(c for c in data.verdict_data(tuning) if c["text"].startswith("Predicted"))
    assert speed["level"] == "warn" and "plain LRU, no prefetch" in speed["text"]


def test_describe_config_in_plain_words(loaded):
    cfg = data.config_data(loaded["tuning"], loaded["config_text"])["config"]
    assert loaded["tuning"].executor == "eager"  # the fixture's study searched prefetch
    words = " ".join(data.describe_config(cfg, "eager"))
    cap = cfg["cache"]["capacity_experts"]
    assert f"Keep {cap} of 64 routed experts" in words
    assert f"Prefetch {cfg['prefetch']['depth']} layer" in words
    assert f"{cfg['adaptive_k']['threshold']:.0%} of the gate mass" in words
    off = copy.deepcopy(cfg)
    off["prefetch"]["depth"], off["adaptive_k"]["threshold"] = 0, 1.0
    words = " ".join(data.describe_config(off, "eager"))
    assert "Prefetch off" in words and "Exact top-4 routing" in words
    assert data.describe_config(None) == []


def test_describe_config_says_what_the_graph_engine_does(loaded):
    """On the graph engine there is no prefetch: misses are read zero-copy and admitted through
    read-through slots (or not at all); without priors the cache starts empty."""
    cfg = data.config_data(loaded["tuning"], loaded["config_text"])["config"]
    cfg = copy.deepcopy(cfg)
    cfg["cache"]["read_through_slots"], cfg["cache"]["priors"] = 2, None
    words = " ".join(data.describe_config(cfg, "graph"))
    assert "Prefetch" not in words and "zero-copy" in words and "2 read-through slots" in words
    assert "starts empty" in words and "warm start" not in words and "graph engine" in words
    cfg["cache"]["read_through_slots"] = 0
    assert "bypass" in " ".join(data.describe_config(cfg, "graph"))
    assert "Prefetch" in " ".join(data.describe_config(cfg, "eager"))
    # no executor recorded (older tuning.json): the config's own runtime.engine and device decide
    cfg["runtime"].update(engine="auto", device="cuda")
    assert "zero-copy" in " ".join(data.describe_config(cfg))
    cfg["runtime"]["device"] = "cpu"
    assert "zero-copy" not in " ".join(data.describe_config(cfg))


def test_buys_nothing_explains_the_remaining_miss_time_for_its_executor(tuning):
    lru = tuning.reference(data.LRU_REFERENCE)
    tuning.chosen.predicted.update(decode_tokens_per_s=lru.predicted["decode_tokens_per_s"])
    lru.predicted["stall_ms_per_token"] = 1.5
    tuning.executor = "graph"
    text = data.tuning_gain_data(tuning)["stall_text"]
    assert "1.50 ms" in text and "over PCIe" in text and "host time" not in text
    tuning.executor = "eager"
    assert "hidden behind host time" in data.tuning_gain_data(tuning)["stall_text"]


def test_environment_says_synthetic_routing_prominently(tuning, loaded):
    env = data.environment_data(tuning, loaded["profile"])
    rows = {r["label"]: r["value"] for r in env["rows"]}
    assert rows["GPU tuned for"].startswith("NVIDIA H200") and rows["PCIe"] == "Gen5 x16"
    assert "2.11.0+cu130" in rows["torch / transformers"]
    assert env["synthetic"] is True and "SYNTHETIC" in env["notices"][0]
    assert any("bundled" in n for n in env["notices"])
    tuning.routing = RoutingInfo(kind="real", note="recorded from the router")
    tuning.hardware.source = "measured"
    env = data.environment_data(tuning, None)
    assert env["synthetic"] is False and env["notices"] == []


# ---- profile ----------------------------------------------------------------------------------
def test_activation_heatmap_is_layer_by_expert_percent(loaded):
    d = data.activation_heatmap_data(loaded["profile"])
    z = np.array(d["z"])
    assert z.shape == (4, 16)
    np.testing.assert_allclose(z.sum(axis=1), 100.0)
    counts = np.bincount(loaded["profile"].trace.ids[:, 2].ravel(), minlength=16)
    np.testing.assert_allclose(z[2], counts / counts.sum() * 100.0)
    assert data.activation_heatmap_data(None) is None


def test_frequency_distribution_curves(loaded):
    p = loaded["profile"]
    d = data.frequency_distribution_data(p, slots_per_layer=4.0)
    curves = np.array(d["per_layer"])
    assert curves.shape == (4, 17) and d["x_percent"][0] == 0 and d["x_percent"][-1] == 100
    assert np.all(np.diff(curves, axis=1) >= -1e-9)
    np.testing.assert_allclose(curves[:, -1], 100.0)
    freq = p.priors()
    top4 = np.sort(freq, axis=1)[:, ::-1][:, :4].sum(axis=1).mean() * 100
    assert d["static_hit_percent"] == pytest.approx(top4)
    n80 = np.median([np.searchsorted(np.cumsum(np.sort(r)[::-1]), 0.8 - 1e-9) + 1 for r in freq])
    assert d["experts_needed_median"]["80"] == n80
    assert data.frequency_distribution_data(p)["static_hit_percent"] is None


def test_transfer_data_series_and_expert_marker(loaded):
    p = loaded["profile"]
    d = data.transfer_data(p, bytes_per_expert=12288)
    names = {s["name"] for s in d["series"]}
    assert names == {"pinned, 1 stream", "pageable, 1 stream"}
    pinned = next(s for s in d["series"] if s["pinned"])
    assert pinned["bytes"] == sorted(pinned["bytes"]) and max(pinned["gbps"]) == pytest.approx(52, rel=0.05)
    assert d["expert"]["copy_ms"] == pytest.approx(p.copy_ms(12288))
    assert d["expert"]["gbps"] == pytest.approx(12288 / p.copy_ms(12288) / 1e6)
    assert data.transfer_data(p)["expert"] is None


def test_kernel_and_predictor_data(loaded):
    p = loaded["profile"]
    k = data.kernel_data(p)
    assert [s["name"] for s in k["series"]] == ["one expert's FFN", "non-expert part of one layer"]
    assert k["series"][0]["tokens"] == sorted(k["series"][0]["tokens"])
    pr = data.predictor_data(p)
    assert pr["lookahead"] == [1, 2, 3]
    means = pr["recall"]["mean"]
    assert means[0] > means[-1] and all(0 <= v <= 100 for v in means)  # fixture: worse further ahead
    assert all(lo <= m <= hi for lo, m, hi in zip(pr["recall"]["min"], means, pr["recall"]["max"]))
    q = copy.copy(p)
    q.tables = {k: v for k, v in p.tables.items() if k != "predictor"}
    assert data.predictor_data(q) is None


# ---- study ------------------------------------------------------------------------------------
def test_study_trials_skip_failed_and_flag_infeasible(loaded):
    trials = loaded["trials"]
    assert len(trials) == 23  # 24 trials, one failed
    infeasible = {t["number"] for t in trials if not t["feasible"]}
    assert infeasible  # the fixture's memory constraint rejects some
    over = {t.number for t in loaded["study"].trials
            if t.values is not None and any(v > 0 for v in t.constraints.values())}
    assert infeasible == over


def test_history_best_so_far_counts_only_feasible_trials(loaded):
    h = data.history_data(loaded["tuning"], loaded["trials"], loaded["study"])
    speed, loss = h["objectives"]
    assert speed["direction"] == "maximize" and loss["direction"] == "minimize"
    for i in range(len(speed["trial"])):
        seen = [v for v, f in zip(speed["value"][:i + 1], speed["feasible"][:i + 1]) if f]
        assert speed["best_so_far"][i] == (max(seen) if seen else None)
        seen = [v for v, f in zip(loss["value"][:i + 1], loss["feasible"][:i + 1]) if f]
        assert loss["best_so_far"][i] == (min(seen) if seen else None)
    assert h["n_infeasible"] == sum(not t["feasible"] for t in loaded["trials"])
    assert data.history_data(loaded["tuning"], [], None) is None


def test_importances_per_objective(loaded):
    imp = data.importance_data(loaded["tuning"], loaded["study"])
    assert imp["evaluator"] == "PED-ANOVA"
    assert [o["name"] for o in imp["objectives"]] == ["decode_tokens_per_s", "quality_loss"]
    space = set(loaded["tuning"].study.search_space)
    for o in imp["objectives"]:
        assert set(o["params"]) == space
        assert o["importance"] == sorted(o["importance"], reverse=True)
    loss = imp["objectives"][1]
    assert loss["params"][0] == "adaptive_k.threshold"  # the toy quality loss depends on it alone
    assert "feasible trials" in imp["note"]


def test_importances_fall_back_and_say_so(loaded, monkeypatch):
    import optuna.importance

    class Broken:
        def __init__(self, *a, **k):
            raise ImportError("PED-ANOVA disabled for the test")

    monkeypatch.setattr(optuna.importance, "PedAnovaImportanceEvaluator", Broken)
    has_sklearn = "sklearn" in sys.modules or __import__("importlib").util.find_spec("sklearn")
    imp = data.importance_data(loaded["tuning"], loaded["study"])
    assert "PED-ANOVA disabled for the test" in imp["note"]
    if has_sklearn:
        assert imp["evaluator"].startswith("mean decrease")
    else:
        assert imp["objectives"] == [] and imp["evaluator"] is None
        assert imp["note"].startswith("no importance evaluator could run")
    assert data.importance_data(loaded["tuning"], None) is None


def test_pareto_mask():
    pts = [[10, 0.5], [12, 0.5], [12, 0.1], [5, 0.0], [11, 0.05]]
    assert data.pareto_mask(pts, ["maximize", "minimize"]) == [False, False, True, True, True]
    assert data.pareto_mask([[1, 1], [1, 1]], ["minimize", "minimize"]) == [True, True]


def test_pareto_data_marks_front_and_chosen(loaded):
    t, trials = loaded["tuning"], loaded["trials"]
    d = data.pareto_data(t, trials, loaded["study"])
    assert d["x_name"] == "decode_tokens_per_s" and d["y_name"] == "quality_loss"
    feas = [tr for tr in trials if tr["feasible"]]
    for x, y in zip(d["front"]["x"], d["front"]["y"]):
        assert not any(tr["values"][0] >= x and tr["values"][1] <= y and
                       (tr["values"][0] > x or tr["values"][1] < y) for tr in feas)
    assert set(d["front"]["trial"]).isdisjoint(d["infeasible"]["trial"])
    assert d["chosen"]["trial"] == [t.chosen.trial]
    assert d["cap"] == pytest.approx(0.02)
    # Without the study: the Pareto list of tuning.json.
    d2 = data.pareto_data(t, [], None)
    assert sorted(d2["front"]["trial"]) == sorted(p.trial for p in t.pareto)


def test_pareto_none_for_single_objective(tuning):
    tuning.study.objectives = ["decode_tokens_per_s"]
    trials = [{"number": 0, "values": [1.0], "params": {}, "feasible": True}]
    assert data.pareto_data(tuning, trials) is None


def test_parallel_coordinates_axes(loaded):
    t = loaded["tuning"]
    d = data.parallel_coordinates_data(t, loaded["trials"])
    names = [a["name"] for a in d["axes"]]
    assert names[:4] == list(t.study.search_space)
    assert names[4:] == ["decode speed (tokens/s)", "quality loss (%)"]
    n = sum(tr["feasible"] for tr in loaded["trials"])
    for a in d["axes"]:
        assert len(a["norm"]) == n and all(0.0 <= v <= 1.0 for v in a["norm"])
    policy = d["axes"][1]
    assert policy["kind"] == "categorical"
    assert [tk["text"] for tk in policy["ticks"]] == ["lru", "lfu", "expertflow"]
    depth = d["axes"][2]
    assert all(tk["text"].isdigit() for tk in depth["ticks"])  # an int axis has int ticks
    assert d["chosen_trial"] in d["trial"]
    assert data.parallel_coordinates_data(t, []) is None


def test_memory_terms_add_up_to_the_budget(loaded):
    d = data.memory_data(loaded["tuning"])
    assert d["sum_bytes"] == pytest.approx(d["budget_bytes"])
    assert d["unit"] == "MiB" and d["budget_value"] == pytest.approx(300e6 / 2**20)
    assert [t["label"] for t in d["terms"]][-2:] == ["expert cache", "unused"]
    assert d["peak_value"] == pytest.approx(loaded["tuning"].chosen.predicted["peak_gpu_bytes"] / 2**20)
    t = loaded["tuning"]
    no_terms = BudgetInfo(text=t.budget.text, bytes=t.budget.bytes, plan=t.budget.plan, terms=[])
    assert data.memory_data(t.model_copy(update={"budget": no_terms})) is None


def test_quality_table(tuning):
    q = data.quality_data(tuning)
    assert q["columns"][0] == "threshold" and q["cap"] == pytest.approx(0.02)
    last = q["rows"][-1]
    assert last["cells"]["perplexity_change"] == "3"  # shown in %
    assert last["values"]["perplexity_change"] == pytest.approx(0.03)
    tuning.quality.table = None
    assert data.quality_data(tuning) is None


def test_validation_data(tuning):
    v = data.validation_data(tuning)
    speed = next(r for r in v["rows"] if r["metric"] == "decode_tokens_per_s")
    assert speed["error"] == pytest.approx(-0.07) and speed["measured_text"].endswith("tokens/s")
    assert v["labels"] == ["chosen"] and v["speed_error"][0] == pytest.approx(-0.07)
    tuning.validation[0].error = None  # computed from the numbers when missing
    assert next(r for r in data.validation_data(tuning)["rows"]
                if r["metric"] == "decode_tokens_per_s")["error"] == pytest.approx(-0.07)
    tuning.validation[0].measured = None
    assert data.validation_data(tuning) is None


def test_config_data_and_run_command(loaded, tmp_path):
    c = data.config_data(loaded["tuning"], loaded["config_text"], loaded["dir"])
    assert c["run_command"] == loaded["tuning"].run_command
    assert c["run_command"].startswith("ef-run --config ") and c["yaml"] == loaded["config_text"]
    assert c["config"]["model"]["name"] == "tiny-qwen3-moe"
    t = loaded["tuning"].model_copy(update={"run_command": ""})  # not recorded
    c = data.config_data(t, None, tmp_path)
    assert c["run_command"] == f"ef-run --config {tmp_path.resolve() / 'config.yaml'}"
    assert c["config"] is None and c["description"] == []
    assert data.config_data(t, "a: [unclosed", tmp_path)["config"] is None  # bad YAML: text only
    cfg = data.config_data(loaded["tuning"], loaded["config_text"])["config"]
    cap = loaded["tuning"].chosen.params["cache.capacity_experts"]
    assert data.slots_per_layer(cfg) == pytest.approx(cap / 4)
    assert data.slots_per_layer(None) is None


def test_load_study_never_creates_a_storage(loaded, tmp_path):
    t = loaded["tuning"].model_copy(deep=True)
    missing = tmp_path / "elsewhere" / "gone.sqlite3"
    t.study.storage = f"sqlite:///{missing}"
    study, note = data.load_study(t, tmp_path)
    assert study is None and "does not exist" in note
    assert not missing.exists() and not missing.parent.exists()
    # A moved folder: the storage file sits beside tuning.json under the same name.
    (tmp_path / "gone.sqlite3").write_bytes((loaded["dir"] / "study.sqlite3").read_bytes())
    study, note = data.load_study(t, tmp_path)
    assert study is not None and "moved" in note
    t.study.name = "no-such-study"
    study, note = data.load_study(t, tmp_path)
    assert study is None and "could not be read" in note


def test_data_functions_never_import_plotly(output_folder):
    """Every data function runs in a fresh interpreter without plotly being imported."""
    import subprocess

    code = f"""
import sys
from reports import data
from reports.build import load_output
run = load_output({str(output_folder)!r})
t, p, trials = run.tuning, run.profile, run.trials
cfg = data.config_data(t, run.config_text)["config"]
out = [data.summary_data(t), data.verdict_data(t), data.environment_data(t, p),
       data.activation_heatmap_data(p), data.frequency_distribution_data(p, data.slots_per_layer(cfg)),
       data.transfer_data(p, 12288), data.kernel_data(p), data.predictor_data(p),
       data.history_data(t, trials, run.study), data.importance_data(t, run.study),
       data.pareto_data(t, trials, run.study), data.parallel_coordinates_data(t, trials),
       data.memory_data(t), data.quality_data(t), data.validation_data(t)]
assert all(o for o in out)
print(sorted(m for m in sys.modules if m.split(".")[0] == "plotly"))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
