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


#: Two-sided 95% (and 90%) quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal's
#: (within 4%).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
    2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
    2.045, 2.042,
)  # fmt: skip
_T95 = (
    6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
    1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
    1.699, 1.697,
)  # fmt: skip


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
