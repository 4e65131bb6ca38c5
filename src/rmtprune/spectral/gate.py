"""The BEMA gate calibrated by size: how far from MP a true MP bulk of ``p`` values may look.

The gate refuses a layer whose bulk is not MP-like, judged by the KS distance ``ks`` between the
trimmed empirical spectrum and its fitted MP law (:func:`rmtprune.spectral.fit_bulk`). A fixed
threshold cannot serve every size: a true MP sample of ``p = 10`` values has a 99% quantile of
``ks`` near 0.2, one of ``p = 1024`` values near 0.005 (eigenvalues are rigid: the statistic
shrinks almost like ``1 / p``, not like the ``p**-0.5`` of i.i.d. samples). A trained layer is
never exactly MP, so a pure test would refuse every large layer; the gate therefore keeps
``ks_max`` as the tolerance for model misfit and adds the sampling fluctuation of a true MP bulk
of the layer's size:

    accepted  iff  ks <= max(ks_max, q_{1 - eps}(p, gamma, alpha)),

with ``q`` the ``1 - eps`` quantile of the statistic on pure MP (real Gaussian) spectra of that
size, read from a simulated table (``ks_null_table.json``, rebuilt by
``benchmarks/make_ks_table.py``; grid, sample counts and checks in
``benchmarks/results/ks_null_table.md``). ``ks_max = 0`` is the pure test at level ``eps``.

Lookup: quantiles are interpolated linearly in ``(log p, gamma, alpha)`` on ``log q``, and in
``log eps`` between the tabulated levels. Beyond the grid in ``p`` the log-log line of the
nearest grid points is continued (fitted exponent -0.87 to -0.88 over p >= 128); ``gamma`` is
clamped to the grid (the statistic barely depends on it: measured 0.01 vs 0.05 agree within
sampling noise). Trim fractions ``alpha`` between tabulated ones are interpolated; outside the
tabulated range (0.1-0.4) the nearest column is read, an approximation (the size term matters
only for p < ~23). With the gate off (``ks_max >= 1``) no table is needed. Numpy only.

References
----------
Ke, Z. T., Ma, Y. and Lin, X. (2023). Estimation of the number of spiked eigenvalues in a
covariance matrix by bulk eigenvalue matching analysis. JASA 118(541), 374-392. arXiv:2006.00436.
Dumitriu, I. and Edelman, A. (2002). Matrix models for beta ensembles. arXiv:math-ph/0206043
(the sampler the table is simulated with).
Erdos, L., Yau, H.-T. and Yin, J. (2012). Rigidity of eigenvalues of generalized Wigner matrices.
Adv. Math. 229, 1435-1515. arXiv:1007.4652 (why the statistic shrinks almost like 1/p).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_EPS",
    "TABLE_FORMAT",
    "TABLE_PATH",
    "NullTable",
    "null_table",
    "null_quantiles",
    "ks_threshold",
    "ks_pvalue",
    "gate_threshold",
    "gate_message",
    "format_pvalue",
]

#: Level of the size term: a true MP bulk is refused by the pure test (``ks_max = 0``) this often.
DEFAULT_EPS = 0.01
#: The trim fraction the defaults assume (equal to ``bema.DEFAULT_ALPHA``; gate.py sits below bema).
_DEFAULT_ALPHA = 0.25
#: The table the package reads, and the format tag its generator writes.
TABLE_PATH = Path(__file__).with_name("ks_null_table.json")
TABLE_FORMAT = "rmtprune-ks-null/1"
#: Grid points each end's log-log line is fitted on (for ``p`` outside the grid).
_END_POINTS = 4


@dataclass(frozen=True)
class NullTable:
    """The simulated null quantiles: ``log_q[a, i, g, l]`` = log of the ``levels[l]`` quantile of KS
    for trim ``alpha[a]`` at ``p[i]``, ``gamma[g]``; ``slope_lo`` / ``slope_hi`` ``[a, g, l]`` are
    the log-log slopes continued below / above the grid in ``p``."""

    p: np.ndarray
    gamma: np.ndarray
    alpha: np.ndarray
    levels: np.ndarray
    samples: np.ndarray
    log_q: np.ndarray
    slope_lo: np.ndarray
    slope_hi: np.ndarray

    @property
    def pvalue_floor(self) -> float:
        """Smallest p-value the table resolves (``1 - max(levels)``, rounded to 0.001 exactly)."""
        return round(float(1.0 - self.levels[-1]), 12)

    @property
    def pvalue_ceiling(self) -> float:
        """Largest p-value the table resolves (``1 - min(levels)``, rounded)."""
        return round(float(1.0 - self.levels[0]), 12)


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of ``y[..., i, ...]`` on ``x`` along axis 1 of ``y`` (shape ``(A, P, G, L)``)."""
    xc = x - x.mean()
    yc = y - y.mean(axis=1, keepdims=True)
    return np.einsum("i,aigl->agl", xc, yc) / float(xc @ xc)


def parse_table(data: dict[str, Any]) -> NullTable:
    """Check a loaded table (the generator's format, :data:`TABLE_FORMAT`) and build a :class:`NullTable`."""
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"format={data.get('format')!r} is not {TABLE_FORMAT!r}: not a KS null table")
    p, gamma, alpha, levels = (
        np.asarray(data[k], dtype=np.float64) for k in ("p", "gamma", "alpha", "levels")
    )
    for name, v in (("p", p), ("gamma", gamma), ("alpha", alpha), ("levels", levels)):
        if v.ndim != 1 or v.size < 2 or np.any(np.diff(v) <= 0):
            raise ValueError(f"table {name} must be an increasing list of at least 2 values")
    keys = [f"{a:g}" for a in alpha]
    q = np.asarray([data["quantiles"][k] for k in keys], dtype=np.float64)
    expected = (alpha.size, p.size, gamma.size, levels.size)
    if q.shape != expected:
        raise ValueError(f"table quantiles have shape {q.shape}, expected {expected}")
    if not np.all(np.isfinite(q) & (q > 0)):
        raise ValueError("table quantiles must be finite and positive")
    # Empirical quantiles are monotone in the level by construction; rounding may tie them.
    log_q = np.log(np.maximum.accumulate(q, axis=-1))
    x = np.log(p)
    lo, hi = slice(0, _END_POINTS), slice(p.size - _END_POINTS, p.size)
    return NullTable(
        p=p,
        gamma=gamma,
        alpha=alpha,
        levels=levels,
        samples=np.asarray(data["samples"], dtype=np.int64),
        log_q=log_q,
        slope_lo=_slopes(x[lo], log_q[:, lo]),
        slope_hi=_slopes(x[hi], log_q[:, hi]),
    )


@lru_cache(maxsize=4)
def null_table(path: str | None = None) -> NullTable:
    """The table at ``path`` (default the package's :data:`TABLE_PATH`), loaded once."""
    with open(TABLE_PATH if path is None else path, encoding="utf-8") as f:
        return parse_table(json.load(f))


def _bracket(grid: np.ndarray, v: float) -> tuple[int, int, float]:
    """Indices ``(i, j)`` and weight ``w`` of ``v`` between ``grid[i]`` and ``grid[j]`` (``v`` inside)."""
    j = int(np.clip(np.searchsorted(grid, v, side="right"), 1, grid.size - 1))
    i = j - 1
    return i, j, float((v - grid[i]) / (grid[j] - grid[i]))


def _check_query(p: Any, gamma: Any, alpha: Any, table: NullTable) -> tuple[int, float, float]:
    if isinstance(p, bool) or not float(p).is_integer() or int(p) < 1:
        raise ValueError(f"p={p!r} must be a positive integer (the number of singular values)")
    gamma, alpha = float(gamma), float(alpha)
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma={gamma!r} must be in (0, 1] (gamma = min(m, n) / max(m, n))")
    if not (0.0 < alpha < 0.5):
        raise ValueError(f"alpha={alpha!r} must be in (0, 0.5)")
    # A trim fraction outside the tabulated ones reads the nearest column (documented: the size term
    # is an approximation there; it matters only for p < ~23, where it exceeds the default ks_max).
    a_lo, a_hi = float(table.alpha[0]), float(table.alpha[-1])
    return int(p), gamma, min(max(alpha, a_lo), a_hi)


@lru_cache(maxsize=4096)
def _quantiles(p: int, gamma: float, alpha: float, path: str | None) -> tuple[float, ...]:
    table = null_table(path)
    ai, aj, aw = _bracket(table.alpha, alpha)
    g = min(max(gamma, float(table.gamma[0])), float(table.gamma[-1]))
    gi, gj, gw = _bracket(table.gamma, g)

    def mix(arr: np.ndarray) -> np.ndarray:
        """Bilinear mix in (alpha, gamma) of an array indexed ``[a, ..., g, l]``."""
        ga = (1 - gw) * arr[..., gi, :] + gw * arr[..., gj, :]
        return (1 - aw) * ga[ai] + aw * ga[aj]

    curve = mix(table.log_q)  # (P, L)
    x, xs = math.log(p), np.log(table.p)
    if x < xs[0]:
        logq = curve[0] + mix(table.slope_lo) * (x - xs[0])
    elif x > xs[-1]:
        logq = curve[-1] + mix(table.slope_hi) * (x - xs[-1])
    else:
        i, j, w = _bracket(xs, x)
        logq = (1 - w) * curve[i] + w * curve[j]
    return tuple(float(v) for v in np.minimum(np.exp(np.maximum.accumulate(logq)), 1.0))


def null_quantiles(
    p: int, gamma: float, alpha: float = _DEFAULT_ALPHA, path: str | None = None
) -> np.ndarray:
    """Quantiles of the null KS statistic at ``(p, gamma)``, one per level of ``null_table().levels``."""
    table = null_table(path)
    p, gamma, alpha = _check_query(p, gamma, alpha, table)
    return np.array(_quantiles(p, gamma, alpha, path))


def ks_threshold(
    p: int, gamma: float, eps: float = DEFAULT_EPS, alpha: float = _DEFAULT_ALPHA, path: str | None = None
) -> float:
    """The ``1 - eps`` quantile of the KS statistic of a true MP bulk of ``p`` values at ratio ``gamma``.

    ``eps`` must lie between the table's extreme levels (0.001 to 0.75); between tabulated levels
    ``log q`` is linear in ``log eps``.
    """
    table = null_table(path)
    eps = float(eps)
    tail = 1.0 - table.levels  # decreasing
    if not (tail[-1] - 1e-12 <= eps <= tail[0] + 1e-12):
        raise ValueError(f"eps={eps!r} must be in [{tail[-1]:.3g}, {tail[0]:.3g}] (the table's levels)")
    q = np.log(null_quantiles(p, gamma, alpha, path))
    u = np.log(tail[::-1])  # increasing
    return float(math.exp(np.interp(math.log(eps), u, q[::-1])))


def ks_pvalue(
    ks: float, p: int, gamma: float, alpha: float = _DEFAULT_ALPHA, path: str | None = None
) -> float:
    """``P(KS_null >= ks)`` for a true MP bulk of ``p`` values at ratio ``gamma``.

    Interpolated between the tabulated quantiles (``log p-value`` linear in ``ks``), clipped to the
    table's resolution: ``null_table().pvalue_floor`` (0.001) means "at most that" and
    ``pvalue_ceiling`` (0.75) "at least that" (see :func:`format_pvalue`).
    """
    table = null_table(path)
    ks = float(ks)
    if not (0.0 <= ks <= 1.0):
        raise ValueError(f"ks={ks!r} must be in [0, 1]")
    q = null_quantiles(p, gamma, alpha, path)
    if ks >= q[-1]:
        return table.pvalue_floor
    if ks <= q[0]:
        return table.pvalue_ceiling
    j = int(np.searchsorted(q, ks, side="right"))  # q[j - 1] <= ks < q[j]
    w = (ks - q[j - 1]) / (q[j] - q[j - 1])
    t = np.log(1.0 - table.levels)
    return float(math.exp((1 - w) * t[j - 1] + w * t[j]))


def format_pvalue(pv: float, path: str | None = None) -> str:
    """``"0.034"``, or ``"< 0.001"`` / ``"> 0.75"`` at the ends of the table's resolution."""
    table = null_table(path)
    if pv <= table.pvalue_floor:
        return f"< {table.pvalue_floor:g}"
    if pv >= table.pvalue_ceiling:
        return f"> {table.pvalue_ceiling:g}"
    return f"{pv:.2g}" if pv < 0.01 else f"{pv:.3f}"


def gate_threshold(
    p: int,
    gamma: float,
    ks_max: float,
    eps: float = DEFAULT_EPS,
    alpha: float = _DEFAULT_ALPHA,
    path: str | None = None,
) -> float:
    """The effective gate ``max(ks_max, q_{1-eps}(p, gamma))``; ``ks_max >= 1`` (gate off) is returned."""
    ks_max = float(ks_max)
    if not ks_max >= 0.0:
        raise ValueError(f"ks_max={ks_max!r} must be >= 0")
    if ks_max >= 1.0:  # the statistic never exceeds 1: no table needed, any alpha is fine
        return ks_max
    return max(ks_max, ks_threshold(p, gamma, eps, alpha, path))


def gate_message(fit: Any, ks_max: float, eps: float = DEFAULT_EPS) -> str:
    """The verdict sentence of the gate for a :class:`~rmtprune.spectral.SpectrumFit` (accepted or not).

    e.g. ``"ks=0.123 > gate 0.100 (ks_max=0.1; MP null 99% quantile at p=16, gamma=0.5: 0.091;
    p-value 0.0012)"``; ``"no positive bulk"`` when no scale was fitted.
    """
    if not fit.sigma2 > 0:
        return "no positive bulk"
    ks_max = float(ks_max)
    gate = gate_threshold(fit.p, fit.gamma, ks_max, eps, fit.alpha)
    sign = "<=" if fit.ks <= gate else ">"
    head = f"ks={_num(fit.ks)} {sign} gate {_num(gate)} (ks_max={ks_max}"
    if ks_max >= 1.0:
        return head + "; the gate is off)"
    q = ks_threshold(fit.p, fit.gamma, eps, fit.alpha)
    pv = format_pvalue(ks_pvalue(fit.ks, fit.p, fit.gamma, fit.alpha))
    return (
        f"{head}; MP null {100 * (1 - eps):g}% quantile at p={fit.p}, gamma={fit.gamma:.3g}: {_num(q)}; "
        f"p-value {pv})"
    )


def _num(x: float) -> str:
    """Three decimals, or two significant digits below 0.01 (large layers' quantiles are ~0.003)."""
    return f"{x:.3f}" if x >= 0.01 or x == 0 else f"{x:.2g}"
