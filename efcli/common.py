"""What the four commands share: parsers, argument types, the run loop and exit codes.

Each command (efcli/tune.py, profile.py, run.py, report.py) builds its parser with argparse
only, so `--help` imports neither torch nor optuna nor plotly, and hands `run_handler` a small
handler that calls the library and prints. ExpertFlowError subclasses become one
`prog: error: ...` line and their documented exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import re
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence

from expertflow.config import tool_version
from expertflow.errors import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ExpertFlowError,
)
from expertflow.registry import known_models

#: OS errors that are the user's to fix (a path they gave), not a bug.
USER_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                  errno.EISDIR, errno.ENOENT, errno.EEXIST}


def exit_codes_epilog() -> str:
    rows = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    return f"exit codes:\n{rows}"


def _wrapped(title: str, items: Sequence[str]) -> str:
    body = textwrap.fill(", ".join(items), width=88, initial_indent="  ", subsequent_indent="  ")
    return f"{title}:\n{body}"


def models_epilog() -> str:
    """The registry aliases (torch-free) for --help."""
    return _wrapped("model aliases (--model; or a local Hugging Face checkpoint directory)", known_models())


def examples_epilog(examples: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other error (exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def new_parser(prog: str, description: str, *, extra_epilog: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A command's parser: --debug and --version on every command; the epilog lists
    `extra_epilog` sections (examples, aliases, ...) and then the exit codes."""
    epilog = "\n\n".join([*extra_epilog, exit_codes_epilog()])
    p = _Parser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"%(prog)s (ExpertFlow) {tool_version()}",
                   help="print the ExpertFlow version and exit")
    return p


# ---- argument types: a value out of range is a usage error at parse time (exit 2) ------------
def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None


def positive_int(text: str) -> int:
    v = _number(int, text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(int, text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


def positive_float(text: str) -> float:
    v = _number(float, text)
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return v


def nonnegative_float(text: str) -> float:
    v = _number(float, text)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return v


_NEGATIVE_VALUE = re.compile(r"^-[0-9.]")


def join_negative_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`--budget -3GB` -> `--budget=-3GB`: argparse takes a value that starts with '-' (and is not
    a plain number) for an option, and says 'expected one argument'; joined, the value reaches
    its check and is refused with its own message."""
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings
                   and not isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                          argparse._VersionAction, argparse._HelpAction))
                   for s in a.option_strings}
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in takes_value and i + 1 < len(args) and _NEGATIVE_VALUE.match(args[i + 1]):
            out.append(f"{a}={args[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def run_handler(prog: str, parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None) -> int:
    """Parse argv, call `handler` with the namespace, map errors to exit codes.

    Returns the exit code (argparse's own exits too: 0 for --help/--version, 2 for bad usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(join_negative_values(parser, [str(a) for a in argv]))
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else 0
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"{prog}: %(levelname)s: %(message)s")
    try:
        return int(handler(args) or 0)
    except ExpertFlowError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed work is saved (continue with --resume where the "
              "command has it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.debug or exc.errno not in USER_OS_ERRNOS:
            if args.debug:
                raise
            return _internal(prog, exc)
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"{prog}: error: cannot use{where}: {exc.strerror or exc}; check the path and its "
              "permissions (or choose another one)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            raise
        return _internal(prog, exc)


def _internal(prog: str, exc: BaseException) -> int:
    print(f"{prog}: internal error: {exc.__class__.__name__}: {exc} (re-run with --debug for "
          "the traceback and report it)", file=sys.stderr)
    return EXIT_INTERNAL


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a batch system's preemption) stops like Ctrl-C: the running trial finishes,
    no file is left half-written, and --resume continues (exit 130)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
