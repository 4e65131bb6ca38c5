"""One way to validate user-supplied values: numbers, ints, bools, choices, patterns, config fields.

Every config (:class:`~rmtprune.config.CompressionConfig`, :class:`~rmtprune.config.FitConfig`,
the sparsify and training configs) and every function taking the fit parameters checks them here,
so a value is accepted or refused, with the same message, wherever it is given. Each check returns
the normalised value (``float`` for numbers, ``list`` for patterns) so a caller can assign it.

Messages name the field and show the value: ``TypeError("lr='x' must be a number")`` for a wrong
type, ``ValueError("lr=-1.0 must be in (0, inf)")`` for a value out of range, bounds written with
``:g`` (``[0, 1]``, not ``[0.0, 1.0]``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "check_number",
    "check_int",
    "check_bool",
    "check_choice",
    "check_patterns",
    "check_fields",
    "from_dict",
]

T = TypeVar("T")


def _bound(v: float) -> str:
    return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"


def check_number(
    name: str,
    value: Any,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float in the interval ``[lo, hi]`` (ends open where asked); NaN is refused.

    Infinity is refused unless ``allow_inf`` (an infinite learning rate or epoch count is never
    usable; an infinite ``ks_max`` means "no gate" and is allowed there).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number")
    v = float(value)
    if not allow_inf and math.isinf(v):
        hi_open = hi_open or hi == math.inf
        lo_open = lo_open or lo == -math.inf
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if math.isnan(v) or below or above:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}={value!r} must be in {left}{_bound(lo)}, {_bound(hi)}{right}")
    return v


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int (bools refused) with ``lo <= value <= hi`` where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={value} must be <= {hi}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (ints, strings and None are refused, not coerced)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (strings)."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} must be a string")
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def check_patterns(name: str, value: Any) -> list[str]:
    """Layer-name patterns (a string or a list of non-empty strings) as a list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise TypeError(f"{name}={value!r} must be a list of non-empty pattern strings")
    return list(value)


def check_fields(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Refuse field names not in ``known``: ``ValueError`` naming them and listing the valid ones."""
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid: {', '.join(sorted(known))}")


def from_dict(cls: type[T], data: Any, what: str | None = None) -> T:
    """Build the dataclass ``cls`` from a plain dict, refusing non-dicts and unknown keys."""
    what = what or cls.__name__
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a JSON object, got {type(data).__name__}")
    check_fields(what, data, (f.name for f in dataclasses.fields(cls)))  # type: ignore[arg-type]
    return cls(**data)
