"""BEMA: fit the Marchenko-Pastur bulk of a spectrum and find the edge above which spikes live.

Standard model of Ke, Ma & Lin (METHOD.md section 3): match the middle quantiles of the
eigenvalues ``lambda_i = s_i**2 / N`` to those of the unit MP law by least squares through the
origin, then put the edge a Tracy-Widom margin above the support. Pure numpy; a fit costs a
fraction of a millisecond next to the singular values it starts from.

References
----------
Ke, Z. T., Ma, Y. and Lin, X. (2023). Estimation of the number of spiked eigenvalues in a
covariance matrix by bulk eigenvalue matching analysis. JASA 118(541), 374-392. arXiv:2006.00436.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .gate import gate_threshold, ks_pvalue
from .mp import mp_cdf, mp_ppf, mp_support
from .tracy_widom import tw1_quantile

__all__ = [
    "SpectrumFit",
    "fit_bulk",
    "fit_censored",
    "check_shape",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_KS_MAX",
    "MIN_P",
]

#: Trim fraction on each side of the sorted spectrum (papers: 0.2 or 0.25).
DEFAULT_ALPHA = 0.25
#: One minus the confidence of the Tracy-Widom margin on the edge (papers: 0.1).
DEFAULT_BETA = 0.1
#: Default gate on the KS distance to the fitted MP law: above it a layer has no MP-like bulk.
#: Chosen from measured spectra: pure noise of any of the tested distributions stays below 0.02
#: for p >= 64, and trained MLP/CNN layers whose bulk is visibly MP-shaped sit below ~0.1, while
#: layers with heavy-tailed or structured bulks (e.g. embedding-like, near-identity) go above.
DEFAULT_KS_MAX = 0.1
#: Below this many singular values the fit is not meaningful (verdict ``too-small``).
MIN_P = 10


def check_shape(shape: Any) -> tuple[int, int]:
    """Validate a 2-D matrix shape ``(m, n)`` of positive ints and return it as a tuple."""
    try:
        m, n = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape={shape!r} must be a pair of ints (m, n)") from None
    if m < 1 or n < 1:
        raise ValueError(f"shape={shape!r} must have positive sides")
    return m, n


@dataclass(frozen=True)
class SpectrumFit:
    """Result of a BEMA fit of one matrix's spectrum (the public contract of the analysis).

    Attributes
    ----------
    shape : (m, n), the matrix shape the singular values came from.
    gamma : ``p / N`` with ``p = min(m, n)``, ``N = max(m, n)``.
    sigma2 : fitted noise variance per entry (MP scale).
    lambda_plus : eigenvalue edge, the MP upper edge plus the Tracy-Widom margin.
    s_plus : singular-value threshold ``sqrt(N * lambda_plus)``; spikes are ``s > s_plus``.
    n_spikes, n_bulk : counts of singular values above / at or below ``s_plus``.
    ks : Kolmogorov-Smirnov distance between the empirical and fitted MP cdf on the trimmed window.
    alpha, beta : the trim fraction and the TW level used.
    singular_values : all ``p`` singular values, descending, float64.
    noise : the noise model that gave the edge: ``"mp"`` (TW edge, :func:`fit_bulk`), ``"gamma"`` or
        ``"resample"`` (simulated nulls, ``spectral/heavy.py``).
    """

    shape: tuple[int, int]
    gamma: float
    sigma2: float
    lambda_plus: float
    s_plus: float
    n_spikes: int
    n_bulk: int
    ks: float
    alpha: float
    beta: float
    singular_values: np.ndarray = field(repr=False, compare=False)
    noise: str = "mp"

    @property
    def p(self) -> int:
        """Number of singular values, ``min(m, n)``."""
        return min(self.shape)

    @property
    def N(self) -> int:  # noqa: N802 - the papers' notation
        """The larger side, ``max(m, n)``."""
        return max(self.shape)

    @property
    def eigenvalues(self) -> np.ndarray:
        """``s**2 / N``, descending: the spectrum the MP law describes."""
        return self.singular_values**2 / self.N

    @property
    def mp_edges(self) -> tuple[float, float]:
        """Support ``(lambda_minus, lambda_plus_mp)`` of the fitted MP law (no TW margin)."""
        if not self.sigma2 > 0:
            return 0.0, 0.0
        return mp_support(self.gamma, self.sigma2)

    @property
    def bulk_fraction(self) -> float:
        """``n_bulk / p``: how much of the spectrum looks like noise."""
        return self.n_bulk / self.p

    @property
    def bulk_energy(self) -> float:
        """Fraction of ``sum(s**2)`` held by the bulk."""
        e = self.singular_values**2
        total = float(e.sum())
        return float(e[self.n_spikes :].sum()) / total if total > 0 else 0.0

    def gate(self, ks_max: float = DEFAULT_KS_MAX) -> float:
        """The effective KS gate of this fit: ``max(ks_max, q_99%(p, gamma))`` (:mod:`.gate`).

        ``q`` is the 99% quantile of the KS statistic of a true MP bulk of this size, so a small
        layer is not refused for the sampling noise of its few values; ``ks_max`` stays the
        tolerance for model misfit (``ks_max = 0`` is the pure test, ``>= 1`` turns the gate off).
        """
        return gate_threshold(self.p, self.gamma, ks_max, alpha=self.alpha)

    @property
    def ks_gate(self) -> float:
        """:meth:`gate` at the default ``ks_max``."""
        return self.gate(DEFAULT_KS_MAX)

    @property
    def ks_pvalue(self) -> float:
        """``P(KS_null >= ks)`` for a true MP bulk of this ``(p, gamma)``, clipped to [0.001, 0.75]."""
        return ks_pvalue(self.ks, self.p, self.gamma, alpha=self.alpha)

    def accepted(self, ks_max: float = DEFAULT_KS_MAX) -> bool:
        """Whether the bulk is MP-like: a positive scale was fitted and ``ks <= gate(ks_max)``."""
        return bool(self.sigma2 > 0 and self.ks <= self.gate(ks_max))

    def to_dict(self, with_singular_values: bool = False) -> dict[str, Any]:
        """Plain-JSON dict of the fit (singular values only on request)."""
        out: dict[str, Any] = {
            "shape": list(self.shape),
            "gamma": self.gamma,
            "sigma2": self.sigma2,
            "lambda_plus": self.lambda_plus,
            "s_plus": self.s_plus,
            "n_spikes": self.n_spikes,
            "n_bulk": self.n_bulk,
            "ks": self.ks,
            "alpha": self.alpha,
            "beta": self.beta,
            "noise": self.noise,
        }
        try:
            out["ks_pvalue"] = self.ks_pvalue
        except ValueError:  # a trim fraction the null table does not cover
            out["ks_pvalue"] = None
        if with_singular_values:
            out["singular_values"] = self.singular_values.tolist()
        return out


def _trim_window(p: int, alpha: float) -> tuple[int, int]:
    """1-based inclusive rank window ``[ceil(alpha p), floor((1 - alpha) p)]``, at least rank 1."""
    lo = max(1, math.ceil(alpha * p))
    hi = math.floor((1.0 - alpha) * p)
    return lo, hi


def _match_ranks(
    lam: np.ndarray, ranks: np.ndarray, p: int, N: int, t_beta: float
) -> tuple[float, float, float]:
    """Quantile-match the ascending eigenvalues ``lam`` of a ``p x N`` noise matrix at ``ranks``.

    ``ranks`` are 1-based ascending ranks of the ``p``-value spectrum. Least squares against the
    MP quantiles gives ``sigma2``; the edge adds the Tracy-Widom margin at ``t_beta``; the KS
    distance is taken over the same ranks. Returns ``(sigma2, lambda_plus, ks)``, with
    ``sigma2 = 0`` when there is no positive bulk to match.
    """
    gamma = p / N
    window = lam[ranks - 1]
    q = mp_ppf((ranks - 0.5) / p, gamma)
    denom = float(q @ q)
    sigma2 = float(q @ window) / denom if denom > 0 else 0.0
    if not sigma2 > 0:
        return 0.0, 0.0, 1.0
    r = math.sqrt(gamma)
    lambda_plus = sigma2 * (
        (1.0 + r) ** 2 + t_beta * N ** (-2.0 / 3.0) * gamma ** (-1.0 / 6.0) * (1.0 + r) ** (4.0 / 3.0)
    )
    f_emp = np.searchsorted(lam, window, side="right") / p
    ks = float(np.max(np.abs(f_emp - mp_cdf(window, gamma, sigma2))))
    return sigma2, lambda_plus, ks


def _match_bulk(
    s_desc: np.ndarray, p: int, N: int, alpha: float, t_beta: float
) -> tuple[float, float, float]:
    """Quantile-match the ``p`` descending singular values of a ``p x N`` noise matrix.

    Returns ``(sigma2, s_plus, ks)``.
    """
    lam = s_desc[::-1] ** 2 / N  # ascending
    lo, hi = _trim_window(p, alpha)
    sigma2, lambda_plus, ks = _match_ranks(lam, np.arange(lo, hi + 1), p, N, t_beta)
    return sigma2, math.sqrt(N * lambda_plus), ks


def fit_bulk(
    singular_values: ArrayLike,
    shape: tuple[int, int],
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    deflate: bool = True,
) -> SpectrumFit:
    """Fit the MP bulk of the singular values of an ``m x n`` matrix (BEMA, standard model).

    Parameters
    ----------
    singular_values : the ``min(m, n)`` singular values, any order.
    shape : ``(m, n)`` of the matrix.
    alpha : trim fraction in (0, 0.5): ranks ``[ceil(alpha p), floor((1 - alpha) p)]`` are matched.
    beta : TW level, the edge is the ``1 - beta`` quantile; in [0.01, 0.99].

    Quantile convention: the k-th smallest eigenvalue (1-based) is matched to the unit MP
    quantile at level ``(k - 0.5) / p``.

    Deflation (``deflate=True``, the default): ``r`` detected spikes shift every bulk rank by up
    to ``r`` (Weyl interlacing), which biases ``sigma2`` up by ``O(r / p)`` (1.4% at ``p = 100``
    with 3 spikes). So the fit is repeated on the ``p - r`` smallest values as the spectrum of a
    ``(p - r) x (N - r)`` noise matrix, the bulk of ``X + rank-r`` being that of the noise with
    the spike directions projected out, until the spike count is stable (a few passes at most;
    only while ``r <= alpha p / 2``, else the one-pass fit stands; ``ks`` is always the one-pass value).
    ``deflate=False`` is the one-pass fit of METHOD.md section 3. ``lambda_plus`` is always
    reported on the full-matrix scale, ``s_plus**2 / N``.

    Raises
    ------
    ValueError
        on a wrong count, non-finite or negative values, parameters out of range, or a spectrum
        too small for the trimmed window to hold a rank.
    """
    m, n = check_shape(shape)
    p, N = min(m, n), max(m, n)
    if not (0.0 < alpha < 0.5):
        raise ValueError(f"alpha={alpha!r} must be in (0, 0.5)")
    if not (0.01 <= beta <= 0.99):
        raise ValueError(f"beta={beta!r} must be in [0.01, 0.99]")
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if s.size != p:
        raise ValueError(f"got {s.size} singular values for shape {(m, n)}; expected min(m, n)={p}")
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values contain NaN or Inf")
    if np.any(s < 0):
        raise ValueError("singular values must be non-negative")
    lo, hi = _trim_window(p, alpha)
    if hi < lo:
        raise ValueError(f"p={p} is too small for alpha={alpha}: the trimmed window is empty")

    gamma = p / N
    s_desc = np.sort(s)[::-1]
    t_beta = float(tw1_quantile(1.0 - beta))
    sigma2, s_plus, ks = _match_bulk(s_desc, p, N, alpha, t_beta)
    if not sigma2 > 0:
        # No positive bulk to match (e.g. most singular values exactly zero): report it as such.
        n_spikes = int(np.count_nonzero(s_desc > 0))
        return SpectrumFit(
            (m, n), gamma, 0.0, 0.0, 0.0, n_spikes, p - n_spikes, 1.0, float(alpha), float(beta), s_desc
        )
    n_spikes = int(np.count_nonzero(s_desc > s_plus))
    if deflate:
        # Refit on the p - r bulk values as a (p - r) x (N - r) noise matrix until the count is stable.
        # Only a small-r correction: past r_cap the spectrum is not "MP bulk + a few spikes" and the
        # one-pass fit stands. ks stays the one-pass value (METHOD.md section 4), so deflation can never
        # make a non-MP spectrum pass the gate.
        r_cap = math.floor(alpha * p / 2)
        one_pass = (sigma2, s_plus, n_spikes)
        seen = {0}
        while n_spikes not in seen and 0 < n_spikes <= r_cap:
            seen.add(n_spikes)
            sig_r, s_plus_r, _ = _match_bulk(s_desc[n_spikes:], p - n_spikes, N - n_spikes, alpha, t_beta)
            if not sig_r > 0:
                break
            sigma2, s_plus = sig_r, s_plus_r
            n_spikes = int(np.count_nonzero(s_desc > s_plus))
        if n_spikes > r_cap:
            sigma2, s_plus, n_spikes = one_pass
    lambda_plus = s_plus**2 / N
    return SpectrumFit(
        shape=(m, n),
        gamma=gamma,
        sigma2=sigma2,
        lambda_plus=lambda_plus,
        s_plus=s_plus,
        n_spikes=n_spikes,
        n_bulk=p - n_spikes,
        ks=ks,
        alpha=float(alpha),
        beta=float(beta),
        singular_values=s_desc,
    )


def fit_censored(s_k: np.ndarray, shape: tuple[int, int], alpha: float, beta: float) -> SpectrumFit | None:
    """BEMA fit of a rank-``k`` matrix whose ``p - k`` smallest singular values were cut to zero.

    The ``k`` kept values are read as the top order statistics of a ``p``-value spectrum: the
    least-squares match of METHOD.md section 3 runs over the ranks of the trimmed window that were
    kept (the cut ones are only known to lie below), the KS distance over the same ranks (the
    zeros count in the empirical cdf, where the cut values would be). With no cut value inside the
    window this is exactly :func:`fit_bulk` on the zero-padded spectrum. Returns None when fewer
    than 5 ranks of the window are kept (nothing left to match).
    """
    m, n = shape
    p, N = min(m, n), max(m, n)
    k = s_k.size
    s_full = np.zeros(p)
    s_full[:k] = np.sort(s_k)[::-1][:p]
    # Not _trim_window: an empty window here means 'nothing kept to match' (None), not an error.
    lo, hi = max(1, math.ceil(alpha * p)), math.floor((1.0 - alpha) * p)
    first_kept = p - k + 1  # ascending 1-based rank of the smallest kept value
    if first_kept <= lo:
        return fit_bulk(s_full, shape, alpha=alpha, beta=beta)
    ranks = np.arange(first_kept, hi + 1)
    if ranks.size < 5:
        return None
    gamma = p / N
    lam = s_full[::-1] ** 2 / N  # ascending
    sigma2, lambda_plus, ks = _match_ranks(lam, ranks, p, N, float(tw1_quantile(1.0 - beta)))
    if not sigma2 > 0:
        return None
    s_plus = math.sqrt(N * lambda_plus)
    n_spikes = int(np.count_nonzero(s_full > s_plus))
    return SpectrumFit(
        (m, n), gamma, sigma2, lambda_plus, s_plus, n_spikes, p - n_spikes, ks, alpha, beta, s_full
    )
