"""What every reader of other people's weight files shares: the tensor listing record, the reader
interface, and the small checks and message helpers of a crafted-input-proof parser.

:mod:`rmtprune.weights_file` picks a reader per format (:mod:`rmtprune._safetensors_reader`,
:mod:`rmtprune._torch_reader`) and combines shards; this module depends on none of them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_MAX_HEADER = 100_000_000  # the safetensors format caps its JSON header at 100 MB
_MAX_INT = 2**63  # sizes, offsets and element counts must fit an int64
_MAX_NDIM = 64  # torch's own limit on tensor dimensions


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype (torch spelling, e.g. ``float32``) of one tensor in a checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def is_float(self) -> bool:
        """Whether the dtype is a real floating-point type."""
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (at most 200 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _natural_key(name: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [(0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.split(r"(\d+)", name)]


class _Source:
    """A readable checkpoint: an ordered listing plus lazy reads."""

    format = ""

    def infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def read(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _parse_json(raw: bytes | str) -> Any:
    """Strict JSON: no ``NaN``/``Infinity`` and a clear error (not a RecursionError) for deep nesting."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _as_size(value: Any, what: str) -> int:
    """A JSON value that must be a non-negative integer below 2**63 (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_INT:
        raise ValueError(f"{what} {_short(value)} is not a non-negative integer below 2**63")
    return value


def _short(value: Any) -> str:
    """A JSON value, shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_shape(value: Any) -> tuple[int, ...]:
    """A tensor shape: a list of at most 64 sizes whose product (zeros aside) stays below 2**63."""
    if not isinstance(value, list):
        raise ValueError(f"shape {_short(value)} is not a list")
    if len(value) > _MAX_NDIM:
        raise ValueError(f"shape has {len(value)} dimensions (at most {_MAX_NDIM})")
    shape = tuple(_as_size(v, "shape entry") for v in value)
    if math.prod(max(v, 1) for v in shape) >= _MAX_INT:
        raise ValueError(f"shape {list(shape)} has more than 2**63 elements")
    return shape
