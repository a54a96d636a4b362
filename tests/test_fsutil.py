"""Atomic output: a failing writer leaves neither a partial file nor a temporary one."""

from __future__ import annotations

import pytest

from expertflow.fsutil import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_writer_that_raises_leaves_no_partial_new_file(tmp_path):
    target = tmp_path / "config.yaml"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_writer_that_raises_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old, complete\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("new, but cut")
        raise KeyboardInterrupt  # Ctrl-C mid-write
    assert target.read_text() == "old, complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_temporary_file_is_beside_the_target(tmp_path):
    target = tmp_path / "sub" / "report.html"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing visible until the writer is done
        tmp.write_text("<html></html>")
    assert target.read_text() == "<html></html>"
