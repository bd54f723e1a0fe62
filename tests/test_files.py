"""Atomic writes: the file appears whole, with an ordinary new file's permissions, and no temporary file is left."""

from __future__ import annotations

import stat

from attnseg.io.files import atomic_write_bytes


def test_atomic_write_permissions_follow_the_umask(tmp_path, monkeypatch):
    import attnseg.io.files as files

    monkeypatch.setattr(files, "_UMASK", 0o022)  # the module reads the process umask once, at import
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"abc")
    p = tmp_path / "a" / "x.bin"
    assert p.read_bytes() == b"abc"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [q.name for q in p.parent.iterdir()] == ["x.bin"]


def test_atomic_write_replaces(tmp_path):
    atomic_write_bytes(tmp_path / "x", b"1")
    atomic_write_bytes(tmp_path / "x", b"22")
    assert (tmp_path / "x").read_bytes() == b"22"
