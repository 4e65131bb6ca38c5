"""Atomic file output: write to a temporary file in the target directory, then rename over."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import RmtpruneError

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "check_writable_dir"]


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Raise a clear error unless the directory that will hold ``path`` exists and is writable."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise RmtpruneError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise RmtpruneError(f"output directory {str(parent)!r} is not writable")
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, else removed.

    Readers never see a half-written file, and a failure leaves any previous file untouched.
    """
    target = Path(path).expanduser()
    parent = check_writable_dir(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
