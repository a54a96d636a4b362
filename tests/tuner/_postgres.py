"""A throw-away PostgreSQL server for tests: initdb + pg_ctl in a temporary directory, on
127.0.0.1 and a free port, trust authentication, fsync off; stopped and deleted afterwards.

Debian keeps the server binaries off PATH (/usr/lib/postgresql/<major>/bin); `.ci/run` installs
the `postgresql` package when they are missing. PostgreSQL refuses to run as root, so as root the
server runs as the `postgres` user (made by the Debian package) or `nobody`, through `runuser`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def pg_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if
                  d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return Path(d)
    return None


def skip_reason() -> str | None:
    """Why a PostgreSQL test cannot run here, or None."""
    if pg_bin_dir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                "/usr/lib/postgresql/*/bin; `apt-get install postgresql` (.ci/run does it)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "no PostgreSQL driver: pip install psycopg2-binary (the test extra has it)"
    if os.geteuid() == 0 and _run_as_user() is None:
        return "running as root and neither a 'postgres' nor a 'nobody' user exists to run the server"
    return None


def _run_as_user() -> str | None:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(dbname: str = "efstudy") -> Iterator[str]:
    """Start a server, create `dbname`, yield its URL (postgresql://postgres@127.0.0.1:PORT/dbname)."""
    bindir = pg_bin_dir()
    assert bindir is not None, skip_reason()
    root = Path(tempfile.mkdtemp(prefix="ef-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = _run_as_user()
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    os.chmod(root, 0o700)
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        res = subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.strip()[-800:]} {log[-800:]}")

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-k {root} -h 127.0.0.1 -p {port} -F -c max_connections=100", "start")
        started = True
        import sqlalchemy

        from tuner.storage import resolve_url

        admin = sqlalchemy.create_engine(resolve_url(f"postgresql://postgres@127.0.0.1:{port}/postgres"),
                                         isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{dbname}"'))
        admin.dispose()
        yield f"postgresql://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
