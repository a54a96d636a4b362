"""Atomic file output: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    On an exception (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_versioned(file: Path, parse, *, version: Any, source: str, redo: str,
                   required: tuple[str, ...] = (), errors: tuple[type[BaseException], ...] = ()) -> dict:
    """Read one versioned metadata document (tuning.json, profile.yaml, ...) for the readers of
    ExpertFlow's outputs: `parse(text)` must give a dict whose "version" is `version` and that
    has every key of `required`. Anything else is one DataError line naming `source` (how the
    file is called in the message) and ending in `redo` (what to run to make it again).
    `errors` are the parser's own exception types, reported as "corrupt"."""
    from .errors import DataError

    try:
        meta = parse(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError, *errors) as exc:
        raise DataError(f"{source} is corrupt ({exc.__class__.__name__}); {redo}") from None
    check_version(meta, version=version, source=source, redo=redo)
    missing = [k for k in required if k not in meta]
    if missing:
        raise DataError(f"{source} lacks {missing}; it is truncated or from another tool; {redo}")
    return meta


def check_version(meta: Any, *, version: Any, source: str, redo: str) -> None:
    """DataError unless `meta` is a dict of this ExpertFlow's format `version`."""
    from .errors import DataError

    if not isinstance(meta, dict) or meta.get("version") != version:
        v = meta.get("version") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{source} has version {v!r}; this ExpertFlow reads version {version}; {redo}")
