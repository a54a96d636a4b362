"""The README stays true: CI runs its test command, and its tables match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

README = (REPO_ROOT / "README.md").read_text()


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command():
    lines = [ln.strip() for ln in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    command = [ln for ln in lines if ln and not ln.startswith("#")][-1]
    assert command in _readme_commands()
    assert "pytest" in command and '-m "not gpu"' in command
    assert "pip install torch==2.13.0" in command  # the CPU wheel first, before the project


def test_readme_quickstart_runs_ef_tune():
    assert any(cmd.endswith("ef-tune --model qwen2-moe --budget 24GB") and "pip install -e ." in cmd
               for cmd in _readme_commands())


def _parsers():
    from efcli.run import build_run_parser
    from efcli.report import build_report_parser
    from efcli.profile import build_profile_parser
    from efcli.tune import build_tune_parser

    return {"ef-tune": build_tune_parser(), "ef-profile": build_profile_parser(),
            "ef-run": build_run_parser(), "ef-report": build_report_parser()}


@pytest.mark.parametrize("prog", ["ef-tune", "ef-profile", "ef-run", "ef-report"])
def test_cli_table_lists_every_flag(prog):
    row = next((ln for ln in README.splitlines() if ln.startswith(f"| `{prog}` |")), None)
    assert row is not None, f"no CLI table row for {prog}"
    for action in _parsers()[prog]._actions:
        if action.dest in ("help", "debug", "version"):  # every command's: said once above the table
            continue
        names = action.option_strings or [action.dest.upper()]
        assert any(f"`{n}" in row for n in names), f"{prog}: {names} missing from the README"


def test_common_flags_are_documented_once():
    section = README.split("## Command line")[1].split("## ")[0]
    assert "`--version`" in section and "`--debug`" in section


def test_exit_code_table_matches_errors_module():
    from expertflow.errors import EXIT_CODES

    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in README
    rows = re.findall(r"^\| (\d+) \| ", README, flags=re.MULTILINE)
    assert sorted(map(int, rows)) == sorted(EXIT_CODES)


def test_config_table_covers_every_top_level_key():
    from expertflow.config import RuntimeConfig

    documented = set(re.findall(r"^\| `([a-z_]+)` \| ", README.split("## The config file")[1]
                                .split("## ")[0], flags=re.MULTILINE))
    assert documented == set(RuntimeConfig.model_fields)


def test_model_table_covers_every_real_alias():
    from expertflow.registry import known_models, resolve_model

    for name in known_models():
        spec = resolve_model(name)
        assert f"`{name}`" in README
        if not spec.tiny:
            row = next(ln for ln in README.splitlines() if ln.startswith(f"| `{name}` |"))
            assert row.endswith(f"| {spec.num_moe_layers} |"), row
            assert f"{spec.num_experts} x {spec.top_k}" in row, row
