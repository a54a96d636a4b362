"""The report in a real browser: Debian's headless Chromium opens a report made from a tiny-*
tuning run, with no JavaScript errors, no network request, every figure drawn as SVG with data,
and working copy buttons; a full-page screenshot is saved (its path is printed).

The report comes from `ef-tune --model tiny-qwen2-moe ...` when tuner.pipeline exists; until then
it comes from the hand-built fixture folder (conftest.py) and the test prints that it did.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reports.build import build_report

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY_RUN = ["--model", "tiny-qwen2-moe", "--budget", "1GB", "--trials", "5"]
#: Figures every report of a tiny run has (validation and Pareto depend on the run).
CORE_FIGURES = {"activation_heatmap", "frequency_distribution", "transfer", "kernel", "history",
                "memory"}

# Per plot container: its SVG and the drawn data (trace paths/points, or a heatmap's image).
PLOT_STATS_JS = """() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
  id: d.id,
  svg: d.querySelectorAll('svg.main-svg').length,
  marks: Array.from(d.querySelectorAll('.cartesianlayer .trace path'))
           .filter(p => (p.getAttribute('d') || '').length > 5).length,
  images: Array.from(d.querySelectorAll('.heatmaplayer image'))
           .filter(i => (i.getAttribute('href') || i.getAttribute('xlink:href') || '')
                          .startsWith('data:image/') ).length,
  webgl: d.querySelectorAll('canvas').length,
}))"""


def _tiny_report(tmp_path: Path, request) -> tuple[Path, str]:
    """A report generated from a real `ef-tune` run of a tiny model (CPU, a few seconds)."""
    out = tmp_path / "tiny-run"
    cmd = [sys.executable, "-c", "import sys; from tuner.cli import tune_main; "
           "sys.exit(tune_main(sys.argv[1:]))", *TINY_RUN, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"ef-tune {' '.join(TINY_RUN)} failed:\n{done.stderr[-3000:]}"
    source = f"ef-tune {' '.join(TINY_RUN)}"
    return build_report(out, tmp_path / "report.html"), source


def _click_copy(page, target: str) -> None:
    button = page.locator(f'button.copy[data-target="{target}"]')
    label = button.text_content()
    button.click()
    page.wait_for_function(f"() => document.querySelector('button.copy[data-target=\"{target}\"]')"
                           f".textContent !== {label!r}", timeout=5_000)
    assert button.text_content() == "Copied", f"copy {target}: {button.text_content()!r}"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (.ci/run does) to run browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test "
                                                                 "extra) to run browser tests")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_report_renders_in_headless_chromium(browser, tmp_path, request):
    report, source = _tiny_report(tmp_path, request)
    print(f"\nreport made from: {source}\nreport: {report}")

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    errors: list[str] = []
    remote: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.on("request", lambda r: remote.append(r.url)
            if not r.url.startswith(("file:", "data:", "blob:", "about:")) else None)
    page.goto(report.as_uri(), wait_until="load")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.plotly-graph-div'))"
        ".every(d => d.querySelector('svg.main-svg'))", timeout=30_000)
    page.wait_for_timeout(300)  # let responsive relayouts settle before the screenshot

    stats = page.evaluate(PLOT_STATS_JS)
    figure_count = page.locator("figure.ef-figure").count()
    assert len(stats) == figure_count > 0
    drawn = {s["id"].removeprefix("plot-") for s in stats}
    assert CORE_FIGURES <= drawn, f"missing figures: {CORE_FIGURES - drawn}"
    for s in stats:
        assert s["svg"] >= 1, f"{s['id']}: no SVG"
        assert s["marks"] + s["images"] > 0, f"{s['id']}: an SVG without data"
        assert s["webgl"] == 0, f"{s['id']}: uses WebGL (fails on machines without a GPU)"

    shot = tmp_path / "report.png"
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    # The copy buttons put the exact text on the clipboard: with navigator.clipboard, and with
    # the textarea fallback on a page without it.
    yaml_text = page.locator("#config-yaml").text_content()
    command = page.locator("#run-command").text_content()
    assert "capacity_experts" in yaml_text and command.startswith("ef-run --config ")
    _click_copy(page, "config-yaml")
    assert page.evaluate("navigator.clipboard.readText()") == yaml_text
    bare = context.new_page()
    bare.add_init_script("Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    bare.on("pageerror", lambda e: errors.append(f"pageerror (no clipboard API): {e}"))
    bare.goto(report.as_uri(), wait_until="load")
    _click_copy(bare, "run-command")
    assert page.evaluate("navigator.clipboard.readText()") == command

    context.close()
    assert not errors, "\n".join(errors)
    assert not remote, f"the report reached for the network: {remote[:5]}"
    assert shot.stat().st_size > 50_000
