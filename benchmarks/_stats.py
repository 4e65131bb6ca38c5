"""Statistics of the benchmark tables: mean and sample standard deviation, ``mean +- std`` cells."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean +- std"`` of ``values * scale``."""
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} +- {s:.{digits}f}"


def fmt_int(v: float) -> str:
    """Thousands separators."""
    return f"{round(v):,}"
