"""Decoding of (gzipped) IDX files, checked so that a corrupt or crafted file is one clear error."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import RmtpruneError
from .files import _FILES, SHA256, sha256_file

__all__ = ["read_idx"]

_CHUNK = 1 << 16
_MAX_DEFLATE_RATIO = 1032  # the most a deflate stream can expand (258-byte matches at 2 bits)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one (gzipped) IDX file into a numpy array, validating magic, dims and length.

    Raises :class:`RmtpruneError` naming the file if it is not gzip, is truncated, has a wrong
    magic number or a payload whose length does not match its header. The declared size is
    checked against what a gzip file of this length can hold before anything is allocated, and
    the payload is read in chunks, so a crafted header or a gzip bomb cannot exhaust memory.
    """
    path = Path(path)
    try:
        compressed = path.stat().st_size
        with gzip.open(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                rest = fh.read(256)  # the empty file and the 3-byte one still get "magic" as the culprit
                raw = head + rest
                raise RmtpruneError(
                    f"IDX file {str(path)!r} has a wrong magic number {raw[:4].hex() or '(empty)'}"
                )
            ndim = head[3]
            header = 4 + 4 * ndim
            dim_bytes = fh.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise RmtpruneError(
                    f"IDX file {str(path)!r} is truncated: header needs {header} bytes, "
                    f"has {4 + len(dim_bytes)}"
                )
            dims = tuple(int(d) for d in np.frombuffer(dim_bytes, dtype=">u4"))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            payload = math.prod(dims) * dtype.itemsize
            # deflate expands at most ~1032:1, so a larger declared payload cannot be in this file
            if payload > _MAX_DEFLATE_RATIO * compressed:
                raise RmtpruneError(
                    f"IDX file {str(path)!r} declares dims {_dims(dims)} ({payload} bytes), more than a "
                    f"{compressed}-byte gzip file can hold; the header is corrupt"
                )
            chunks = []
            got = 0
            while got <= payload:
                chunk = fh.read(min(_CHUNK * 16, payload + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            exact = True
            if got > payload:  # how much more, for the message (up to 1 MiB counted)
                extra = len(fh.read(1 << 20))
                got += extra
                exact = extra < 1 << 20
    except FileNotFoundError:
        raise RmtpruneError(f"IDX file {str(path)!r} does not exist") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise RmtpruneError(
            f"IDX file {str(path)!r} is not a valid gzip file (truncated or corrupt: {exc})"
        ) from exc
    if got != payload:
        more = "" if exact else "+"
        raise RmtpruneError(
            f"IDX file {str(path)!r} has {header + got}{more} bytes but its header "
            f"(dims {_dims(dims)}) implies {header + payload}"
        )
    raw = b"".join(chunks)
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _dims(dims: tuple[int, ...]) -> str:
    """Dims for a message (at most 8 shown)."""
    return str(dims) if len(dims) <= 8 else f"({', '.join(map(str, dims[:8]))}, ... {len(dims)} dims)"


def _decode_split(name: str, folder: Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (folder / f for f in _FILES[split])
    if verify:
        for f in (images_file, labels_file):
            digest = sha256_file(f)
            if digest != SHA256[name][f.name]:
                other = [k for k, sums in SHA256.items() if k != name and digest in sums.values()]
                if other:
                    raise RmtpruneError(
                        f"{str(f)!r} is the {other[0]} file, not {name}: keep each dataset in its own "
                        f"folder (<dir>/{name}/ and <dir>/{other[0]}/)"
                    )
                raise RmtpruneError(
                    f"sha256 mismatch for {str(f)!r}: expected {SHA256[name][f.name]}, got {digest}; "
                    "the file is corrupt or not the original: delete it (it will be downloaded again) "
                    "or replace it with the original"
                )
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise RmtpruneError(
            f"IDX file {str(images_file)!r} holds {images.dtype} {images.shape}, expected uint8 N x H x W"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise RmtpruneError(
            f"IDX file {str(labels_file)!r} holds {labels.dtype} {labels.shape}, expected uint8 N"
        )
    if images.shape[0] != labels.shape[0]:
        raise RmtpruneError(
            f"{images.shape[0]} images in {str(images_file)!r} but "
            f"{labels.shape[0]} labels in {str(labels_file)!r}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise RmtpruneError(f"IDX file {str(labels_file)!r} has label {int(labels.max())} outside [0, 9]")
    return images, labels
