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
#: The README's run: real dims (a 16.5 MiB expert), bundled H200 timing.
README_RUN = ["--model", "qwen2-moe", "--budget", "24GB", "--trials", "8"]
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


# Per plot and axis: the axis type, its drawn range and the extent of the plotted points (scatter
# traces; a log axis' range is in log10 units). An annotation or shape placed in the wrong units
# stretches an axis far past its data (the transfer plot once ran to 10^29 MiB).
AXIS_FIT_JS = """() => Array.from(document.querySelectorAll('.plotly-graph-div')).flatMap(gd => {
  const L = gd._fullLayout, ext = {};
  for (const t of gd._fullData) {
    if (t.type !== 'scatter' || t.visible !== true) continue;
    for (const [c, ax] of [['x', t.xaxis], ['y', t.yaxis]]) {
      const vals = (t[c] || []).filter(v => typeof v === 'number' && isFinite(v));
      if (!vals.length) continue;
      const e = ext[ax] = ext[ax] || {min: Infinity, max: -Infinity};
      e.min = Math.min(e.min, ...vals); e.max = Math.max(e.max, ...vals);
    }
  }
  return Object.entries(ext).map(([ax, e]) => {
    const a = L[ax.replace(/^x/, 'xaxis').replace(/^y/, 'yaxis')];
    return {plot: gd.id, axis: ax, type: a.type, range: a.range, visible: a.visible, min: e.min, max: e.max};
  });
})"""


def axis_misfits(axes: list[dict]) -> list[str]:
    """Axes whose drawn range runs far outside their data: on a log axis more than one decade
    past either end; on a linear axis wider than ten times the data's extent."""
    import math

    bad = []
    for a in axes:
        if not a["visible"] or a["range"] is None:
            continue
        lo, hi = (float(v) for v in a["range"])
        if a["type"] == "log":
            if a["min"] <= 0:
                continue
            dlo, dhi = math.log10(a["min"]), math.log10(a["max"])
            if lo < dlo - 1 or hi > dhi + 1:
                bad.append(f"{a['plot']} {a['axis']} (log): range 10^{lo:.1f}..10^{hi:.1f}, "
                           f"data {a['min']:.3g}..{a['max']:.3g}")
        elif a["type"] == "linear":
            span = max(a["max"] - a["min"], abs(a["max"]), abs(a["min"]), 1e-12)
            if hi - lo > 10 * span:
                bad.append(f"{a['plot']} {a['axis']}: range {lo:.3g}..{hi:.3g}, data {a['min']:.3g}..{a['max']:.3g}")
    return bad


def test_axis_misfits_catches_a_range_far_outside_the_data():
    """The check itself (no browser): the transfer plot's old x range, and a fitted one."""
    old = {"plot": "plot-transfer", "axis": "x", "type": "log", "range": [-1, 29], "visible": True,
           "min": 0.01, "max": 1024.0}
    assert axis_misfits([old]) and not axis_misfits([{**old, "range": [-2.2, 3.2]}])


def _tiny_report(tmp_path: Path, request, run: list[str] = TINY_RUN) -> tuple[Path, str]:
    """A report generated from a real `ef-tune` run (a tiny model: CPU, a few seconds)."""
    out = tmp_path / "tiny-run"
    cmd = [sys.executable, "-c", "import sys; from efcli.tune import main as tune_main; "
           "sys.exit(tune_main(sys.argv[1:]))", *run, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"ef-tune {' '.join(run)} failed:\n{done.stderr[-3000:]}"
    source = f"ef-tune {' '.join(run)}"
    return build_report(out, tmp_path / "report.html"), source


def test_every_axis_fits_its_data(browser, tmp_path, request):
    """The README's run in Chromium: every drawn axis spans its data (the transfer plot's x axis
    once ran to 10^29 MiB: the expert marker's label was placed in log units)."""
    report, source = _tiny_report(tmp_path, request, README_RUN)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(report.as_uri(), wait_until="load")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.plotly-graph-div'))"
        ".every(d => d.querySelector('svg.main-svg'))", timeout=30_000)
    axes = page.evaluate(AXIS_FIT_JS)
    page.close()
    assert {a["plot"] for a in axes} >= {"plot-transfer", "plot-kernel", "plot-history"}, source
    misfits = axis_misfits(axes)
    assert not misfits, f"{source}: axes far outside their data:\n" + "\n".join(misfits)


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

    axes = page.evaluate(AXIS_FIT_JS)
    assert any(a["plot"] == "plot-transfer" and a["type"] == "log" for a in axes), axes
    misfits = axis_misfits(axes)
    assert not misfits, "axes far outside their data:\n" + "\n".join(misfits)

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
