"""Shared plumbing of the console scripts: thin `main(argv) -> int` wrappers.

Each command's parser is built here with argparse only (so `--help` imports neither torch nor
optuna nor plotly); its handler lives in the library and is imported only when it runs.
ExpertFlowError subclasses become one `prog: error: ...` line and their exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, ExpertFlowError


def exit_codes_epilog() -> str:
    rows = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    return f"exit codes:\n{rows}"


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


def run_handler(prog: str, parser: argparse.ArgumentParser, handler: str,
                argv: Sequence[str] | None) -> int:
    """Parse argv, call `module:function` with the namespace, map errors to exit codes."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"{prog}: %(levelname)s: %(message)s")
    module, func = handler.split(":")
    try:
        fn: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), func)
        return int(fn(args) or 0)
    except ExpertFlowError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed work is saved (continue with --resume where the "
              "command has it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            raise
        print(f"{prog}: internal error: {exc.__class__.__name__}: {exc} (re-run with --debug for "
              "the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
