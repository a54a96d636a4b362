"""The per-study mutex every worker of one study takes to claim a trial or export.

A PostgreSQL session advisory lock keyed by the study name, a `flock` on `<file>.lock` beside a
SQLite study, a thread lock in memory. The server (or the kernel) drops it when its holder dies,
so a killed worker never leaves it held. How the workers use it: tuner/coordination.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path

from .storage import StorageURL, storage_error

log = logging.getLogger(__name__)


# ---- the mutex ------------------------------------------------------------------------------
class StudyLock:
    """A mutex shared by every worker of one study; a context manager. Not re-entrant.

    A thread lock orders the threads of this process (a cross-process lock is held per file or
    connection, which the threads share); subclasses add the cross-process part in `_take` and
    `_give`."""

    def __init__(self) -> None:
        self._local = threading.Lock()

    def acquire(self) -> None:
        self._local.acquire()
        try:
            self._take()
        except BaseException:
            self._local.release()
            raise

    def release(self) -> None:
        try:
            self._give()
        finally:
            self._local.release()

    def _take(self) -> None:
        """Take the cross-process part (the thread lock is held)."""

    def _give(self) -> None:
        """Give the cross-process part back (the thread lock is still held)."""

    def close(self) -> None:
        """Let go of what the lock holds open (a connection, a file)."""

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _ThreadLock(StudyLock):
    """In-process storage: one process, so the thread lock is the whole story."""


class _FileLock(StudyLock):
    """`flock` on a file beside the SQLite study: the kernel releases it when the holder dies."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None

    def _take(self) -> None:
        import fcntl  # POSIX only: imported where a SQLite study is locked

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _give(self) -> None:
        import fcntl  # POSIX only: imported where a SQLite study is locked

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _PgAdvisoryLock(StudyLock):
    """A PostgreSQL session advisory lock on its own connection: held until released, and
    dropped by the server when the connection goes (the worker died)."""

    def __init__(self, url: str, key: int) -> None:
        super().__init__()
        self.url, self.key = url, key
        self._engine = None
        self._conn = None

    def _connection(self):
        if self._conn is None:
            import sqlalchemy  # optional at import time: comes with optuna
            from sqlalchemy.pool import NullPool

            try:  # the same driver as the study's storage (SQLAlchemy's default may not be installed)
                self._engine = sqlalchemy.create_engine(StorageURL(self.url).resolved().text, poolclass=NullPool,
                                                        connect_args={"connect_timeout": 10})
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            except Exception as exc:  # noqa: BLE001 - driver errors come in many types
                raise storage_error(self.url, exc) from None
        return self._conn

    def _take(self) -> None:
        import sqlalchemy  # optional at import time: comes with optuna

        try:
            self._connection().execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        except sqlalchemy.exc.SQLAlchemyError as exc:  # the server went away
            raise storage_error(self.url, exc) from None

    def _give(self) -> None:
        import sqlalchemy  # optional at import time: comes with optuna

        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for the study `name`."""
    digest = hashlib.sha256(f"expertflow-study:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def study_lock(url: str, name: str) -> StudyLock:
    """The mutex of study `name` in the storage at `url` (see tuner/coordination.py)."""
    parsed = StorageURL(url)
    if parsed.is_memory:
        return _ThreadLock()
    if parsed.sqlite_path is not None:
        path = parsed.sqlite_path
        return _FileLock(path.with_name(path.name + ".lock"))
    if parsed.backend_name() == "postgresql":
        return _PgAdvisoryLock(url, lock_key(name))
    log.warning("no cross-process lock for storage %s: with several workers the study may run a "
                "few trials more than --trials, and more than one worker may export", parsed.masked())
    return _ThreadLock()
