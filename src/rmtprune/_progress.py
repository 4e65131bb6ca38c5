"""Progress bars for long work (tqdm on stderr; silent when disabled or not on a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress"]


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", enable: bool | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar. ``enable=None`` shows it only when stderr is a terminal."""
    if enable is None:
        enable = sys.stderr.isatty()
    if not enable:
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
