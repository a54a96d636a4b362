"""Where a study lives: its URL (a value object), the database drivers, the Optuna storage.

`StorageURL` is the one parser of a storage URL (in-memory, a SQLite file, PostgreSQL, any other
SQLAlchemy URL): every module that asks "is it a SQLite file, which one?" asks it. `make_storage`
is the one place a storage is opened, where heartbeats and the retry of a dead worker's trial are
switched on. The per-study mutex is in tuner/locks.py; Optuna's private API, in tuner/optuna_private.py.

optuna, sqlalchemy and the database drivers are imported inside the functions that need them
(optional at import time: the report and the CLI's parsers import this module without them).
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertflow.errors import ExpertFlowError, StorageError

from .optuna_private import retry_callback

MEMORY_URLS = ("memory", ":memory:")
SQLITE_PREFIX = "sqlite:///"
GRACE_FACTOR = 3  # a trial is declared dead after GRACE_FACTOR missed heartbeats
MAX_RETRY = 3  # a dead worker's trial is re-run at most this many times


@dataclass(frozen=True)
class StorageURL:
    """An Optuna storage URL: `memory` (or `:memory:`) for an in-process study, `sqlite:///PATH`,
    `postgresql://...`, or any SQLAlchemy URL Optuna takes. `str()` gives the URL back."""

    text: str

    def __str__(self) -> str:
        return self.text

    @classmethod
    def for_sqlite_file(cls, path: str | os.PathLike) -> StorageURL:
        """The URL of the SQLite file at `path` (made absolute)."""
        return cls(f"{SQLITE_PREFIX}{os.path.abspath(path)}")

    @property
    def is_memory(self) -> bool:
        return self.text in MEMORY_URLS

    @property
    def sqlite_file(self) -> str | None:
        """The path after `sqlite:///` (possibly empty), or None for another storage."""
        return self.text[len(SQLITE_PREFIX):] if self.text.startswith(SQLITE_PREFIX) else None

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file of a `sqlite:///PATH` URL with a path, else None."""
        return Path(self.sqlite_file) if self.sqlite_file else None

    @property
    def is_postgres(self) -> bool:
        return self.text.startswith(("postgresql", "postgres://"))

    def resolved(self) -> StorageURL:
        """A bare `postgresql://` gets an installed driver (psycopg 3, else psycopg2): SQLAlchemy's
        default differs between its versions and may not be installed."""
        if not self.text.startswith(("postgresql://", "postgres://")):
            return self
        rest = self.text.split("://", 1)[1]
        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return StorageURL(f"postgresql+{driver}://{rest}")
        raise StorageError(f"study storage {self.masked()!r} needs a PostgreSQL driver and none is installed; "
                           "pip install 'expertflow[postgres]' (psycopg2-binary)")

    def masked(self) -> str:
        """The URL with its password replaced by ***, for messages and tuning.json."""
        url = self.text
        if self.is_memory or "://" not in url:
            return url
        try:
            from sqlalchemy.engine import (
                make_url,  # optional: sqlalchemy comes with optuna
            )

            return make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - unparsable: hide anything between :// and @
            head, _, rest = url.partition("://")
            return f"{head}://***@{rest.rpartition('@')[2]}" if "@" in rest else url

    def password(self) -> str | None:
        try:
            from sqlalchemy.engine import (
                make_url,  # optional: sqlalchemy comes with optuna
            )

            return make_url(self.text).password or None
        except Exception:  # noqa: BLE001
            return None

    def backend_name(self) -> str:
        """SQLAlchemy's backend name (`postgresql`, `mysql`, ...)."""
        from sqlalchemy.engine import make_url  # optional: sqlalchemy comes with optuna

        return make_url(self.text).get_backend_name()


def mask_url(url: str) -> str:
    """`url` with its password replaced by ***, for messages and tuning.json."""
    return StorageURL(url).masked()


def resolve_url(url: str) -> str:
    """`url` with a PostgreSQL driver named (see `StorageURL.resolved`)."""
    return StorageURL(url).resolved().text


def sqlite_url(path) -> str:
    return StorageURL.for_sqlite_file(path).text


def make_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for `url`: any SQLAlchemy URL Optuna takes (sqlite:///...,
    postgresql://..., mysql://...), or `memory` for an in-process study (tests, benchmarks).

    `heartbeat_interval` (seconds) switches on RDB heartbeats: a trial whose worker stops
    beating for `grace_period` seconds (default GRACE_FACTOR beats) is failed by the next worker
    and its params are queued again (at most MAX_RETRY times). A bare `postgresql://` URL uses
    whichever driver is installed (psycopg 3, else psycopg2). Raises StorageError (one line,
    password masked) when the storage cannot be reached or used.
    """
    import optuna  # optional at import time (see the module docstring)


    parsed = StorageURL(url)
    if parsed.is_memory:
        return optuna.storages.InMemoryStorage()
    kwargs: dict[str, Any] = {}
    try:
        parsed = parsed.resolved()
        if parsed.sqlite_file:  # its folder must exist: a typo makes no folders
            kwargs["engine_kwargs"] = {"creator": _sqlite_connector(parsed.sqlite_file)}
        elif parsed.text.startswith("postgresql"):
            kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        if heartbeat_interval:
            kwargs["heartbeat_interval"] = int(heartbeat_interval)
            kwargs["grace_period"] = int(grace_period or GRACE_FACTOR * int(heartbeat_interval))
            kwargs["heartbeat_stale_trial_callback"] = retry_callback(MAX_RETRY)
        return _open_rdb(parsed.text, kwargs)
    except ExpertFlowError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors come in many types
        raise storage_error(parsed.text, exc) from None


def study_summaries(url: str) -> list:
    """Optuna's summaries of the studies in the storage at `url` (StorageError if unusable)."""
    import optuna  # optional at import time (see the module docstring)

    return optuna.get_all_study_summaries(make_storage(url), include_best_trial=False)


def _open_rdb(url: str, kwargs: dict[str, Any]):
    import optuna  # optional at import time (see the module docstring)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, **kwargs)
            except Exception as exc:  # noqa: BLE001
                # Two first workers on an empty database may race to create the tables.
                if attempt == 2 or not _is_create_race(exc):
                    raise
                time.sleep(0.2 + 0.3 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _is_create_race(exc: Exception) -> bool:
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text or "unique" in text


def storage_error(url: str, exc: BaseException) -> StorageError:
    """The one-line StorageError for a storage that failed with `exc` (password masked)."""
    parsed = StorageURL(url)
    shown = parsed.masked()
    msg = " ".join(str(exc).split())
    pw = parsed.password()
    if pw:
        msg = msg.replace(pw, "***")
    msg = msg.split(" (Background on this error")[0][:220]
    hint = ("check the URL, that the server runs and accepts this user from here, and that the "
            "database exists (e.g. createdb NAME); or leave --storage out for a SQLite file in --out")
    if isinstance(exc, ImportError):
        hint = "install the database driver (pip install 'expertflow[postgres]' for PostgreSQL)"
    elif url.startswith("sqlite"):
        hint = "check that the folder of the SQLite file exists and is writable"
    return StorageError(f"study storage {shown!r} cannot be used ({exc.__class__.__name__}: {msg}); {hint}")


def _sqlite_connector(path: str):
    """Connections to a local SQLite study: write-ahead log and synchronous=NORMAL (one fsync
    per checkpoint instead of per transaction; a crash loses at most the last trials, never
    the file), and a 60 s wait for the lock when several local workers share it."""

    def connect():
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return connect
