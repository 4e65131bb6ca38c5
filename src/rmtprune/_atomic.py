"""Atomic file output: write into a private temporary folder beside the target, then rename over.

Every temporary path rmtprune makes is named after its target, ``.<name>.rmtprune-<pid>-<rand>.tmp``
(a folder holding the file being written), so a person can tell what it was, and the next run that
writes the same target removes the ones whose process is gone (killed with SIGKILL, a power cut).
Writers that make their own temporary files beside the path they are given (safetensors writes
``.tmpXXXXXX`` and renames it) make them inside that private folder, so they are cleaned too.
The file is fsynced before the rename and the directory after it, so a crash leaves either the
complete old file or the complete new one, never a half-written file under the target's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import RmtpruneError

__all__ = [
    "atomic_path",
    "atomic_paths",
    "atomic_dir",
    "atomic_write_text",
    "atomic_write_bytes",
    "check_writable_dir",
    "clean_stale",
    "temp_name_re",
]

_TAG = "rmtprune"


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Raise a clear error unless the directory that will hold ``path`` exists and is writable."""
    # The directory holding the name itself, not the target of a symlink of that name: the
    # temporary file must sit beside the name it replaces (a rename cannot cross filesystems).
    parent = Path(os.path.abspath(Path(path).expanduser())).parent
    if not parent.is_dir():
        raise RmtpruneError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise RmtpruneError(f"output directory {str(parent)!r} is not writable")
    return parent


def _short(name: str) -> str:
    """``name``, or for a long one a prefix and a hash, so the temporary name fits NAME_MAX (255)."""
    if len(name.encode("utf-8", "surrogateescape")) <= 200:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return name.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore") + "~" + digest


def temp_name_re(name: str) -> re.Pattern[str]:
    """The names of rmtprune's temporary paths for a target called ``name`` (group 1: the pid)."""
    return re.compile(rf"^\.{re.escape(_short(name))}\.{_TAG}-(\d+)-[0-9a-f]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def clean_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove rmtprune's leftover temporary paths for target ``path`` whose writing process is gone.

    Only names of our own pattern (:func:`temp_name_re`) are touched, and only those whose pid is
    no longer running (a live writer, for instance a second run on the same target, keeps its own).
    Returns the paths removed.
    """
    target = Path(path).expanduser()
    parent = target.parent
    pattern = temp_name_re(target.name)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class _Slot:
    """One target of :func:`atomic_paths`: its private folder and the temporary file inside it."""

    def __init__(self, target: Path, suffix: str) -> None:
        self.target = target
        self.parent = check_writable_dir(target)
        if target.is_dir():
            raise RmtpruneError(f"output {str(target)!r} is a directory")
        clean_stale(target)
        self.folder = self.parent / f".{_short(target.name)}.{_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self.folder.mkdir(mode=0o700)
        self.tmp = self.folder / (target.name + suffix)

    def commit(self) -> None:
        if not self.tmp.is_file():
            raise RmtpruneError(f"nothing was written for {str(self.target)!r}")
        _fsync_file(self.tmp)
        # Give the file the mode a plain open() would (0666 less the umask).
        os.chmod(self.tmp, 0o666 & ~_umask())
        os.replace(self.tmp, self.target)
        _fsync_dir(self.parent)

    def discard(self) -> None:
        _remove(self.folder)


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike[str]], suffix: str = "") -> Iterator[list[Path]]:
    """Yield one temporary path per target; when the block succeeds they are renamed in order.

    Nothing is renamed until every file has been written, so a failure while writing (an
    exception, a full disk, Ctrl-C) leaves every target as it was; the renames then happen in the
    order given (weights before their manifest). Temporary files are removed whatever happens.
    """
    slots: list[_Slot] = []
    try:
        for p in paths:
            slots.append(_Slot(Path(p).expanduser(), suffix))
        yield [s.tmp for s in slots]
        for s in slots:
            s.commit()
    finally:
        for s in slots:
            s.discard()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path for ``path``; on success it is renamed to ``path``, else removed.

    Readers never see a half-written file, and a failure leaves any previous file untouched.
    """
    with atomic_paths([path], suffix=suffix) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory for the directory ``path``; when the block succeeds it takes
    ``path``'s place, else it is removed and ``path`` is left as it was.

    The temporary directory has the name of every rmtprune temporary path (:func:`temp_name_re`), so
    one left by a killed run is removed by the next run on the same target. A directory cannot be
    renamed over another, so an existing ``path`` is first moved aside under a name that
    :func:`clean_stale` never removes (``...old``), put back if the final rename fails, and deleted
    only once the new one is in place.
    """
    target = Path(path).expanduser()
    parent = check_writable_dir(target)
    clean_stale(target)
    stem = f".{_short(target.name)}.{_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp, old = parent / f"{stem}.tmp", parent / f"{stem}.old"
    tmp.mkdir()
    moved = False
    try:
        yield tmp
        if target.exists():
            os.rename(target, old)
            moved = True
        os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        if moved and not target.exists():
            os.rename(old, target)  # the new one could not take its place: put the old one back
        _remove(tmp)
        raise
    if moved:
        _remove(old)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
