"""Heavy-tailed self-regularisation metrics of a layer's ESD, as WeightWatcher reports them.

Per layer: the power-law exponent ``alpha`` of the tail of the empirical spectral density (ESD)
with its ``xmin`` and KS distance (Clauset-Shalizi-Newman maximum likelihood with the KS search
over ``xmin``), ``alpha_weighted``, ``log_norm``, ``log_spectral_norm``, ``log_alpha_norm``,
``stable_rank``, ``mp_softrank``, the matrix entropy, the Hill estimator ``PL_Alpha_Hill`` used
by AlphaPruning, and the randomised-weights comparison ("correlation traps"). Model level:
:func:`summarize`, the means WeightWatcher's ``get_summary`` reports. Pure numpy.

Conventions (WeightWatcher 0.7.7, so numbers compare one to one). The ESD here is the
eigenvalues of ``W^T W``, i.e. ``s**2`` *without* the ``1 / N`` of the rest of rmtprune
(``SpectrumFit.eigenvalues``): the norms are then the usual matrix norms (``log_norm`` is the
log10 of the squared Frobenius norm). ``alpha`` does not depend on that scale; ``alpha_xmin`` is on
the ``s**2`` scale (divide by ``N`` for the ``s**2 / N`` scale). As in WeightWatcher, eigenvalues
at or below ``1e-5`` (absolute, on the ``s**2`` scale) are left out of the power-law fit. A conv
weight: rmtprune's ``out x (in*kh*kw)`` matrix, or WW's pooled slices (:func:`conv_eigenvalues`).

References
----------
Clauset, A., Shalizi, C. R. and Newman, M. E. J. (2009). Power-law distributions in empirical
data. SIAM Review 51(4), 661-703. arXiv:0706.1062.
Alstott, J., Bullmore, E. and Plenz, D. (2014). powerlaw: a Python package for analysis of
heavy-tailed distributions. PLoS ONE 9(1), e85777. arXiv:1305.0215.
Martin, C. H. and Mahoney, M. W. (2021). Implicit self-regularization in deep neural networks.
JMLR 22(165), 1-73. arXiv:1810.01075.
Martin, C. H., Peng, T. S. and Mahoney, M. W. (2021). Predicting trends in the quality of
state-of-the-art neural networks without access to training or testing data. Nature
Communications 12, 4122. arXiv:2002.06716.
Lu, H., Zhou, Y., Liu, S., Wang, Z., Mahoney, M. W. and Yang, Y. (2024). AlphaPruning: using
heavy-tailed self regularization theory for improved layer-wise pruning of large language
models. NeurIPS 2024. arXiv:2410.10912.
Hill, B. M. (1975). A simple general approach to inference about the tail of a distribution.
Annals of Statistics 3(5), 1163-1174.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .bema import DEFAULT_ALPHA, MIN_P, SpectrumFit, check_shape, fit_bulk

__all__ = [
    "EVALS_THRESH",
    "PowerLawFit",
    "powerlaw_fit",
    "hill_alpha",
    "ESDMetrics",
    "esd_metrics",
    "conv_eigenvalues",
    "WW_CONV2D_SCALE",
    "TrapReport",
    "correlation_traps",
    "summarize",
]

#: Eigenvalues of ``W^T W`` (absolute) at or below this are left out of the power-law fit (WW: EVALS_THRESH).
EVALS_THRESH = 1e-5
#: Below this many eigenvalues the small-sample rule of WeightWatcher 0.7.7 picks ``xmin``.
SMALL_N = 20
#: The small-sample rule's smallest tail.
SMALL_N_MIN_TAIL = 8
#: TW level of the shuffled spectrum's edge in :func:`correlation_traps` (its 99% quantile).
TRAP_BETA = 0.01
#: WeightWatcher 0.7.7's ``conv2d_norm``: a conv slice is scaled by ``sqrt(1 / 2)``, its eigenvalues by 1/2.
WW_CONV2D_SCALE = 0.5
#: Cells (candidates x eigenvalues) per block of the vectorised xmin search: bounds its memory.
_BLOCK_CELLS = 1 << 21


def _clean(x: float) -> float | None:
    """A float for JSON: NaN and +-Inf become None."""
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power law ``p(x) ~ x**-alpha`` fitted to the tail ``x >= xmin`` of a spectrum.

    Attributes
    ----------
    alpha : maximum-likelihood exponent of the density (CSN 2009 eq. 3.1).
    xmin : start of the tail, the candidate that minimises the KS distance ``D``.
    D : KS distance between the tail's empirical cdf and the fitted power law.
    n_tail : number of eigenvalues ``>= xmin``.
    sigma : standard error ``(alpha - 1) / sqrt(n_tail)``.
    """

    alpha: float
    xmin: float
    D: float  # noqa: N815 - CSN's and WeightWatcher's name
    n_tail: int
    sigma: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (NaN -> None)."""
        return {k: (v if isinstance(v, int) else _clean(v)) for k, v in asdict(self).items()}


def _ks_distances(x: np.ndarray, logx: np.ndarray, cand: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance of the power law ``alphas[c]`` on the tail ``x[cand[c]:]``, for every candidate.

    The empirical cdf at the ``k``-th tail value (0-based) is ``k / n_tail``, its left limit, as in
    the ``powerlaw`` package and WeightWatcher. Blocks of candidates are done as one array
    operation each, so the cost is ``O(n * candidates)`` array work with bounded memory.
    """
    n = x.size
    out = np.full(cand.size, np.inf)
    j = np.arange(n)
    block = max(1, _BLOCK_CELLS // n)
    for b0 in range(0, cand.size, block):
        i = cand[b0 : b0 + block, None]
        a = alphas[b0 : b0 + block, None]
        n_tail = (n - i).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            theo = -np.expm1((1.0 - a) * (logx[None, :] - logx[i]))
            diff = np.abs(theo - (j[None, :] - i) / n_tail)
        diff = np.where(j[None, :] >= i, diff, 0.0)
        d = diff.max(axis=1)
        out[b0 : b0 + block] = np.where(np.isfinite(a[:, 0]) & (a[:, 0] > 1.0), d, np.inf)
    return out


def powerlaw_fit(eigenvalues: ArrayLike, *, xmax: float | None = None, min_tail: int = 2) -> PowerLawFit:
    """Fit a power law to the tail of a spectrum, choosing ``xmin`` by the KS distance (CSN 2009).

    For each candidate ``xmin`` (every eigenvalue whose tail holds at least ``min_tail`` values)
    the exponent is the maximum-likelihood ``alpha = 1 + n / sum(log(x_i / xmin))`` over the tail;
    the fit kept is the one with the smallest KS distance ``D``. All candidates are evaluated in
    vectorised blocks (suffix sums of ``log x`` for the exponents).

    This is WeightWatcher 0.7.7's default fit (``pl_package='WW'``, ``xmax=None``, no
    ``fix_fingers``): same candidates, same exponent, same ``D``. With fewer than 20 eigenvalues it
    uses WW's small-sample rule: tails of at least 8 values and the bias-corrected exponent
    ``1 + (n - 1) / sum(log(x_i / xmin))``, ``xmin`` still minimising ``D`` (WW 0.7.7 also computes an
    objective ``D - 0.868 / sqrt(n)`` but its constructor then re-selects by ``D``; we do what it
    returns).

    Parameters
    ----------
    eigenvalues : the spectrum, any order, any positive scale; non-positive values are dropped.
    xmax : if given, only eigenvalues ``<= xmax`` are fitted (an untruncated fit of the rest).
    min_tail : the smallest tail a candidate ``xmin`` may leave (>= 2).

    Raises
    ------
    ValueError
        on non-finite input, ``min_tail < 2``, or fewer than 2 distinct positive eigenvalues.
    """
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("eigenvalues contain NaN or Inf")
    if int(min_tail) != min_tail or min_tail < 2:
        raise ValueError(f"min_tail={min_tail!r} must be an int >= 2")
    x = np.sort(x[x > 0])
    if xmax is not None:
        x = x[x <= xmax]
    if x.size < 2 or x[0] == x[-1]:
        raise ValueError(f"a power-law fit needs at least 2 distinct positive eigenvalues; got {x.size}")
    n = x.size
    logx = np.log(x)
    small = n < SMALL_N
    tail_min = max(int(min_tail), SMALL_N_MIN_TAIL) if small else int(min_tail)
    cand = np.arange(0, max(n - tail_min + 1, 0))
    if cand.size == 0:
        cand = np.array([0])  # too few values for the rule: the whole spectrum is the tail
    n_tail = (n - cand).astype(np.float64)
    suffix = np.cumsum(logx[::-1])[::-1]
    s = suffix[cand] - n_tail * logx[cand]
    numer = n_tail - 1.0 if small else n_tail
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where(s > 1e-12, 1.0 + numer / s, np.nan)
    D = _ks_distances(x, logx, cand, alphas)
    if not np.isfinite(D).any():
        return PowerLawFit(float("nan"), float(x[0]), float("nan"), n, float("nan"))
    best = int(np.argmin(D))
    alpha = float(alphas[best])
    k = int(n_tail[best])
    return PowerLawFit(alpha, float(x[cand[best]]), float(D[best]), k, (alpha - 1.0) / math.sqrt(k))


def hill_alpha(eigenvalues: ArrayLike, k: int | None = None) -> float:
    """Hill estimator of the tail exponent of the ESD density: ``PL_Alpha_Hill`` of AlphaPruning.

    ``1 + k / sum_{i=1..k} log(x_(i) / x_(k))`` over the ``k`` largest eigenvalues ``x_(1) >= ... >=
    x_(k)``, the smallest of them being the threshold (it adds a zero to the sum). Default
    ``k = n - n // 2``: the threshold is the median eigenvalue, AlphaPruning's (and TempBalance's)
    ``fix_fingers='xmin_mid'`` with ``xmin_pos=2`` (arXiv:2410.10912). WeightWatcher 0.7.7 has no Hill
    estimator. Non-positive eigenvalues are dropped first. Returns NaN for a flat tail.

    Raises
    ------
    ValueError
        on non-finite input, fewer than 2 positive eigenvalues, or ``k`` outside ``[2, n]``.
    """
    x = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("eigenvalues contain NaN or Inf")
    x = np.sort(x[x > 0])
    n = x.size
    if n < 2:
        raise ValueError(f"the Hill estimator needs at least 2 positive eigenvalues; got {n}")
    if k is None:
        k = n - n // 2
    if int(k) != k or not 2 <= k <= n:
        raise ValueError(f"k={k!r} must be an int in [2, {n}]")
    tail = np.log(x[n - int(k) :])
    s = float(np.sum(tail - tail[0]))
    return 1.0 + int(k) / s if s > 0 else float("nan")


@dataclass(frozen=True)
class ESDMetrics:
    """WeightWatcher's per-layer metrics of one matrix, on the ``s**2`` scale (see the module docstring).

    Attributes
    ----------
    alpha, alpha_xmin, alpha_ks, alpha_n_tail : the power-law fit (:func:`powerlaw_fit`).
    alpha_weighted : ``alpha * log10(lambda_max)``, ``lambda_max = s_max**2`` (arXiv:2002.06716).
    log_norm : ``log10(||W||_F**2) = log10(sum s**2)``.
    log_spectral_norm : ``log10(s_max**2)``.
    stable_rank : ``||W||_F**2 / ||W||_2**2``.
    mp_softrank : MP bulk edge (no Tracy-Widom margin) over ``lambda_max``, from a BEMA fit; None without one.
    entropy : spectral entropy of ``s**2 / sum s**2`` over the numerical rank ``r``, divided by ``log r``.
    alpha_hill : :func:`hill_alpha` with its default ``k`` (AlphaPruning's ``PL_Alpha_Hill``).
    log_alpha_norm : ``log10(sum (s**2)**alpha)`` (WW's ``log_alpha_norm``, the Schatten alpha-norm).
    alpha_sigma : the fit's standard error ``(alpha - 1) / sqrt(n_tail)``.
    """

    alpha: float
    alpha_xmin: float
    alpha_ks: float
    alpha_n_tail: int
    alpha_weighted: float
    log_norm: float
    log_spectral_norm: float
    stable_rank: float
    mp_softrank: float | None
    entropy: float
    alpha_hill: float
    log_alpha_norm: float = float("nan")
    alpha_sigma: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (NaN and Inf -> None)."""
        out: dict[str, Any] = {}
        for key, v in asdict(self).items():
            out[key] = v if v is None or isinstance(v, int) else _clean(float(v))
        return out


def _entropy(sq: np.ndarray, N: int) -> float:
    """Spectral entropy of ``sq = s**2`` normalised by the log of the numerical rank.

    The rank counts ``s > s_max * N * eps`` (``numpy.linalg.matrix_rank``'s rule, as WW). WW adds
    ``1e-10`` to every probability and to the rank, which makes a rank-1 matrix's entropy blow up
    (``~23 (p - 1)`` instead of 0); here zero terms are dropped and rank <= 1 has entropy 0.
    """
    s = np.sqrt(sq)
    if s.size == 0 or not s.max() > 0:
        return float("nan")
    r = int(np.count_nonzero(s > s.max() * N * np.finfo(np.float64).eps))
    if r <= 1:
        return 0.0
    q = sq[sq > 0] / sq.sum()
    return float(-np.sum(q * np.log(q)) / math.log(r))


def _log10_sum_pow(sq: np.ndarray, alpha: float) -> float:
    """``log10(sum sq**alpha)`` without overflow (log-sum-exp)."""
    pos = sq[sq > 0]
    if pos.size == 0 or not math.isfinite(alpha):
        return float("nan")
    t = alpha * np.log(pos)
    top = float(t.max())
    return (top + math.log(float(np.exp(t - top).sum()))) / math.log(10.0)


def conv_eigenvalues(weight: ArrayLike) -> np.ndarray:
    """WeightWatcher 0.7.7's ESD of a conv weight ``out x in x kh x kw``: the pooled slice eigenvalues.

    WW (``conv2D_Wmats``, PyTorch layout) reads a 4-D weight as its ``kh * kw`` slices
    ``W[:, :, i, j]`` of shape ``out x in``, computes each slice's ``s**2`` and pools them into one
    spectrum of ``kh * kw * min(out, in)`` eigenvalues, after its default ``conv2d_norm`` has scaled
    every slice by ``sqrt(1 / 2)`` (:data:`WW_CONV2D_SCALE` on the eigenvalues). rmtprune itself reads
    the same weight as one ``out x (in * kh * kw)`` matrix (``min(out, in * kh * kw)`` eigenvalues,
    the matrix whose low-rank factorisation the pruner cuts); the two spectra, and so their power-law
    alphas, differ. This reading makes the metrics compare one to one with WW on conv layers
    (``esd_metrics(..., eigenvalues=conv_eigenvalues(W))``; Martin & Mahoney, arXiv:1810.01075,
    section 4, pool the slices' ESDs the same way).

    Returns the eigenvalues in ascending order (float64; singular values by ``numpy.linalg.svd``).

    Raises
    ------
    ValueError
        if ``weight`` is not a finite 4-D array with a non-empty slice.
    """
    W = np.asarray(weight, dtype=np.float64)
    if W.ndim != 4 or min(W.shape) < 1:
        raise ValueError(f"a conv weight must be 4-D (out, in, kh, kw) and non-empty; got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError("weight contains NaN or Inf")
    slices = np.moveaxis(W, (2, 3), (0, 1))  # kh x kw x out x in: the slices W[:, :, i, j]
    s = np.linalg.svd(slices, compute_uv=False)
    return np.sort(s.ravel() ** 2 * WW_CONV2D_SCALE)


def esd_metrics(
    singular_values: ArrayLike,
    shape: tuple[int, int],
    fit: SpectrumFit | None = None,
    *,
    eigenvalues: ArrayLike | None = None,
) -> ESDMetrics:
    """All per-layer ESD metrics of an ``m x n`` matrix from its singular values (WW 0.7.7 definitions).

    Parameters
    ----------
    singular_values : up to ``min(m, n)`` singular values, any order (missing ones count as zeros).
    shape : ``(m, n)``; ``N = max(m, n)`` sets the numerical-rank tolerance of the entropy.
    fit : a BEMA fit of the same matrix; gives ``mp_softrank`` (None without it, or if its scale is 0).
    eigenvalues : if given, the ESD the metrics are computed from instead of ``singular_values**2``
        (any count, already on the ``s**2`` scale; e.g. :func:`conv_eigenvalues`, WW's reading of a
        conv layer). ``singular_values`` and ``shape`` are still checked and ``shape`` still sets the
        entropy's rank tolerance; ``mp_softrank`` is then None, because ``fit`` is a fit of the
        other spectrum (its bulk edge over this spectrum's ``lambda_max`` would mix two readings).

    The alpha fit is :func:`powerlaw_fit` on the eigenvalues ``s**2 > 1e-5``; with fewer than 2
    distinct ones the alpha fields are NaN (``alpha_n_tail = 0``) and so are ``alpha_weighted``,
    ``log_alpha_norm``; an all-zero matrix gives NaN norms too. WW reports ``-1`` for a failed fit.
    ``mp_softrank`` is WW's ``bulk_max / lambda_max`` with our BEMA bulk (scale from middle
    quantiles, rmtprune's fit) instead of WW's kernel-density fit of ``sigma``; both leave the TW
    margin out.

    Raises
    ------
    ValueError
        on a bad shape, more than ``min(m, n)`` values, negative or non-finite values.
    """
    m, n = check_shape(shape)
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if s.size > min(m, n):
        raise ValueError(f"got {s.size} singular values for shape {(m, n)}; expected at most {min(m, n)}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular values must be finite and non-negative")
    sq = s**2
    if eigenvalues is not None:
        sq = np.asarray(eigenvalues, dtype=np.float64).ravel()
        if not np.all(np.isfinite(sq)) or np.any(sq < 0):
            raise ValueError("eigenvalues must be finite and non-negative")
        fit = None
    nan = float("nan")
    norm = float(sq.sum())
    lam_max = float(sq.max()) if sq.size else 0.0
    log_norm = math.log10(norm) if norm > 0 else nan
    log_spec = math.log10(lam_max) if lam_max > 0 else nan
    try:
        pl = powerlaw_fit(sq[sq > EVALS_THRESH])
    except ValueError:
        pl = PowerLawFit(nan, nan, nan, 0, nan)
    softrank = None
    if fit is not None and fit.sigma2 > 0 and lam_max > 0:
        softrank = float(fit.mp_edges[1] * fit.N / lam_max)
    try:
        a_hill = hill_alpha(sq)
    except ValueError:
        a_hill = nan
    return ESDMetrics(
        alpha=pl.alpha,
        alpha_xmin=pl.xmin,
        alpha_ks=pl.D,
        alpha_n_tail=pl.n_tail,
        alpha_weighted=pl.alpha * log_spec,
        log_norm=log_norm,
        log_spectral_norm=log_spec,
        stable_rank=norm / lam_max if lam_max > 0 else nan,
        mp_softrank=softrank,
        entropy=_entropy(sq, max(m, n)),
        alpha_hill=a_hill,
        log_alpha_norm=_log10_sum_pow(sq, pl.alpha),
        alpha_sigma=pl.sigma,
    )


@dataclass(frozen=True)
class TrapReport:
    """The randomised-ESD comparison of one matrix (WeightWatcher's ``randomize=True``).

    Attributes
    ----------
    rand_max_eigenvalue : top eigenvalue ``s_max**2`` of the entry-shuffled matrix (WW's ``max_rand_eval``).
    rand_mp_edge : the shuffled spectrum's edge on the same scale: BEMA's MP edge plus TW margin, times ``N``.
    n_traps : eigenvalues of the shuffled matrix above that edge (WW's ``rand_num_spikes`` / ``num_traps``).
    rand_distance : Jensen-Shannon distance (natural log, sqrt of the divergence) between the sorted
        eigenvalues of ``W`` and of the shuffled matrix, each normalised to sum 1 (WW's ``rand_distance``).
    """

    rand_max_eigenvalue: float
    rand_mp_edge: float
    n_traps: int
    rand_distance: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (NaN -> None)."""
        return {k: (v if isinstance(v, int) else _clean(v)) for k, v in asdict(self).items()}


def _js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance ``sqrt((KL(p||m) + KL(q||m)) / 2)``, natural log, of two weight vectors."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return math.sqrt(max(0.0, 0.5 * (kl(p) + kl(q))))


def correlation_traps(
    W: np.ndarray, *, seed: int = 0, fit: SpectrumFit | None = None, beta: float = TRAP_BETA
) -> TrapReport:
    """Shuffle the entries of ``W``, and count the shuffled spectrum's eigenvalues above its MP edge.

    Shuffling destroys all correlations between entries and keeps their distribution, so the
    shuffled matrix is a random matrix with the same entries: its ESD should be MP. Eigenvalues
    of the shuffled matrix above the (Tracy-Widom) edge can then only come from a few unusually
    large entries, Martin & Mahoney's "correlation traps" (arXiv:1810.01075; WW ``randomize=True``).
    The edge comes from a BEMA fit of the shuffled spectrum with ``fit``'s trim fraction (rmtprune's
    default without one) and the TW level ``1 - beta``; WW fits its own kernel-density MP fit instead.
    ``beta`` defaults to 0.01, not the 0.1 of the rank rule: at 0.1 a pure-noise matrix would show a
    "trap" one time in ten (measured on MiniLM-L6: 1-2 traps on layers where WW counts none).

    One seeded shuffle (``numpy.random.default_rng(seed).permutation``); WW uses one (five for
    layers with fewer than 100 eigenvalues) unseeded. Singular values by ``numpy.linalg.svd``.

    Raises
    ------
    ValueError
        if ``W`` is not a finite 2-D matrix with ``min(m, n) >= 10`` (too small for an MP fit).
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix; got shape {W.shape}")
    if min(W.shape) < MIN_P:
        raise ValueError(f"W of shape {W.shape} is too small: correlation traps need min(m, n) >= {MIN_P}")
    if not np.all(np.isfinite(W)):
        raise ValueError("W contains NaN or Inf")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(W.ravel()).reshape(W.shape)
    s = np.linalg.svd(W, compute_uv=False)
    s_rand = np.linalg.svd(shuffled, compute_uv=False)
    alpha = fit.alpha if fit is not None else DEFAULT_ALPHA
    rfit = fit_bulk(s_rand, W.shape, alpha=alpha, beta=beta)
    n_big = max(W.shape)
    sq, sq_rand = np.sort(s**2), np.sort(s_rand**2)
    dist = _js_distance(sq, sq_rand) if sq.sum() > 0 else float("nan")
    return TrapReport(
        rand_max_eigenvalue=float(sq_rand[-1]),
        rand_mp_edge=float(rfit.lambda_plus * n_big),
        n_traps=int(rfit.n_spikes),
        rand_distance=dist,
    )


#: What :func:`summarize` averages: WW 0.7.7 ``get_summary``'s list plus ``alpha_hill`` and ``entropy``.
SUMMARY_KEYS = (
    "log_norm",
    "alpha",
    "alpha_weighted",
    "log_alpha_norm",
    "log_spectral_norm",
    "stable_rank",
    "mp_softrank",
    "alpha_hill",
    "entropy",
)


def summarize(metrics: Iterable[ESDMetrics]) -> dict[str, float]:
    """Model-level summary: the mean of each metric over the layers that have it (as WW's ``get_summary``).

    NaN and None values are left out of each mean (WW averages its ``-1`` failure codes in); a
    metric no layer has is absent. Also reports ``n_layers``.
    """
    rows = list(metrics)
    out: dict[str, float] = {"n_layers": float(len(rows))}
    for key in SUMMARY_KEYS:
        vals = [getattr(r, key) for r in rows]
        vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        if vals:
            out[key] = float(np.mean(vals))
    return out
