"""A verified, atomic download of the original IDX files from the canonical mirrors.

Each file is read up to its known size, checked against its sha256 and renamed into place only
when both match; a failed download removes the directories it created and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .._atomic import atomic_path
from ..errors import RmtpruneError
from .files import _ALL_FILES, DATA_ENV, MIRRORS, MIRRORS_ENV, SHA256, SIZES, _canonical, sha256_file

__all__ = ["download_dataset"]

_CHUNK = 1 << 16


def _mirrors(name: str, mirrors: Sequence[str] | str | None) -> list[str]:
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV)
        mirrors = env if env else MIRRORS[name]
    if isinstance(mirrors, str):
        mirrors = [m for m in (s.strip() for s in mirrors.split(",")) if m]
    out = []
    for m in mirrors:
        if not isinstance(m, str):
            raise TypeError(f"mirror must be a URL string, got {type(m).__name__}")
        m = m.replace("{name}", name)
        out.append(m if m.endswith("/") else m + "/")
    if not out:
        raise ValueError(f"no download mirrors given for {name!r}")
    return out


def _fetch(url: str, target: Path, expected: str, timeout: float, size: int) -> None:
    """Download ``url`` to ``target`` atomically, checking length and sha256; raise on any problem.

    At most ``size + 1`` bytes are read: a server that announces or sends more than the known size
    of the file is cut off with an error instead of filling the disk.
    """
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http/https mirrors only)
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > size:
            raise RmtpruneError(f"the server announces {total} bytes, more than the expected {size}")
        h = hashlib.sha256()
        got = 0
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            bar = None
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total, unit="B", unit_scale=True, desc=target.name, leave=False, file=sys.stderr
                )
            try:
                while True:
                    chunk = resp.read(min(_CHUNK, size + 1 - got))
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise RmtpruneError(f"the server sends more than the expected {size} bytes")
                    fh.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and got != total:
                raise RmtpruneError(f"truncated download: got {got} of {total} bytes")
            digest = h.hexdigest()
            if digest != expected:
                raise RmtpruneError(f"sha256 mismatch: expected {expected}, got {digest} ({got} bytes)")
            fh.flush()
            os.fsync(fh.fileno())


def _make_dir(dest: Path, created: list[Path]) -> None:
    """Create ``dest`` and its missing parents, recording (outermost first) the ones made here."""
    if dest.is_dir():
        return
    missing = []
    p = dest
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        created.extend(d for d in reversed(missing) if d.is_dir())  # parents made before the failure
        raise RmtpruneError(f"cannot create data directory {str(dest)!r}: {exc.strerror or exc}") from exc
    created.extend(reversed(missing))


def _undo(created: list[Path], landed: list[Path]) -> None:
    """After a failed download: remove the files this call wrote into directories it created, then
    those directories if empty. Nothing that existed before the call is touched."""
    made = set(created)
    for f in landed:
        if f.parent in made:
            with contextlib.suppress(OSError):
                f.unlink()
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: never a tree someone else wrote into meanwhile


def download_dataset(
    name: str,
    dest: str | os.PathLike[str],
    mirrors: Sequence[str] | str | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download the four IDX files of ``name`` into ``dest`` (created), verifying each sha256.

    Each file is tried on each mirror in turn (``mirrors``, else ``$RMTPRUNE_MIRRORS``, else
    :data:`MIRRORS`); it is written to a temporary file and renamed only when its length and sha256
    match, so a bad download never lands, and reading stops at the known size (:data:`SIZES`).
    Files already present with the right sha256 are kept. When the download fails, the directories
    this call created (and the files it put in them) are removed again; nothing else is touched.
    Raises :class:`RmtpruneError` naming every mirror's failure and where to put the files by hand.
    """
    key = _canonical(name)
    if key not in SHA256:
        raise ValueError(f"dataset {key!r} is bundled with scikit-learn and is never downloaded")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    urls = _mirrors(key, mirrors)
    dest = Path(dest).expanduser()
    created: list[Path] = []
    landed: list[Path] = []
    try:
        for fname in _ALL_FILES:
            target = dest / fname
            expected = SHA256[key][fname]
            if target.is_file() and sha256_file(target) == expected:
                continue
            _make_dir(dest, created)
            errors = []
            for base in urls:
                url = base + fname
                try:
                    _fetch(url, target, expected, timeout, SIZES[key][fname])
                    landed.append(target)
                    break
                except (
                    urllib.error.URLError,
                    http.client.HTTPException,
                    OSError,
                    ValueError,
                    RmtpruneError,
                ) as exc:
                    reason = getattr(exc, "reason", None) or exc
                    errors.append(f"{url}: {reason}")
            else:
                raise RmtpruneError(
                    f"could not download {key} file {fname} from any mirror ({'; '.join(errors)}). "
                    f"Offline? Put the four files {', '.join(_ALL_FILES)} in {dest} "
                    f"(or in <dir>/{key}/ and pass --data-dir <dir> or set {DATA_ENV}=<dir>)"
                )
    except BaseException:
        _undo(created, landed)
        raise
    return dest
