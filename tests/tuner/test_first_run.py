"""What a new user hits first (issue 11), through the real entry points (`main(argv)` of each
console script, in-process): output folders are never lost, every argument is checked before any
work and a failed run leaves `--out` as found (the shared `left_as_found` fixture), user errors
have their own exit code and one line, the printed run command runs, ef-run checks host memory,
and the CLI habits (--version, --help) hold.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from expertflow.errors import EXIT_BUDGET, EXIT_DATA, EXIT_DEVICE, EXIT_STORAGE, EXIT_USAGE
from tuner.records import TuningRecord

MODEL = "tiny-qwen2-moe"


def _err_line(capsys, prog: str, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "internal error" not in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def prof_dir(tmp_path_factory):
    import _tuner_fixtures as fx

    return fx.make_profile(MODEL).save(tmp_path_factory.mktemp("prof") / "profile")


def _profile(out, *extra):
    from efcli.profile import main as profile_main

    return profile_main(["--model", MODEL, "--out", str(out), "--device", "cpu", "--quick", *map(str, extra)])


def _tune(out, *extra, budget="2GB"):
    from efcli.tune import main as tune_main

    return tune_main(["--model", MODEL, "--budget", budget, "--out", str(out), "--trials", "2", "--no-report",
                      "--no-validate", *map(str, extra)])


# ---- data safety: never delete what the tool did not write ------------------------------------------
def test_ef_profile_refuses_a_folder_of_other_files_and_force_keeps_them(tmp_path, capsys, left_as_found):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    left_as_found.watch(out)
    assert _profile(out) == EXIT_USAGE
    _err_line(capsys, "ef-profile", str(out), "notes.txt", "--force")
    left_as_found.check()
    assert _profile(out, "--force") == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "profile.yaml").is_file()
    assert not [p.name for p in tmp_path.rglob(".*")], "temporaries left behind"


def test_ef_profile_replaces_its_own_profile_and_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "prof"
    assert _profile(out) == 0
    first = (out / "profile.yaml").read_text()
    assert _profile(out, "--seed", "1") == 0
    assert (out / "profile.yaml").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof"], "a .NAME.old-PID or temporary is left"


def test_out_that_is_a_file_is_refused_and_kept(tmp_path, capsys, left_as_found):
    f = tmp_path / "results"
    f.write_text("precious")
    left_as_found.watch(f)
    assert _profile(f) == EXIT_USAGE
    _err_line(capsys, "ef-profile", str(f), "is a file")
    assert _tune(f) == EXIT_USAGE
    _err_line(capsys, "ef-tune", str(f), "is a file")
    left_as_found.check()


def test_ef_tune_refuses_a_foreign_out_folder(tmp_path, prof_dir, capsys, left_as_found):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "profile").mkdir()  # a name of ours, but a folder of the user's: kept with --force too
    (out / "profile" / "draft.md").write_text("mine too")
    left_as_found.watch(out)
    assert _tune(out, "--profile", prof_dir) == EXIT_USAGE
    _err_line(capsys, "ef-tune", "notes.txt", "--force")
    left_as_found.check()
    assert _tune(out, "--profile", prof_dir, "--force") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.yaml").is_file()
    assert (out / "profile" / "draft.md").read_text() == "mine too"


def test_out_that_cannot_be_written(tmp_path, capsys):
    target = Path("/sys/ef-out-test")  # sysfs: no new entries, even for root
    try:
        target.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys: nothing to test here
        target.rmdir()
        pytest.skip("/sys is writable here")
    assert _tune(target) == EXIT_USAGE
    _err_line(capsys, "ef-tune", str(target), "cannot be written", "writable")
    assert _profile(target) == EXIT_USAGE
    _err_line(capsys, "ef-profile", str(target), "cannot be written")


# ---- every argument is checked before any work; a failed run leaves --out as found ------------------
@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "own-out"])
@pytest.mark.parametrize("case", ["negative-quality-cap", "export-only-no-study", "unknown-hardware",
                                  "hardware-without-bundle", "corrupt-profile", "negative-timeout",
                                  "negative-budget"])
def test_bad_argument_leaves_out_as_found(case, existing, tmp_path, prof_dir, capsys, left_as_found):
    import shutil

    out = tmp_path / "out"
    if existing:  # an ef-tune folder from an earlier run: its files must survive a failed run
        out.mkdir()
        (out / "tuning.json").write_text("{}")
    bad_prof = tmp_path / "bad-prof"
    shutil.copytree(prof_dir, bad_prof)
    (bad_prof / "profile.yaml").write_text("version: [1\n")
    extra, budget, code, words = {
        "negative-quality-cap": (["--max-quality-loss", "-0.1"], "2GB", EXIT_USAGE, ["--max-quality-loss", "-0.1"]),
        "export-only-no-study": (["--export-only"], "2GB", EXIT_STORAGE, ["--export-only", "no study"]),
        "unknown-hardware": (["--hardware", "h100"], "2GB", EXIT_USAGE, ["'h100'", "h200"]),
        "hardware-without-bundle": (["--hardware", "h200"], "2GB", EXIT_DATA, [MODEL]),
        "corrupt-profile": (["--profile", bad_prof], "2GB", EXIT_DATA, [str(bad_prof / "profile.yaml")]),
        "negative-timeout": (["--timeout", "-1"], "2GB", EXIT_USAGE, ["--timeout", "-1"]),
        "negative-budget": ([], "-3GB", EXIT_BUDGET, ["'-3GB'", "negative"]),
    }[case]
    left_as_found.watch(out, bad_prof)
    assert _tune(out, *extra, budget=budget) == code
    _err_line(capsys, "ef-tune", *words)
    left_as_found.check()


def test_a_failure_after_the_checks_leaves_out_as_found(tmp_path, prof_dir, capsys, left_as_found):
    """A quality cap no trial meets fails after the study ran: the folder is put back."""
    out = tmp_path / "out"
    space = tmp_path / "space.yaml"  # only dropping experts: every trial is over a zero cap
    space.write_text("version: 1\nparams:\n  adaptive_k.threshold: {type: float, low: 0.5, high: 0.6, step: 0.1}\n")
    left_as_found.watch(out)
    rc = _tune(out, "--profile", prof_dir, "--search-space", space, "--max-quality-loss", "0")
    assert rc != 0
    capsys.readouterr()
    left_as_found.check()


# ---- ordinary user errors: their own line and code ------------------------------------------------------
def test_ef_run_unknown_device_is_a_usage_error(tmp_path, tiny_config, capsys):
    from efcli.run import main as run_main
    from expertflow.config import save_config

    cfg = save_config(tiny_config(MODEL), tmp_path / "config.yaml")
    assert run_main(["--config", str(cfg), "--device", "tpu"]) == EXIT_USAGE
    _err_line(capsys, "ef-run", "'tpu'", "cpu, cuda or cuda:N")


def test_budget_larger_than_the_gpu_warns_with_the_number(tmp_path, prof_dir, capsys):
    import yaml

    gpu = yaml.safe_load((prof_dir / "profile.yaml").read_text())["hardware"]
    from expertflow.budget import format_bytes

    assert _tune(tmp_path / "out", "--profile", prof_dir, budget="1000TB") == 0
    out = capsys.readouterr().out
    warn = [ln for ln in out.splitlines() if "1000TB" in ln and "more than" in ln]
    assert warn and format_bytes(gpu["gpu_memory_bytes"]) in warn[0] and gpu["gpu_name"] in warn[0], out


# ---- the run command the tool prints runs --------------------------------------------------------------
def test_the_printed_run_command_runs_on_the_tuning_machine(tmp_path, capsys):
    import torch

    from efcli.run import main as run_main
    from efcli.tune import main as tune_main

    out = tmp_path / "out"
    assert tune_main(["--model", MODEL, "--budget", "1GB", "--trials", "3", "--out", str(out), "--no-report"]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("run it: "))
    argv = shlex.split(line.removeprefix("run it: "))
    assert argv[0] == "ef-run"
    assert TuningRecord.load(out).run_command == line.removeprefix("run it: ")
    assert run_main(argv[1:] + ["--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    if not torch.cuda.is_available():
        # the config itself is for a GPU; run without --device it says so and how to override
        capsys.readouterr()
        assert run_main(["--config", str(out / "config.yaml")]) == EXIT_DEVICE
        _err_line(capsys, "ef-run", "no CUDA GPU", "--device cpu")


# ---- ef-run checks host memory before building, and shows progress ------------------------------------
def _config_for(name, tmp_path, budget="24GB"):
    from expertflow.budget import plan_memory
    from expertflow.config import default_config, save_config
    from expertflow.registry import resolve_model

    spec = resolve_model(name)
    return save_config(default_config(spec, plan_memory(spec, budget)), tmp_path / f"{name}.yaml"), spec


def test_ef_run_refuses_a_model_larger_than_host_memory(tmp_path, capsys):
    from expertflow.budget import format_bytes, host_memory_available_bytes
    from efcli.run import main as run_main

    cfg, spec = _config_for("qwen2-57b-a14b", tmp_path, "40GB")
    need = spec.param_counts()["total"] * 2  # bfloat16
    avail = host_memory_available_bytes()
    if avail is None or need <= avail:
        pytest.skip(f"this machine has {avail} bytes free: {spec.name} fits")
    assert run_main(["--config", str(cfg), "--device", "cpu"]) == EXIT_BUDGET
    _err_line(capsys, "ef-run", spec.name, format_bytes(need), "available")


def test_ef_run_refuses_before_building_with_the_numbers(tmp_path, tiny_config, capsys, monkeypatch):
    """A tiny model on a machine with 1 MB free (the probe replaced): refused before building;
    and a GPU run counts the experts it keeps in host memory as pinned."""
    import expertflow.budget as budget
    from efcli.run import main as run_main
    from expertflow.config import save_config

    cfg = save_config(tiny_config(MODEL), tmp_path / "config.yaml")
    monkeypatch.setattr(budget, "host_memory_available_bytes", lambda: 1_000_000)
    built = []
    import expertflow.runtime.loading as loading

    monkeypatch.setattr(loading, "build_model", lambda *a, **k: built.append(1))
    assert run_main(["--config", str(cfg), "--device", "cpu"]) == EXIT_BUDGET
    _err_line(capsys, "ef-run", MODEL, "host memory", "976.56 KiB available")
    assert not built, "the model was built before the memory check"
    need = budget.host_memory_need(__import__("expertflow").resolve_model("qwen2-moe"), dtype="bfloat16",
                                   device="cuda", pin_memory=True)
    assert need.pinned_bytes == need.total_bytes > 0  # a GPU run pins the experts it keeps on the host


def test_ef_run_shows_progress_while_the_model_builds(tmp_path, tiny_config, capsys):
    from efcli.run import main as run_main
    from expertflow.config import save_config

    cfg = save_config(tiny_config(MODEL), tmp_path / "config.yaml")
    assert run_main(["--config", str(cfg), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert f"building {MODEL}" in err and "model ready in" in err, err


# ---- the Python API on a model the user built --------------------------------------------------------
TINY = ["tiny-qwen2-moe", "tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2"]


@pytest.mark.parametrize("name", TINY)
def test_default_config_for_a_model_you_built(name):
    import torch
    from transformers import AutoModelForCausalLM

    import expertflow
    from expertflow.registry import known_models, resolve_model

    assert set(TINY) == {n for n in known_models() if resolve_model(n).tiny}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(resolve_model(name).hf_config()).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
    config = expertflow.default_config(model, budget="1GB")
    assert config.runtime.device == "cpu" and config.runtime.dtype == "float32"
    with expertflow.offload(model, config) as handle, torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert handle.stats["total"]["hits"] + handle.stats["total"]["misses"] > 0
    assert torch.equal(got, want)


def test_default_config_refuses_a_dense_model_in_one_line():
    from transformers import LlamaConfig

    import expertflow

    with pytest.raises(expertflow.ModelError, match="not a supported MoE"):
        expertflow.default_config(LlamaConfig(hidden_size=64, num_hidden_layers=1), budget="1GB")


# ---- CLI habits ---------------------------------------------------------------------------------------
def _parsers():
    from efcli.run import build_run_parser
    from efcli.report import build_report_parser
    from efcli.profile import build_profile_parser
    from efcli.tune import build_tune_parser

    return {"ef-tune": build_tune_parser(), "ef-profile": build_profile_parser(),
            "ef-run": build_run_parser(), "ef-report": build_report_parser()}


MAINS = {"ef-tune": "efcli.tune:main", "ef-profile": "efcli.profile:main",
         "ef-run": "efcli.run:main", "ef-report": "efcli.report:main"}


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_version_and_help(prog, capsys):
    import importlib
    from importlib.metadata import version

    from expertflow.registry import known_models

    module, func = MAINS[prog].split(":")
    main = getattr(importlib.import_module(module), func)
    assert main(["--version"]) == 0
    assert version("expertflow") in capsys.readouterr().out
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in _parsers()[prog]._actions:
        assert action.help and action.help.strip(), f"{prog}: {action.option_strings or action.dest} has no help"
    examples = text.split("examples:\n")[1].split("\n\n")[0].splitlines()
    assert len(examples) >= 2 and all(e.strip().startswith(prog) for e in examples), examples
    if prog == "ef-report":
        return
    for alias in known_models():
        assert alias in text, f"{prog} --help does not list {alias}"
    if prog == "ef-tune":
        from tuner.profiler.bundled import bundled_hardware_names

        assert bundled_hardware_names() and all(h in text for h in bundled_hardware_names())


def test_ef_report_replaces_only_a_report(tmp_path, prof_dir, capsys, left_as_found):
    from efcli.report import main as report_main

    out = tmp_path / "out"
    assert _tune(out, "--profile", prof_dir) == 0
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my page</html>")
    (tmp_path / "a-folder").mkdir()
    left_as_found.watch(mine, tmp_path / "a-folder")
    assert report_main([str(out), "--out", str(mine)]) == EXIT_USAGE
    _err_line(capsys, "ef-report", str(mine), "--force")
    assert report_main([str(out), "--out", str(tmp_path / "a-folder")]) == EXIT_USAGE
    _err_line(capsys, "ef-report", "is a folder")
    left_as_found.check()
    again = tmp_path / "report.html"
    assert report_main([str(out), "--out", str(again)]) == 0
    assert report_main([str(out), "--out", str(again)]) == 0  # its own report: replaced
    assert report_main([str(out), "--out", str(mine), "--force"]) == 0
    assert "ExpertFlow tuning report" in mine.read_text()
