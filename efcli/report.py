"""`ef-report DIR`: (re)build report.html from an ef-tune output folder; prints its path."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .common import examples_epilog, new_parser, run_handler


def build_report_parser() -> argparse.ArgumentParser:
    p = new_parser("ef-report", "Write one self-contained, offline report.html for an ef-tune "
                                "output folder (profile, study, config, validation).",
                   extra_epilog=[examples_epilog(["ef-report ef-out/qwen2-moe-24GB",
                                                  "ef-report ef-out/qwen2-moe-24GB --out /tmp/qwen2-report.html"])])
    p.add_argument("dir", help="the ef-tune output folder")
    p.add_argument("--out", default=None, help="report path (default: DIR/report.html); an existing "
                                               "file that is not a report is refused unless --force")
    p.add_argument("--force", action="store_true", help="replace an --out file that is not a report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_handler("ef-report", build_report_parser(), handle, argv)


def handle(args: argparse.Namespace) -> int:
    """An existing --out is replaced only when it is a report (or with --force)."""
    from reports.build import build_report, check_report_target  # noqa: PLC0415 - plotly, only when it runs

    if args.out is not None:
        check_report_target(args.out, force=args.force)
    print(build_report(args.dir, args.out))
    return 0
