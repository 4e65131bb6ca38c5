"""The generalized Marchenko-Pastur edge: where the spectrum of whitened noise ``R S`` ends.

Data-aware truncation (SVD-LLM, arXiv:2403.07378) cuts the SVD of ``W S``, with ``S S^T = C`` the
input second moment of the layer. If ``W = signal + R`` with ``R`` (``m x n``) i.i.d. of entry
variance ``sigma2``, the whitened noise ``R S`` is no longer i.i.d.: ``s_i(R S)**2 / m`` are the
eigenvalues of ``C^{1/2} R^T R C^{1/2} / m``, a sample covariance of ``N = m`` samples in dimension
``n`` with population covariance ``T = sigma2 C``. Its limiting spectrum is the generalized MP law,
given through its Stieltjes transform by the Silverstein equation: the companion transform ``v``
of ``x`` solves ``x = z(v)`` with

    z(v) = -1/v + ratio * sum_j w_j t_j / (1 + t_j v),      ratio = n / N,

``t_j`` the eigenvalues of ``T`` with weights ``w_j`` (``1 / n`` each for a matrix). On
``(-1 / t_max, 0)`` the function ``z`` is convex and tends to ``+inf`` at both ends; its minimum is
the upper edge of the support, ``x_plus = z(v*)`` with ``z'(v*) = 0`` (Silverstein & Choi 1995).
Near that edge ``x - x_plus ~ z''(v*) (v - v*)**2 / 2``, so the density is a square root, and the
largest eigenvalue fluctuates on the Tracy-Widom scale

    sigma_N = N**(-2/3) * (z''(v*) / 2)**(1/3),
    z''(v*) / 2 = 1 / |v*|**3 + ratio * sum_j w_j t_j**3 / (1 + t_j v*)**3,

that is ``(lambda_max - x_plus) / sigma_N -> TW1`` for real data (El Karoui 2007 for complex
Gaussian data, Lee & Schnelli 2016 and Bao, Pan & Zhou 2015 for real data with general entries),
provided the edge is regular (``1 + t_max v*`` bounded away from 0). For ``T = t I`` this is
``x_plus = t (1 + sqrt(ratio))**2`` and ``sigma_N = t N**(-2/3) ratio**(-1/6) (1 + sqrt(ratio))**(4/3)``,
Johnstone's scale that :mod:`.bema` uses (METHOD.md section 3), for any ratio.

When ``max(t)`` stands far above the rest (a BBP-supercritical spike of ``C``), ``v*`` lies close to
``-1 / t_max`` and ``x_plus`` is the upper edge of the small separate piece of mass ``1 / n`` that
the spike contributes; the top eigenvalue is then an outlier with Gaussian fluctuations of the width
of that piece (Baik, Ben Arous & Peche 2005; Paul 2007), not TW1, and the TW margin is only a
heuristic on top of an edge that is already that piece's upper end.

References
----------
Marchenko, V. A. and Pastur, L. A. (1967). Mat. Sb. 72(114), 507-536.
Silverstein, J. W. and Bai, Z. D. (1995). On the empirical distribution of eigenvalues of a class
of large dimensional random matrices. J. Multivariate Anal. 54, 175-192.
Silverstein, J. W. and Choi, S.-I. (1995). Analysis of the limiting spectral distribution of large
dimensional random matrices. J. Multivariate Anal. 54, 295-309.
El Karoui, N. (2007). Tracy-Widom limit for the largest eigenvalue of a large class of complex
sample covariance matrices. Ann. Probab. 35(2), 663-714. arXiv:math/0503109.
Lee, J. O. and Schnelli, K. (2016). Tracy-Widom distribution for the largest eigenvalue of real
sample covariance matrices with general population. Ann. Appl. Probab. 26(6). arXiv:1409.4979.
Bao, Z., Pan, G. and Zhou, W. (2015). Universality for the largest eigenvalue of sample covariance
matrices with general population. Ann. Statist. 43(1), 382-421. arXiv:1304.5690.
Wang, X. et al. (2024). SVD-LLM: truncation-aware singular value decomposition for large language
model compression. arXiv:2403.07378.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from .bema import DEFAULT_BETA, check_shape
from .tracy_widom import tw1_quantile

__all__ = ["gmp_edge", "gmp_tw_scale", "whitened_noise_edge"]

# Safeguarded Newton in _solve: it stops once a step is at rounding level (1-6 steps measured on
# identity, two-level, geometric, power-law, log-normal and spiked spectra); the cap only bounds a
# pathological case, where bisection alone would take about 60.
_MAX_STEPS = 200
_EPS = float(np.finfo(np.float64).eps)
# Relative tolerance on the weights' sum.
_WEIGHT_TOL = 1e-8
# Eigenvalues from eigvalsh of a positive semi-definite matrix carry rounding of order eps * max: values
# down to -_NEG_TOL * max are read as 0, anything more negative is an error.
_NEG_TOL = 1e-9


def _clip_rounding(t: np.ndarray, name: str) -> np.ndarray:
    """``t`` with rounding-level negatives (``>= -_NEG_TOL * max(t)``) set to 0; others raise."""
    floor = -_NEG_TOL * max(float(t.max()), 0.0)
    if np.any(t < floor):
        raise ValueError(
            f"{name} must be >= 0 (eigenvalues of a positive semi-definite matrix); min is {float(t.min())!r}"
        )
    return np.maximum(t, 0.0)


def _population(
    population: ArrayLike, weights: ArrayLike | None, ratio: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Check the arguments; return ``(t, w, ratio)`` with zero-weight entries dropped."""
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise TypeError(f"ratio={ratio!r} must be a number (n / N)") from None
    if not (math.isfinite(ratio) and ratio > 0.0):
        raise ValueError(f"ratio={ratio!r} must be a finite positive number (n / N)")
    try:
        t = np.asarray(population, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise TypeError("population must be an array of numbers (the eigenvalues of T)") from None
    if t.size == 0:
        raise ValueError("population is empty: give the eigenvalues of the population covariance T")
    if not np.all(np.isfinite(t)):
        raise ValueError("population contains NaN or Inf")
    t = _clip_rounding(t, "population")
    if weights is None:
        w = np.full(t.size, 1.0 / t.size)
    else:
        try:
            w = np.asarray(weights, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise TypeError("weights must be an array of numbers") from None
        if w.size != t.size:
            raise ValueError(f"weights has {w.size} entries; population has {t.size}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and >= 0")
        if abs(float(w.sum()) - 1.0) > _WEIGHT_TOL:
            raise ValueError(f"weights must sum to 1; they sum to {float(w.sum())!r}")
    keep = (w > 0) & (t > 0)  # zero eigenvalues and zero weights add nothing to z(v)
    return t[keep], w[keep], ratio


def _solve(t: np.ndarray, w: np.ndarray, ratio: float) -> tuple[float, float]:
    """Minimise ``z`` on ``(-1 / t_max, 0)``: return ``(x_plus, (z''(v*) / 2)**(1/3))``.

    ``t`` must be non-empty and positive. With ``tau = t / t_max`` in ``(0, 1]`` write
    ``v = -y / (t_max (1 + y))``, ``y`` in ``(0, inf)`` (``y -> inf`` is the pole at ``-1 / t_max``), and
    ``d_j = 1 + (1 - tau_j) y``. Then ``z'(v) = 0`` reads ``G(y) = 1`` with

        G(y) = sqrt(ratio * sum_j w_j (tau_j y / d_j)**2),

    increasing from 0 and close to linear (exactly so for ``T = t I``), so Newton converges in a few
    steps. ``tau_j y / d_j <= tau_j y`` and the ``t_max`` term alone gives ``G >= sqrt(ratio w_top) y``,
    so the root lies in ``[1 / sqrt(ratio sum w tau**2), 1 / sqrt(ratio w_top)]``: Newton starts at the
    left end and a step leaving the (shrinking) bracket is replaced by its midpoint. At the root

        x_plus = t_max (1 + y) (1 / y + ratio * sum_j w_j tau_j / d_j),
        z''(v*) / 2 = t_max**3 (1 + y)**3 (1 / y**3 + ratio * sum_j w_j (tau_j / d_j)**3),

    with no cancellation however close ``v*`` comes to the pole.
    """
    t_max = float(t.max())
    tau = t / t_max
    rw = ratio * w
    one_minus = 1.0 - tau
    lo = 1.0 / math.sqrt(float(rw @ (tau * tau)))
    hi = 1.0 / math.sqrt(float(rw[tau == 1.0].sum()))
    y = lo
    for _ in range(_MAX_STEPS):
        d = 1.0 + one_minus * y
        rho = tau / d  # (tau y / d) / y
        f = float(rw @ (rho * rho))  # G(y)**2 / y**2
        g = y * math.sqrt(f) - 1.0
        if g == 0.0:
            break
        if g > 0.0:
            hi = min(hi, y)
        else:
            lo = max(lo, y)
        # d/dy (tau y / d)**2 = 2 (tau y / d) * tau / d**2, so G' = y * sum(rw rho**2 / d) / G
        dg = float(rw @ (rho * rho / d)) / math.sqrt(f)
        y_new = y - g / dg
        if not (lo <= y_new <= hi):
            y_new = 0.5 * (lo + hi)
        done = abs(y_new - y) <= 4.0 * _EPS * y
        y = y_new
        if done:
            break
    u = tau / (1.0 + one_minus * y)
    x_plus = t_max * (1.0 + y) * (1.0 / y + float(rw @ u))
    zeta = t_max * (1.0 + y) * (1.0 / y**3 + float(rw @ (u * u * u))) ** (1.0 / 3.0)
    return x_plus, zeta


def gmp_edge(population: ArrayLike, ratio: float, weights: ArrayLike | None = None) -> float:
    """Upper edge ``x_plus`` of the limiting spectrum of ``B = T^{1/2} Z Z^T T^{1/2} / N``.

    ``Z`` is ``n x N`` with i.i.d. unit-variance entries, ``ratio = n / N`` (any positive value; above
    1, ``B`` has ``n - N`` zero eigenvalues and the edge is that of its nonzero ones), and ``T`` has
    the eigenvalues ``population`` (``>= 0``) with ``weights`` (default ``1 / n`` each; they must sum
    to 1). The edge is ``min z(v)`` over ``v`` in ``(-1 / t_max, 0)`` with
    ``z(v) = -1/v + ratio * sum_j w_j t_j / (1 + t_j v)`` (Silverstein & Choi 1995), found by a
    safeguarded Newton search for ``z'(v) = 0``; float64, ``O(n)`` per step, a few steps (under a
    millisecond for ``n = 4096`` on one core).

    For ``T = t I`` it is the MP edge ``t (1 + sqrt(ratio))**2``. Zero eigenvalues of ``T`` only
    enter through their weight; with ``T = 0`` the edge is 0. Negative values at rounding level
    (``>= -1e-9 max(population)``, as ``eigvalsh`` returns for a singular covariance) count as 0.

    Raises
    ------
    ValueError
        on an empty, negative or non-finite population, ``ratio <= 0``, or weights of the wrong length,
        negative, or not summing to 1.
    """
    t, w, ratio = _population(population, weights, ratio)
    if t.size == 0:
        return 0.0
    return _solve(t, w, ratio)[0]


def gmp_tw_scale(population: ArrayLike, ratio: float, N: int, weights: ArrayLike | None = None) -> float:
    """Tracy-Widom scale ``sigma_N`` of the largest eigenvalue of ``B`` at the edge of :func:`gmp_edge`.

    ``(lambda_max(B) - x_plus) / sigma_N`` tends to TW1 for real data (El Karoui 2007; Lee & Schnelli
    2016), with ``N`` the number of samples (the columns of ``Z``) and

        sigma_N = N**(-2/3) * (z''(v*) / 2)**(1/3),
        z''(v*) / 2 = 1 / |v*|**3 + ratio * sum_j w_j t_j**3 / (1 + t_j v*)**3,

    read off the square-root edge ``x - x_plus ~ z''(v*) (v - v*)**2 / 2`` of the companion law, whose
    ``N`` eigenvalues then have density ``sqrt(2 (x_plus - x) / z''(v*)) / pi`` there, the GOE edge
    scaled. For ``T = I`` this is Johnstone's ``N**(-2/3) ratio**(-1/6) (1 + sqrt(ratio))**(4/3)``,
    the scale of :func:`rmtprune.spectral.fit_bulk` (METHOD.md section 3). The limit needs a regular
    edge; at a spike of ``T`` far above the rest the top eigenvalue is a Gaussian outlier instead
    (see the module docstring).
    """
    try:
        N = int(N)
    except (TypeError, ValueError):
        raise TypeError(f"N={N!r} must be an int (the number of samples)") from None
    if N < 1:
        raise ValueError(f"N={N!r} must be a positive int (the number of samples)")
    t, w, ratio = _population(population, weights, ratio)
    if t.size == 0:
        return 0.0
    return N ** (-2.0 / 3.0) * _solve(t, w, ratio)[1]


def whitened_noise_edge(
    sigma2: float,
    cov_eigenvalues: ArrayLike,
    shape: tuple[int, int],
    beta: float = DEFAULT_BETA,
) -> float:
    """Largest singular value of whitened noise ``R S`` at Tracy-Widom level ``1 - beta``.

    ``R`` is ``m x n`` with i.i.d. entries of variance ``sigma2`` (the BEMA ``sigma2`` of ``W``'s own
    spectrum, :attr:`SpectrumFit.sigma2`); ``S`` is any square root of the input second moment
    ``C = S S^T`` (e.g. its Cholesky factor, SVD-LLM arXiv:2403.07378), given by the ``n`` eigenvalues
    ``cov_eigenvalues`` of ``C``. ``s_i(R S)**2 / m`` follow the generalized MP law with ``N = m``,
    ``ratio = n / m`` and ``T = sigma2 C``, so the edge is

        s_plus_whitened = sqrt(m * (x_plus + tw1_quantile(1 - beta) * sigma_N))

    with ``x_plus`` from :func:`gmp_edge` and ``sigma_N`` from :func:`gmp_tw_scale`. For ``C = I`` it
    equals the ``s_plus`` of :func:`rmtprune.spectral.fit_bulk` for the same ``sigma2``, shape and
    beta, for ``m >= n`` and ``m < n`` alike (the MP edge and Johnstone's scale are symmetric in the
    two sides once multiplied back to singular values). Negative eigenvalues at rounding level
    (``>= -1e-9 max``) count as 0. The margin is TW1's only at a regular edge: where one eigenvalue of
    ``C`` stands far above the rest the top singular value of ``R S`` is a Gaussian outlier and the
    edge is conservative (module docstring).

    Raises
    ------
    ValueError
        on ``sigma2`` not finite and ``>= 0``, a ``shape`` that is not two positive ints, a number of
        eigenvalues other than ``n``, negative or non-finite eigenvalues, or ``beta`` outside
        [0.01, 0.99].
    """
    try:
        sigma2 = float(sigma2)
    except (TypeError, ValueError):
        raise TypeError(f"sigma2={sigma2!r} must be a number (the noise variance per entry)") from None
    if not (math.isfinite(sigma2) and sigma2 >= 0.0):
        raise ValueError(f"sigma2={sigma2!r} must be a finite number >= 0")
    m, n = check_shape(shape)
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"beta={beta!r} must be a number in [0.01, 0.99]") from None
    if not (0.01 <= beta <= 0.99):
        raise ValueError(f"beta={beta!r} must be in [0.01, 0.99]")
    c = np.asarray(cov_eigenvalues, dtype=np.float64).ravel()
    if c.size != n:
        raise ValueError(f"cov_eigenvalues has {c.size} entries; shape {(m, n)} needs n={n}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cov_eigenvalues contains NaN or Inf")
    t, w, ratio = _population(_clip_rounding(c, "cov_eigenvalues"), None, n / m)
    if sigma2 == 0.0 or t.size == 0:
        return 0.0
    x_plus, zeta = _solve(t, w, ratio)  # T = sigma2 C, N = m: both scale linearly in sigma2
    lam = sigma2 * (x_plus + float(tw1_quantile(1.0 - beta)) * m ** (-2.0 / 3.0) * zeta)
    return math.sqrt(m * max(lam, 0.0))
