"""Files that survive a killed run: atomic, fsynced writes and recorded settings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    The file gets the permissions of an ordinary new file (0666 less the umask), not the temporary file's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a killed run never leaves a torn checkpoint."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the file itself is synced
    finally:
        os.close(fd)


def settings_diff(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two recorded settings."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class OutputError(OSError):
    """An output folder cannot be created or written; the message names it and says what to do."""


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it; raise :class:`OutputError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".attnseg-write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputError(f"cannot write to output folder {folder} ({reason}); pass a folder you can write to") from None
    return folder
