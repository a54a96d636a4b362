"""Errors users can act on, each with a documented process exit code.

Every error message is one line: what was wrong, the value seen, and what to do.
The CLI maps each class to its exit code (README "Exit codes"); library callers catch
`ExpertFlowError` or a subclass.
"""

from __future__ import annotations

# Exit codes (keep in sync with the README table).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an unexpected exception
EXIT_USAGE = 2  # bad command-line usage: syntax, a value out of range, an --out that cannot be used
EXIT_CONFIG = 3  # malformed / invalid config or search-space file
EXIT_MODEL = 4  # unknown model, not a MoE checkpoint, config made for another model
EXIT_BUDGET = 5  # memory budget malformed or too small
EXIT_DATA = 6  # corrupt or truncated trace / profile, empty prompt file
EXIT_DEVICE = 7  # requested device not available (e.g. --device cuda without a GPU)
EXIT_STORAGE = 8  # study storage cannot be reached or used
EXIT_INTERRUPTED = 130  # Ctrl-C; the study can be continued with --resume

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the traceback from --debug)",
    EXIT_USAGE: "bad command-line usage (a malformed or out-of-range argument, or an --out that cannot be used)",
    EXIT_CONFIG: "invalid config or search-space file",
    EXIT_MODEL: "unknown model, not a MoE checkpoint, or a config made for another model",
    EXIT_BUDGET: "memory budget malformed or too small, or not enough host memory for the model",
    EXIT_DATA: "corrupt/truncated trace or profile, or empty prompt file",
    EXIT_DEVICE: "requested device not available",
    EXIT_STORAGE: "study storage unreachable or unusable",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); continue with --resume",
}


class ExpertFlowError(Exception):
    """Base class of all errors a user can fix; `exit_code` is what the CLI returns."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str):
        # One line, always: a multi-line message breaks log parsers and the CLI contract.
        super().__init__(" ".join(str(message).split()))


class UsageError(ExpertFlowError, ValueError):
    """A command-line argument is out of range or contradicts another one."""

    exit_code = EXIT_USAGE


class OutputError(ExpertFlowError, OSError):
    """An output path cannot be used: it is a file, not writable, or a folder of other files."""

    exit_code = EXIT_USAGE


class ConfigError(ExpertFlowError, ValueError):
    """A RuntimeConfig or search-space file is malformed, has an unknown key or a bad value."""

    exit_code = EXIT_CONFIG


class ModelError(ExpertFlowError, ValueError):
    """Unknown model alias, a checkpoint that is not a supported MoE, or a config for another model."""

    exit_code = EXIT_MODEL


class BudgetError(ExpertFlowError, ValueError):
    """A memory budget string is malformed, the budget cannot hold the non-expert part, or this
    machine's host memory cannot hold the model."""

    exit_code = EXIT_BUDGET


class DataError(ExpertFlowError, ValueError):
    """A trace, profile or prompt file is corrupt, truncated, empty or of an unknown version."""

    exit_code = EXIT_DATA


class DeviceError(ExpertFlowError, RuntimeError):
    """The requested device is not available."""

    exit_code = EXIT_DEVICE


class StorageError(ExpertFlowError, RuntimeError):
    """The Optuna storage URL cannot be reached or used."""

    exit_code = EXIT_STORAGE
