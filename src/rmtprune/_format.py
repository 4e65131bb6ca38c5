"""One way to turn results into text: the JSON encoder, human-readable counts, and tables.

Every report (compression plans, sparsify reports, training tables, ``analyze`` output) renders
through :func:`table` and encodes through :func:`json_default`, so numpy scalars, tuples and paths
serialise the same way everywhere and text and Markdown tables look alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from typing import Any

__all__ = ["json_default", "dumps", "human", "ratio", "table"]


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays, tuples, sets and paths."""
    if hasattr(o, "tolist") and hasattr(o, "dtype"):  # numpy scalars and arrays, without importing numpy
        return o.tolist()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``json.dumps`` with :func:`json_default`."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default)


def human(n: int | float | None) -> str:
    """A count with a k/M/G suffix and three significant digits (``""`` for None)."""
    if n is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def ratio(after: int, before: int) -> str:
    """``after`` as a percentage of ``before`` (``n/a`` when ``before`` is 0)."""
    return f"{after / before:.1%} of before" if before else "n/a"


def table(
    head: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    markdown: bool = False,
    pad_last: bool = False,
    sep_line: bool = True,
    right: Collection[int] = (),
) -> str:
    """Rows as an aligned text table (two spaces between columns) or a Markdown table.

    Text: a header, a dashed rule (``sep_line``) and the rows, left aligned except the columns
    (indices) in ``right``, which are right aligned (numbers); the last column is not padded unless
    ``pad_last``, and trailing spaces are stripped. Markdown: ``|`` in cells escaped. No trailing
    newline.
    """
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in cells]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) if (pad_last or i < len(r) - 1) else c
            for i, c in enumerate(r)
        ]
        return "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if sep_line:
        out.append(line(["-" * w for w in widths]))
    return "\n".join(out + [line(r) for r in cells[1:]])
