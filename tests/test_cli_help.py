"""Each console script's --help exits 0 without importing torch, optuna or plotly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS = {
    "ef-tune": "efcli.tune:main",
    "ef-profile": "efcli.profile:main",
    "ef-run": "efcli.run:main",
    "ef-report": "efcli.report:main",
}
HEAVY = ("torch", "optuna", "plotly")

_PROBE = """
import json, sys
from {module} import {func} as main
try:
    code = main(["--help"])
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help_exits_0_without_heavy_imports(script):
    module, func = ENTRY_POINTS[script].split(":")
    code = _PROBE.format(module=module, func=func, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    *help_lines, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["code"] in (0, None), proc.stdout
    assert result["heavy"] == [], f"{script} --help imported {result['heavy']}"
    help_text = "\n".join(help_lines)
    assert f"usage: {script}" in help_text
    assert "exit codes:" in help_text  # the documented exit codes are in every --help


def test_entry_points_match_pyproject():
    import tomllib

    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == ENTRY_POINTS


def test_usage_error_exits_2():
    from efcli.tune import main as tune_main

    assert tune_main(["--budget", "24GB"]) == 2  # --model is required


def test_exit_code_table_in_help_matches_errors_module():
    from efcli.common import exit_codes_epilog
    from expertflow.errors import EXIT_CODES

    text = exit_codes_epilog()
    for code, meaning in EXIT_CODES.items():
        assert f"{code:>3}  {meaning}" in text
