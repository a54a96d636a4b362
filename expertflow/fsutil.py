"""Atomic file output: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError, OutputError


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
    if not isinstance(meta, dict) or meta.get("version") != version:
        v = meta.get("version") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{source} has version {v!r}; this ExpertFlow reads version {version}; {redo}")


# ---- output folders ---------------------------------------------------------------------------
TEMP_PREFIX = "."  # atomic_path's and Profile.save's temporaries: hidden, beside the target


class OutFolder:
    """An output folder claimed by `claim_out_dir`: what was in it before, so that a failed run
    can put it back as it found it (`restore`)."""

    def __init__(self, path: Path, created: list[Path], before: set[str]):
        self.path, self.created, self.before = path, created, before

    def restore(self) -> None:
        """Remove what this run added: the entries that were not there before, then the folders
        this run created (innermost first). Pre-existing entries are never touched."""
        import shutil

        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name not in self.before:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: never removes anything else


def foreign_entries(path: Path, ours) -> list[str]:
    """Names in folder `path` that are neither in `ours` (a set of names, or a predicate on a
    name) nor one of our hidden temporaries."""
    is_ours = ours if callable(ours) else (lambda name: name in ours)
    return sorted(e.name for e in path.iterdir()
                  if not is_ours(e.name) and not (e.name.startswith(TEMP_PREFIX) and e.name.endswith(".tmp")))


def claim_out_dir(path: str | os.PathLike, ours, *, force: bool = False, flag: str = "--out",
                  what: str = "ExpertFlow") -> OutFolder:
    """Check that `path` can take our output, and make it; before any work is done.

    Refused (OutputError, exit 2, one line): a path that is a file; a folder that holds entries
    that are not ours (`ours`: names or a predicate) unless `force` (then ours are written beside
    them and nothing of theirs is deleted); a path that cannot be created or written (a
    read-only file system, no permission). Returns an OutFolder whose `restore()` leaves the
    folder as it was found.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {str(target)!r} is a file, not a folder; pass a folder path (a new "
                          f"one, an empty one, or one {what} wrote before)")
    before: set[str] = set()
    if target.is_dir():
        before = {e.name for e in target.iterdir()}
        foreign = foreign_entries(target, ours)
        if foreign and not force:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise OutputError(f"{flag} {str(target)!r} is a folder {what} did not write (it holds {shown}); "
                              f"pass a new or empty folder, or add --force to write {what}'s files beside "
                              "these (none of them is deleted)")
    created: list[Path] = []
    missing = []
    p = target
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}write-probe.", suffix=".tmp", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise OutputError(f"{flag} {str(target)!r} cannot be written ({exc.strerror or exc}); pass a "
                          "folder on a writable file system where you have write permission") from None
    return OutFolder(target, created, before)
