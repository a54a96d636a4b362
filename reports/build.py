"""Build report.html from an ef-tune output folder: one self-contained, offline HTML file.

    build_report(out_dir, report_path=None) -> Path

loads the folder with reports.folder (tuning.json, required, as a `tuner.records.TuningRecord`;
profile/, the Optuna study from the record's storage URL, and config.yaml), renders each section
with reports.sections (numbers from reports.data, drawing by reports.figures), and writes the
page atomically. plotly.js is inlined once from the installed plotly package: no CDN, no
network. A missing optional part (no validation, a single-objective study, no quality table, an
unreachable study storage, a missing profile) becomes a plain sentence.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import string
from pathlib import Path

from expertflow.config import describe_hardware
from expertflow.errors import OutputError
from expertflow.fsutil import atomic_write_text

from . import data, sections
from .folder import OutputFolder, load_output  # noqa: F401 - load_output: the loading, re-exported
from .sections import asset, esc

log = logging.getLogger(__name__)


# ---- page -------------------------------------------------------------------------------------
def render_report(run: OutputFolder) -> str:
    """The whole page as one string."""
    import plotly.offline

    t = run.tuning
    cfg = data.config_data(t, run.config_text, run.path)["config"] or {}
    env = data.environment_data(t, run.profile)
    banner = ""
    if env["synthetic"]:
        note = env["notices"][0]
        title = "" if "synthetic" in note.lower()[:40] else "<b>Routing is synthetic.</b> "
        banner = f'<div class="banner synthetic" id="synthetic-banner">&#9888; {title}{esc(note)}</div>'

    body = [sections.summary(run, cfg), sections.environment(run), sections.profile(run, cfg),
            sections.study(run), sections.validation(run), sections.config(run)]
    nav = "".join(f'<a href="#{i}">{esc(n)}</a>' for i, n in (
        ("summary", "Summary"), ("environment", "Environment"), ("profile", "Profile"),
        ("study", "Study"), ("validation", "Validation"), ("config", "Config")))
    model, budget = t.model.name, t.budget.text
    generated = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    footer = (f"ExpertFlow {esc(t.tool_version)} · tuned {esc(t.created_at)} · "
              f"report generated {esc(generated)} from <code>{esc(run.path.resolve())}</code>")
    return string.Template(asset("report.html.tmpl")).substitute(
        title=esc(f"ExpertFlow tuning report: {model} under {budget}"),
        subtitle=esc(f"{describe_hardware(t.hardware.model_dump())} · "
                     f"routing {t.routing.kind} · "
                     f"{(t.validation_note or 'not validated')}"),
        tool_version=esc(t.tool_version), css=asset("report.css"),
        plotlyjs=plotly.offline.get_plotlyjs(), js=asset("report.js"), nav=nav, banner=banner,
        sections="\n".join(body), footer=footer)


def build_report(out_dir: str | os.PathLike, report_path: str | os.PathLike | None = None) -> Path:
    """Write `report_path` (default `out_dir/report.html`) atomically; returns its path.

    Raises DataError (one line) when `out_dir` is not a readable ef-tune output folder.
    """
    run = load_output(out_dir)
    target = Path(report_path) if report_path is not None else Path(out_dir) / "report.html"
    page = render_report(run)
    atomic_write_text(target, page)
    log.info("report written: %s (%.1f MB)", target, len(page) / 1e6)
    return target


REPORT_MARK = "ExpertFlow tuning report"


def check_report_target(path: str | os.PathLike, *, force: bool = False) -> None:
    """OutputError unless `path` is new or an ExpertFlow report (what ef-report may replace):
    a folder, or a file of other content, is refused (the latter unless `force`)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"--out {str(target)!r} is a folder; pass the report's file path, e.g. "
                          f"{str(target / 'report.html')!r}")
    if target.is_file() and not force:
        try:
            head = target.read_text(encoding="utf-8", errors="replace")[:4000]
        except OSError:
            head = ""
        if REPORT_MARK not in head:
            raise OutputError(f"--out {str(target)!r} is a file ef-report did not write; pass a new path, "
                              "or --force to replace it")
