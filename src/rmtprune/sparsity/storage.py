"""What a pruned weight costs in the sparse file format: its storage format and bytes, index included.

:mod:`rmtprune.sparse_format` writes a masked weight as its kept values plus the pattern of kept
entries: a **bitmask** (``numel / 8`` bytes) or **CSR** (``int32`` row pointers, ``int16`` column
indices below 32768 columns); ``auto`` picks the smaller pattern. The sizes, the index types and
the choice are defined here, once: the encoder writes with them and the sparsify report counts
with them, so the report's stored bytes are the bytes of the file's tensors (this module sits in
the sparsity layer because the report may not import the persist layer; ``sparse_format``
re-exports it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._validate import check_choice

__all__ = [
    "FORMATS",
    "SEP",
    "StoredSize",
    "pattern_bytes",
    "choose_format",
    "tensor_size",
    "written_entries",
    "encoded_sizes",
]

#: Storage formats of a masked tensor; ``auto`` picks the smaller of the two per tensor.
FORMATS = ("auto", "bitmask", "csr")
#: Separator of a sparse tensor's name and its part in an encoded state dict (``"<key>@values"``).
SEP = "@"


def col_dtype(cols: int, nnz: int) -> torch.dtype:
    """Narrowest signed int type for CSR column indices (int16 for matrices under 32768 columns)."""
    if cols <= 2**15:
        return torch.int16
    return torch.int32 if max(cols, nnz) < 2**31 else torch.int64


def crow_dtype(nnz: int) -> torch.dtype:
    """Type of the CSR row pointers (they run up to ``nnz``)."""
    return torch.int32 if nnz < 2**31 else torch.int64


def pattern_bytes(fmt: str, shape: tuple[int, ...], nnz: int) -> int:
    """Bytes of the kept-entry pattern written for a tensor of ``shape`` with ``nnz`` kept entries in
    format ``fmt`` (``bitmask`` or ``csr``; the values come on top).

    Examples
    --------
    >>> pattern_bytes("bitmask", (64, 64), 2048), pattern_bytes("csr", (64, 64), 2048)
    (512, 4356)
    """
    check_choice("format", fmt, FORMATS[1:])
    numel = math.prod(shape)
    if fmt == "bitmask":
        return (numel + 7) // 8
    rows = shape[0] if shape else 1
    cols = numel // rows if rows else 0
    return crow_dtype(nnz).itemsize * (rows + 1) + col_dtype(cols, nnz).itemsize * nnz


def choose_format(shape: tuple[int, ...], nnz: int, fmt: str = "auto") -> str:
    """The format a tensor is written in: ``fmt``, or for ``auto`` the one with the smaller pattern.

    Examples
    --------
    >>> choose_format((64, 64), 2048), choose_format((64, 64), 100), choose_format((64, 64), 100, "bitmask")
    ('bitmask', 'csr', 'bitmask')
    """
    check_choice("format", fmt, FORMATS)
    if fmt != "auto":
        return fmt
    return "csr" if pattern_bytes("csr", shape, nnz) < pattern_bytes("bitmask", shape, nnz) else "bitmask"


@dataclass(frozen=True)
class StoredSize:
    """What :func:`rmtprune.sparse_format.encode_state_dict` writes for one tensor."""

    #: ``dense`` (the tensor as it is), ``bitmask`` or ``csr``.
    format: str
    #: Entries of the dense tensor.
    numel: int
    #: Values written: the kept entries of a sparse tensor, every entry of a dense one.
    values: int
    #: Bytes per value (the tensor's dtype).
    element_size: int
    #: Bytes of the kept-entry pattern (bitmask or CSR indices); 0 for a dense tensor.
    index_bytes: int

    @property
    def value_bytes(self) -> int:
        return self.values * self.element_size

    @property
    def bytes(self) -> int:
        """Bytes written: values plus pattern."""
        return self.value_bytes + self.index_bytes

    @property
    def dense_bytes(self) -> int:
        """Bytes of the tensor written dense."""
        return self.numel * self.element_size

    @property
    def equivalent(self) -> float:
        """:attr:`bytes` in values of the tensor's dtype: what it costs in parameters, index included."""
        return self.bytes / self.element_size if self.element_size else 0.0


def tensor_size(shape: tuple[int, ...], nnz: int, dtype: torch.dtype, fmt: str = "auto") -> StoredSize:
    """The :class:`StoredSize` of a tensor of ``shape`` and ``dtype`` stored sparsely with ``nnz`` kept
    entries in ``fmt`` (``auto``: the smaller pattern).

    Examples
    --------
    >>> s = tensor_size((64, 64), 2048, torch.float32)
    >>> s.format, s.bytes, s.equivalent
    ('bitmask', 8704, 2176.0)
    """
    shape = tuple(int(v) for v in shape)
    if not shape:
        raise ValueError("cannot store a 0-d tensor sparsely")
    numel = math.prod(shape)
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} must be in [0, {numel}] for shape {list(shape)}")
    chosen = choose_format(shape, nnz, fmt)
    size = torch.empty((), dtype=dtype).element_size()
    return StoredSize(chosen, numel, nnz, size, pattern_bytes(chosen, shape, nnz))


def written_entries(
    state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    """The entries an encoded state dict holds, in order: a tied tensor once, under its first name.

    Raises ``KeyError`` for a mask of a key not in the state dict and ``ValueError`` for a key
    holding the reserved separator :data:`SEP`.
    """
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise KeyError(f"masks for keys not in the state dict: {unknown}")
    out = []
    seen: set[tuple] = set()
    for key, value in state_dict.items():
        if SEP in key:
            raise ValueError(f"state dict key {key!r} contains the reserved separator {SEP!r}")
        ident = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and key not in masks and ident in seen:
            continue  # a tied tensor, already stored under another name (load_state_dict re-ties it)
        seen.add(ident)
        out.append((key, value))
    return out


def encoded_sizes(
    state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | int], fmt: str = "auto"
) -> dict[str, StoredSize]:
    """Per written entry, the :class:`StoredSize` that
    :func:`rmtprune.sparse_format.encode_state_dict` gives it; nothing is encoded or copied.

    ``masks`` maps the keys stored sparsely to their boolean masks or to their numbers of kept
    entries (a plan's counts). The bytes of all entries sum to
    :func:`rmtprune.sparse_format.stored_bytes` of the encoded tensors (the file adds its header).
    """
    check_choice("format", fmt, FORMATS)
    out = {}
    for key, value in written_entries(state_dict, masks):
        if key in masks:
            kept = masks[key]
            if isinstance(kept, torch.Tensor):
                if tuple(kept.shape) != tuple(value.shape):
                    raise ValueError(
                        f"mask shape {tuple(kept.shape)} != weight shape {tuple(value.shape)} for {key!r}"
                    )
                kept = int(kept.sum())
            out[key] = tensor_size(tuple(value.shape), int(kept), value.dtype, fmt)
        else:
            n = int(value.numel())
            out[key] = StoredSize("dense", n, n, value.element_size(), 0)
    return out
