"""Noise models beyond i.i.d. light-tailed entries: a tail test, the BEMA Gamma model, a heavy-tail edge.

The standard fit (:func:`~rmtprune.spectral.bema.fit_bulk`) puts the edge a Tracy-Widom margin above
the MP support. That margin is only right when the entries have light tails: with Student-t(5)
entries the largest |entry| grows like ``(N p)**(1/5)`` against the BBP threshold's ``(N p)**(1/4)``
and pure noise shows false spikes in ~50% of seeds; with tail index below 4 (t(3)) the top
eigenvalues are squares of the largest entries and follow no TW law at all (Soshnikov 2004,
Auffinger, Ben Arous & Peche 2009). This module adds

- :func:`tail_test`: are the entries heavier-tailed than the TW edge tolerates?
- :func:`fit_resample`: the edge as the ``1 - beta`` quantile of the top singular value of null
  matrices whose i.i.d. entries follow a Student-t law matched to the matrix's own entry tail.
- :func:`fit_gamma`: BEMA Algorithm 2 (heteroscedastic rows, ``h ~ Gamma(theta, rate=theta)``).
- :func:`fit_matrix`: one entry point, ``noise="auto"`` picks ``"resample"`` when the tail test fires.

Every simulation is seeded and cached by shape (``functools.lru_cache`` of standardised null
statistics), so the layers of one shape share them. Pure numpy.

References
----------
Ke, Z. T., Ma, Y. and Lin, X. (2023). Estimation of the number of spiked eigenvalues in a covariance
matrix by bulk eigenvalue matching analysis. JASA 118(541), 374-392. arXiv:2006.00436.
Soshnikov, A. (2004). Poisson statistics for the largest eigenvalues of Wigner random matrices with
heavy tails. Electron. Comm. Probab. 9, 82-91. arXiv:math/0405090.
Auffinger, A., Ben Arous, G. and Peche, S. (2009). Poisson convergence for the largest eigenvalues of
heavy tailed random matrices. Ann. IHP 45(3), 589-610. arXiv:0710.3132.
Martin, C. H. and Mahoney, M. W. (2021). Implicit self-regularization in deep neural networks.
JMLR 22(165). arXiv:1810.01075.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .bema import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    SpectrumFit,
    _match_bulk,
    _trim_window,
    check_shape,
    fit_bulk,
)

__all__ = [
    "NOISE_MODELS",
    "TAIL_K",
    "TAIL_RATIO_MAX",
    "TailTest",
    "tail_test",
    "fit_gamma",
    "fit_resample",
    "fit_matrix",
]

#: Noise models accepted by :func:`fit_matrix`.
NOISE_MODELS = ("auto", "mp", "gamma", "resample")
#: Rank of the order statistic of ``|w - median|`` the tail test and the tail match read.
TAIL_K = 128
#: The tail test fires when that order statistic exceeds this multiple of the Gaussian one.
TAIL_RATIO_MAX = 1.15
#: Inverse degrees of freedom ``1 / nu`` of the Student-t nulls (0 = Gaussian); edges between nodes
#: are interpolated linearly. 0.45 (nu = 2.2) is the heaviest tail modelled (finite variance needed).
T_NODES = np.round(np.arange(0.0, 0.451, 0.025), 3)
#: Theta grid of the Gamma model (``h ~ Gamma(theta, rate=theta)``, variance ``1 / theta``).
THETA_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0)
#: Fewest simulated nulls per edge quantile, and the budget of null entries ``n_sim * p * N`` that
#: sets the default between 32 and 256 (more where nulls are cheap: the quantile of a heavy-tailed
#: top is noisy from 32 draws, ~1 sigma at 100 x 2000 with t(5) entries).
DEFAULT_N_SIM = 32
NULL_BUDGET = 32_000_000


def _n_sim(n_sim: int | None, beta: float, p: int, N: int) -> int:
    """``n_sim``, or by default ``clip(NULL_BUDGET / (p N), 32, 256)``, and at least ``3 / beta``."""
    if n_sim is None:
        n = min(256, max(DEFAULT_N_SIM, NULL_BUDGET // (p * N)))
        n = max(n, math.ceil(3.0 / beta - 1e-9))
    else:
        n = int(n_sim)
    if n < 8:
        raise ValueError(f"n_sim={n_sim!r} must be >= 8")
    return n


_LANCZOS_STEPS = 40
_CHUNK = 8


# ----------------------------------------------------------------------------------------------
# Student-t tails
# ----------------------------------------------------------------------------------------------


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Continued fraction of the regularized incomplete beta (modified Lentz), elementwise.

    Converges in ``O(sqrt(max(a, b)))`` steps for ``x < (a + 1) / (a + b + 2)`` (Press et al.,
    Numerical Recipes, section 6.4).
    """
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            step = d * c
            h *= step
        if float(np.max(np.abs(step - 1.0))) < 1e-14:
            break
    return h


def _t_sf2(x: np.ndarray, inv_nu: np.ndarray) -> np.ndarray:
    """``P(|X| > x)`` for unit-variance Student-t ``X`` with ``nu = 1 / inv_nu`` (0: Gaussian), elementwise.

    ``P(|T| > t) = I_y(nu / 2, 1 / 2)`` with ``y = nu / (nu + t**2)``, the regularized incomplete beta
    from its continued fraction (with ``I_y(a, b) = 1 - I_{1-y}(b, a)`` past ``(a + 1) / (a + b + 2)``).
    """
    x, inv_nu = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(inv_nu, dtype=np.float64))
    out = np.empty(x.shape)
    x = np.maximum(x, 1e-12)
    gauss = inv_nu <= 0
    out[gauss] = [math.erfc(v / math.sqrt(2.0)) for v in x[gauss]]
    if np.all(gauss):
        return out
    nu = 1.0 / inv_nu[~gauss]
    y = nu / (nu + x[~gauss] ** 2 * nu / (nu - 2.0))
    a, b = nu / 2.0, np.full_like(nu, 0.5)
    lbeta = np.array([math.lgamma(v) + math.lgamma(0.5) - math.lgamma(v + 0.5) for v in a])
    front = np.exp(a * np.log(y) + b * np.log1p(-y) - lbeta)
    flip = y > (a + 1.0) / (a + b + 2.0)
    direct = front * _betacf(a, b, np.where(flip, 0.5, y)) / a
    mirror = 1.0 - front * _betacf(b, a, np.where(flip, 1.0 - y, 0.5)) / b
    out[~gauss] = np.where(flip, mirror, direct)
    return out


@functools.cache
def _t_sf_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inv_nu grid, x grid, log P(|X_nu| > x))`` for unit-variance t on a fine grid (built once)."""
    grid = np.round(np.arange(0.0, 0.4501, 0.01), 2)
    xs = np.geomspace(0.5, 5000.0, 400)
    sf = _t_sf2(xs[None, :], grid[:, None])
    return grid, xs, np.log(np.maximum(sf, 1e-300))


@functools.lru_cache(maxsize=64)
def _t_quantile_curve(level: float) -> tuple[np.ndarray, np.ndarray]:
    """``(inv_nu grid, x)`` with ``P(|X_nu| > x) = level`` for unit-variance t on a fine ``1 / nu`` grid.

    Interpolated in ``(log x, log P)`` on :func:`_t_sf_table` (relative error < 1e-4).
    """
    grid, xs, log_sf = _t_sf_table()
    target = math.log(level)
    out = np.array([np.interp(-target, -row, np.log(xs)) for row in log_sf])
    return grid, np.exp(out)


def _median(flat: np.ndarray) -> Any:
    """``np.median`` of a 1-D array from one partition (np.median's two-index partition was 6x slower
    on a 30522 x 384 float32 embedding); the same value, in the array's dtype."""
    h = flat.size // 2
    part = np.partition(flat, h)
    if flat.size % 2:
        return part[h]
    return (part[:h].max() + part[h]) / 2


def _tail_stat(W: np.ndarray, sigma2: float) -> tuple[float, float]:
    """``(S, level)``: the ``TAIL_K``-th largest ``|w - median(w)| / sqrt(sigma2)`` and ``TAIL_K / (m n)``.

    Exact, in the weight's own float dtype, without a full sort of ``|w - median|``: a strided
    sample of ``|w - median|`` gives a threshold that about ``16 k`` entries exceed, only those are
    partitioned (the whole array only when fewer than ``k`` pass). On a 30522 x 384 embedding this
    is ~10x faster than partitioning all 11.7M values, and it returns the same order statistic.
    """
    flat = W.ravel()
    n = flat.size
    k = min(TAIL_K, max(1, n // 4))
    med = _median(flat)
    s = None
    if n >= 64 * 16 * k:
        step = max(1, n // 65536)
        sample = np.abs(flat[::step] - med)
        thr = np.quantile(sample, 1.0 - 16.0 * k / n)
        hits = flat[(flat > med + thr) | (flat < med - thr)]
        if hits.size >= k:
            a = np.abs(hits - med)
            s = float(np.partition(a, a.size - k)[a.size - k])
    if s is None:
        a = np.abs(flat - med)
        s = float(np.partition(a, n - k)[n - k])
    return s / math.sqrt(sigma2), k / n


def _gauss_quantile2(level: float) -> float:
    """``g`` with ``P(|Z| > g) = level`` for standard Gaussian ``Z`` (bisection on ``erfc``)."""
    lo, hi = 0.0, 40.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erfc(mid / math.sqrt(2.0)) > level else (lo, mid)
    return 0.5 * (lo + hi)


def _match_inv_nu(stat: float, level: float) -> float:
    """The ``1 / nu`` of the unit-variance t law whose ``level`` two-sided quantile is ``stat``.

    Clipped to ``[0, max(T_NODES)]``: lighter than Gaussian maps to the Gaussian null.
    """
    grid, xs = _t_quantile_curve(round(level, 12))
    xs = np.maximum.accumulate(xs)
    if stat <= xs[0]:
        return 0.0
    if stat >= xs[-1]:
        return float(grid[-1])
    return float(np.interp(stat, xs, grid))


@dataclass(frozen=True)
class TailTest:
    """Outcome of :func:`tail_test`.

    Attributes
    ----------
    stat : the ``k``-th largest ``|w - median(w)|`` in units of the BEMA noise scale ``sqrt(sigma2)``.
    gaussian : the same order statistic's value for Gaussian entries (the two-sided quantile at
        level ``k / (m n)``).
    ratio : ``stat / gaussian``; threshold : the ratio above which ``heavy`` is set.
    inv_nu : ``1 / nu`` of the unit-variance Student-t law with the same quantile (0: Gaussian or
        lighter; only computed when ``heavy``, else 0).
    k : the order statistic's rank; heavy : the verdict; reason : one line for reports.
    """

    stat: float
    gaussian: float
    ratio: float
    threshold: float
    inv_nu: float
    k: int
    heavy: bool
    reason: str


def tail_test(W: np.ndarray, sigma2: float | None = None, threshold: float = TAIL_RATIO_MAX) -> TailTest:
    """Are the entries of ``W`` heavier-tailed than the MP/Tracy-Widom edge tolerates?

    The test: with ``n = m x n`` entries, ``k = 128`` and ``sigma2`` the BEMA noise variance (fitted
    here from the singular values when not given), let ``S`` be the ``k``-th largest of
    ``|w_ij - median(w)| / sqrt(sigma2)`` and ``g`` the two-sided Gaussian quantile at level
    ``k / n`` (``P(|Z| > g) = k / n``). The entries are heavy when ``S > 1.15 g``.

    Why this statistic: the top singular value of i.i.d. noise leaves the TW law through its largest
    entries (a single entry ``a`` makes an outlier once ``a > sqrt(sigma2) (N p)**0.25``), so the test
    looks at the extreme order statistics, in units of the bulk's own scale (robust to spikes, which
    barely move single entries). The 128th largest is far less noisy than the maximum (relative
    spread ~1% for Gaussian entries) yet still counts only extremes. Measured calibration at
    100 x 2000 and 300 x 1000 (``benchmarks/results/heavy_tails.md`` for all shapes): Gaussian
    0.99-1.03 (with or without spikes), uniform and sign 0.5-0.65; Laplace 1.49-1.59, t(5)
    1.67-1.87, t(3) 2.5-3.0.
    """
    W = np.asarray(W)
    if not np.issubdtype(W.dtype, np.floating):
        W = W.astype(np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix, got shape {W.shape}")
    if sigma2 is None:
        sigma2 = fit_bulk(np.linalg.svd(W.astype(np.float64), compute_uv=False), W.shape).sigma2
    if not sigma2 > 0:
        return TailTest(math.nan, math.nan, math.nan, threshold, 0.0, 0, False, "no positive bulk scale")
    stat, level = _tail_stat(W, sigma2)
    gauss = _gauss_quantile2(level)
    ratio = stat / gauss
    heavy = bool(ratio > threshold)
    inv_nu = _match_inv_nu(stat, level) if heavy else 0.0
    k = round(level * W.size)
    reason = (
        f"{k}th largest |w| is {ratio:.2f}x the Gaussian value ({'>' if heavy else '<='} {threshold}): "
        + (f"heavy-tailed (t-matched nu={1 / inv_nu:.1f})" if heavy and inv_nu > 0 else "light-tailed")
    )
    return TailTest(stat, gauss, ratio, threshold, inv_nu, k, heavy, reason)


# ----------------------------------------------------------------------------------------------
# Simulated nulls (cached by shape)
# ----------------------------------------------------------------------------------------------


def _top_eig(G: np.ndarray) -> np.ndarray:
    """Largest eigenvalue of each symmetric PSD matrix in the batch ``G`` (B, p, p).

    Exact (``eigvalsh``) for ``p <= 160``; else batched Lanczos with full reorthogonalisation,
    ``min(p, 40)`` steps from a fixed start (the top Ritz value of a square-root edge converges to
    ~1e-4 relative in 40 steps, far below the Tracy-Widom scale ``N**(-2/3)``; tested).
    """
    B, p, _ = G.shape
    if p <= 160:
        return np.linalg.eigvalsh(G)[:, -1]
    k = min(p, _LANCZOS_STEPS)
    Q = np.zeros((B, k, p))
    a = np.zeros((B, k))
    b = np.zeros((B, k))
    q = np.broadcast_to(np.random.default_rng(12345).standard_normal(p), (B, p)).copy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for j in range(k):
        Q[:, j] = q
        w = (G @ q[:, :, None])[:, :, 0]
        a[:, j] = np.einsum("bi,bi->b", w, q)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w -= np.einsum("bji,bj->bi", Q[:, : j + 1], np.einsum("bji,bi->bj", Q[:, : j + 1], w))
        b[:, j] = np.linalg.norm(w, axis=1)
        q = w / np.maximum(b[:, j], 1e-300)[:, None]
    T = np.zeros((B, k, k))
    idx = np.arange(k)
    T[:, idx, idx] = a
    T[:, idx[:-1], idx[1:]] = b[:, :-1]
    T[:, idx[1:], idx[:-1]] = b[:, :-1]
    return np.linalg.eigvalsh(T)[:, -1]


def _null_grams(rng: np.random.Generator, p: int, N: int, count: int, draw) -> np.ndarray:
    """``count`` Gram matrices ``X X^T`` (float64) of ``p x N`` nulls drawn by ``draw(rng, p, N)``."""
    out = np.empty((count, p, p))
    for i in range(count):
        X = draw(rng, p, N)
        out[i] = X @ X.T
    return out


def _t_draw(inv_nu: float):
    """Sampler of ``p x N`` float32 matrices of unit-variance t(1 / inv_nu) entries (Gaussian at 0)."""

    def draw(rng: np.random.Generator, p: int, N: int) -> np.ndarray:
        Z = rng.standard_normal((p, N), dtype=np.float32)
        if inv_nu <= 0:
            return Z
        nu = 1.0 / inv_nu
        # t = Z sqrt(nu / V), V ~ chi2(nu) = 2 Gamma(nu / 2); times sqrt((nu - 2) / nu) for unit variance.
        V = rng.standard_gamma(nu / 2.0, (p, N), dtype=np.float32)
        Z *= np.sqrt(np.float32((nu - 2.0) / 2.0) / V)
        return Z

    return draw


def _gamma_draw(theta: float):
    """Sampler of ``diag(sqrt(h)) Z`` with ``h ~ Gamma(theta, rate=theta)`` per row (theta=inf: h=1)."""

    def draw(rng: np.random.Generator, p: int, N: int) -> np.ndarray:
        Z = rng.standard_normal((p, N), dtype=np.float32)
        if math.isfinite(theta):
            h = rng.standard_gamma(theta, p) / theta
            Z *= np.sqrt(h).astype(np.float32)[:, None]
        return Z

    return draw


def _seed_rng(seed: int, *key: float) -> np.random.Generator:
    ints = [int(seed), *(int(round(v * 1000)) if math.isfinite(v) else 10**9 for v in key)]
    return np.random.default_rng(np.random.SeedSequence(ints))


@functools.lru_cache(maxsize=128)
def _null_top_t(p: int, N: int, inv_nu: float, seed: int, n_sim: int, alpha: float) -> np.ndarray:
    """Sorted top singular values of ``n_sim`` t nulls of shape ``p x N``, in units of their BEMA scale.

    Each null has unit-variance i.i.d. t entries; the tops are divided by ``sqrt(sigma2_null)``, the
    mean BEMA scale (trim ``alpha``) of the first ``min(4, n_sim)`` nulls, so the edge is a pivot:
    ``sqrt(sigma2_W) * quantile`` carries the estimator's own bias (with t(3) entries the bulk holds
    ~5% less than the variance, the rest sits in the extremes) into the null. Cached.
    """
    rng = _seed_rng(seed, 1.0, p, N, inv_nu)
    tops, scales = [], []
    for start in range(0, n_sim, _CHUNK):
        G = _null_grams(rng, p, N, min(_CHUNK, n_sim - start), _t_draw(inv_nu))
        tops.append(_top_eig(G))
        if start == 0:
            for g in G[: min(4, n_sim)]:
                s_desc = np.sqrt(np.maximum(np.linalg.eigvalsh(g)[::-1], 0.0))
                scales.append(_match_bulk(s_desc, p, N, alpha, 0.0)[0])
    return np.sort(np.sqrt(np.concatenate(tops))) / math.sqrt(float(np.mean(scales)))


@functools.lru_cache(maxsize=128)
def _null_top_gamma(p: int, N: int, theta: float, seed: int, n_sim: int) -> np.ndarray:
    """Sorted top singular values of ``n_sim`` Gamma-model nulls (unit mean variance), cached."""
    rng = _seed_rng(seed, 2.0, p, N, theta)
    tops = []
    for start in range(0, n_sim, _CHUNK):
        G = _null_grams(rng, p, N, min(_CHUNK, n_sim - start), _gamma_draw(theta))
        tops.append(_top_eig(G))
    return np.sort(np.sqrt(np.concatenate(tops)))


@functools.lru_cache(maxsize=256)
def _gamma_quantiles(p: int, N: int, theta: float, seed: int, n_rep: int) -> np.ndarray:
    """Unit-scale null quantiles of the Gamma model at levels ``(k - 0.5) / p``, ``k = 1..p``.

    Average of the sorted eigenvalues ``s**2 / N`` of ``n_rep`` seeded nulls. For ``p > 256`` the
    nulls are ``256 x round(256 N / p)`` (same aspect ratio) and their averaged quantile function is
    interpolated at the ``p`` levels: the bulk quantiles have a size-free limit and the trimmed
    window never reads the edge, so the smaller simulation changes them by ``O(1 / 256)``.
    """
    ps = min(p, 256)
    Ns = max(ps, round(ps * N / p))
    rng = _seed_rng(seed, 3.0, ps, Ns, theta)
    G = _null_grams(rng, ps, Ns, n_rep, _gamma_draw(theta))
    lam = np.linalg.eigvalsh(G).mean(axis=0) / Ns  # ascending
    if ps == p:
        return lam
    return np.interp((np.arange(1, p + 1) - 0.5) / p, (np.arange(1, ps + 1) - 0.5) / ps, lam)


def _edge_quantile(tops: np.ndarray, beta: float) -> float:
    """``1 - beta`` quantile of simulated top values (Weibull plotting positions: unbiased coverage)."""
    return float(np.quantile(tops, 1.0 - beta, method="weibull"))


# ----------------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------------


def _check_sv(singular_values: ArrayLike, shape: tuple[int, int], alpha: float, beta: float) -> np.ndarray:
    """Validate as :func:`fit_bulk` does (it raises the same errors) and return descending values."""
    base = fit_bulk(singular_values, shape, alpha=alpha, beta=beta, deflate=False)
    return base.singular_values


def _with_edge(
    base: SpectrumFit, sigma2: float, s_plus_unit: float, alpha: float, beta: float, noise: str, deflate: bool
) -> SpectrumFit:
    """``base`` (a :func:`fit_bulk` result) with the scale ``sigma2`` and edge ``sqrt(sigma2) s_plus_unit``.

    ``deflate``: as in :func:`fit_bulk`, driven by this edge: with ``r`` values above it, ``sigma2`` is
    refitted (MP quantile match) on the ``p - r`` smallest as a ``(p - r) x (N - r)`` matrix while
    ``r <= alpha p / 2``, and the one-pass fit stands if the count ends above that. ``ks`` stays the
    one-pass standard value of ``base`` (the gate's meaning).
    """
    m, n = base.shape
    p, N = base.p, base.N
    s = base.singular_values
    s_plus = math.sqrt(sigma2) * s_plus_unit
    r = int(np.count_nonzero(s > s_plus))
    r_cap = math.floor(alpha * p / 2)
    one_pass = (sigma2, s_plus, r)
    seen = {0}
    while deflate and r not in seen and 0 < r <= r_cap:
        seen.add(r)
        sig_r = _match_bulk(s[r:], p - r, N - r, alpha, 0.0)[0]
        if not sig_r > 0:
            break
        sigma2, s_plus = sig_r, math.sqrt(sig_r) * s_plus_unit
        r = int(np.count_nonzero(s > s_plus))
    if r > r_cap:  # as in fit_bulk: past r_cap the spectrum is not "bulk + a few spikes"
        sigma2, s_plus, r = one_pass
    return SpectrumFit(
        shape=(m, n),
        gamma=base.gamma,
        sigma2=sigma2,
        lambda_plus=s_plus**2 / N,
        s_plus=s_plus,
        n_spikes=r,
        n_bulk=p - r,
        ks=base.ks,
        alpha=float(alpha),
        beta=float(beta),
        singular_values=s,
        noise=noise,
    )


def fit_resample(
    W: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    n_sim: int | None = None,
    singular_values: ArrayLike | None = None,
) -> SpectrumFit:
    """BEMA fit of ``W`` with a heavy-tail-aware edge from simulated i.i.d. nulls.

    The bulk scale ``sigma2`` is the BEMA quantile match of :func:`fit_bulk` (so ``sigma2`` and
    ``ks`` keep their meaning). The null is ``p x N`` with i.i.d. unit-variance Student-t entries
    whose ``nu`` is matched to ``W``'s own tail: the 128th largest ``|w - median| / sqrt(sigma2)``
    equals the t law's quantile at that level (:class:`TailTest` ``inv_nu``; lighter than Gaussian
    gives the Gaussian null). The edge is ``sqrt(sigma2)`` times the ``1 - beta`` quantile of the
    nulls' top singular value over their own BEMA ``sqrt(sigma2)`` (a pivot), interpolated linearly
    in ``1 / nu`` between the two nearest nodes of :data:`T_NODES`; spikes are ``s > s_plus``;
    deflation as in :func:`fit_bulk`. The edge is floored at the standard fit's (:func:`fit_bulk`,
    the Gaussian null): a heavier-tailed null never has a lower edge, so ``resample`` never counts
    more spikes than ``mp``.

    Why a matched t law and not a bootstrap of the entries: a bootstrap null never exceeds ``W``'s
    own largest entry, so when that entry drives the top singular value (t(3)) the null's quantile
    sits on ``W``'s own top value and about half the pure-noise seeds show a false spike; and a
    per-matrix null could not be shared between layers. The t nulls depend only on
    ``(shape, node, seed, n_sim)`` and are cached: the layers of one shape pay for them once
    (``n_sim`` Grams ``X X^T`` and 40 Lanczos steps each, no SVD). ``n_sim=None``: between 32 and
    256 nulls, ``NULL_BUDGET / (p N)`` (more where they are cheap), and at least ``ceil(3 / beta)``
    (the ``1 - beta`` quantile needs a few draws beyond it).
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix, got shape {W.shape}")
    m, n = W.shape
    p, N = min(m, n), max(m, n)
    n_sim = _n_sim(n_sim, beta, p, N)
    s = np.linalg.svd(W, compute_uv=False) if singular_values is None else singular_values
    base = fit_bulk(s, (m, n), alpha=alpha, beta=beta)
    if not base.sigma2 > 0:
        return _replace_noise(base, "resample")
    inv_nu = _match_inv_nu(*_tail_stat(W, base.sigma2))
    j = int(np.searchsorted(T_NODES, inv_nu, side="right")) - 1
    j = min(max(j, 0), len(T_NODES) - 2)
    lo, hi = float(T_NODES[j]), float(T_NODES[j + 1])
    e_lo = _edge_quantile(_null_top_t(p, N, lo, seed, n_sim, float(alpha)), beta)
    if inv_nu <= lo:
        unit = e_lo
    else:
        e_hi = _edge_quantile(_null_top_t(p, N, hi, seed, n_sim, float(alpha)), beta)
        unit = e_lo + (e_hi - e_lo) * (inv_nu - lo) / (hi - lo)
    sigma2 = fit_bulk(base.singular_values, (m, n), alpha=alpha, beta=beta, deflate=False).sigma2
    fit = _with_edge(base, sigma2, unit, alpha, beta, "resample", deflate=True)
    # Floor: a t null is never lighter than the Gaussian one, so its edge is never below the TW edge of
    # the standard fit. Without it the two deflation loops, started from nearly equal edges, can settle
    # apart (one runs past alpha p / 2 and snaps back to the one-pass count, the other stops below):
    # measured on a MiniLM-L6 value matrix, 19 spikes with mp but 33 with this edge.
    return fit if fit.s_plus >= base.s_plus else _replace_noise(base, "resample")


def _replace_noise(fit: SpectrumFit, noise: str) -> SpectrumFit:
    d = {f: getattr(fit, f) for f in fit.__dataclass_fields__}
    d["noise"] = noise
    return SpectrumFit(**d)


def fit_gamma(
    singular_values: ArrayLike,
    shape: tuple[int, int],
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    n_sim: int | None = None,
    thetas: tuple[float, ...] = THETA_GRID,
    n_rep: int = 4,
) -> SpectrumFit:
    """BEMA Algorithm 2 (Ke, Ma & Lin, arXiv 2006.00436): the Gamma model of heteroscedastic noise.

    Null: ``p x N`` with rows ``sqrt(sigma2 h_i) z_i``, ``z_i`` standard Gaussian and
    ``h_i ~ Gamma(theta, rate=theta)`` (mean 1, variance ``1 / theta``): the ``p`` variables of the
    ``p x p`` Gram matrix have a Gamma population spectrum (KML's model; ``theta = inf`` is MP).
    For each ``theta`` in ``thetas`` (plus ``inf``) the unit-scale null quantiles at levels
    ``(k - 0.5) / p`` are the average sorted eigenvalues of ``n_rep`` seeded nulls; ``sigma2`` is the
    least-squares scale on the trimmed window and ``theta`` the grid value with the smallest
    residual. The edge is ``sqrt(sigma2)`` times the ``1 - beta`` quantile of the top singular value
    of ``n_sim`` nulls at the fitted ``theta`` (true shape); no deflation (the spike count uses the
    one-pass ``sigma2``). ``ks`` is the standard BEMA value of :func:`fit_bulk` (the MP gate).
    Simulations are cached by ``(shape, theta, seed, ...)``.
    """
    m, n = check_shape(shape)
    p, N = min(m, n), max(m, n)
    s = _check_sv(singular_values, (m, n), alpha, beta)
    n_sim = _n_sim(n_sim, beta, p, N)
    base = fit_bulk(s, (m, n), alpha=alpha, beta=beta)
    if not base.sigma2 > 0:
        return _replace_noise(base, "gamma")
    lo, hi = _trim_window(p, alpha)
    window = (s[::-1] ** 2 / N)[lo - 1 : hi]
    best = (math.inf, math.inf, 0.0)
    for theta in (*thetas, math.inf):
        q = _gamma_quantiles(p, N, float(theta), seed, n_rep)[lo - 1 : hi]
        sig = float(q @ window) / float(q @ q)
        resid = float(np.sum((window - sig * q) ** 2))
        if resid < best[0]:
            best = (resid, float(theta), sig)
    _, theta, sigma2 = best
    unit = _edge_quantile(_null_top_gamma(p, N, theta, seed, n_sim), beta)
    return _with_edge(base, sigma2, unit, alpha, beta, "gamma", deflate=False)


def fit_matrix(
    W: np.ndarray,
    noise: str = "auto",
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    singular_values: ArrayLike | None = None,
    n_sim: int | None = None,
) -> SpectrumFit:
    """Fit ``W``'s spectrum under the chosen noise model; ``fit.noise`` says which gave the edge.

    ``"mp"``: :func:`fit_bulk` (i.i.d. light-tailed entries, TW edge). ``"gamma"``: :func:`fit_gamma`.
    ``"resample"``: :func:`fit_resample`. ``"auto"``: ``"resample"`` when :func:`tail_test` says the
    entries are heavy-tailed, else ``"mp"`` (so light-tailed layers are fitted exactly as before).
    Pass ``singular_values`` when already computed; ``n_sim`` (default: by shape, see
    :func:`fit_resample`) goes to the simulated models.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise={noise!r} must be one of {NOISE_MODELS}")
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix, got shape {W.shape}")
    s = np.linalg.svd(W, compute_uv=False) if singular_values is None else np.asarray(singular_values)
    if noise == "gamma":
        return fit_gamma(s, W.shape, alpha=alpha, beta=beta, seed=seed, n_sim=n_sim)
    if noise == "resample":
        return fit_resample(W, alpha=alpha, beta=beta, seed=seed, singular_values=s, n_sim=n_sim)
    base = fit_bulk(s, W.shape, alpha=alpha, beta=beta)
    if noise == "auto" and base.sigma2 > 0 and tail_test(W, sigma2=base.sigma2).heavy:
        return fit_resample(W, alpha=alpha, beta=beta, seed=seed, singular_values=s, n_sim=n_sim)
    return base
