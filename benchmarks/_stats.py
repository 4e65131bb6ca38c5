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


#: Two-sided 95% (and 90%) quantiles of Student's t for 1..10 degrees of freedom; beyond, the normal's.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)


def ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, standard error, low, high)``: the two-sided t interval at ``level`` (0.95 or 0.90) over
    ``n - 1`` degrees of freedom; one value gives nan for the rest."""
    if level not in (0.95, 0.90):
        raise ValueError(f"level={level!r} must be 0.95 or 0.90")
    vals = [float(v) for v in values]
    n = len(vals)
    mean = statistics.fmean(vals)
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    se = statistics.stdev(vals) / n**0.5
    table, z = (_T975, 1.96) if level == 0.95 else (_T95, 1.645)
    t = table[n - 2] if n - 1 <= len(table) else z
    return mean, se, mean - t * se, mean + t * se


def equivalent(diffs: Sequence[float], margin: float) -> bool:
    """Two one-sided tests at 5% (TOST): the paired differences' 90% t interval lies inside
    ``(-margin, +margin)``. Needs >= 2 values."""
    if len(diffs) < 2:
        return False
    _, _, lo, hi = ci(diffs, 0.90)
    return -margin < lo and hi < margin
