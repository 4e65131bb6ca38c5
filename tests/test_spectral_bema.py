"""BEMA fit on seeded synthetic spiked models: noise scale, spike count, pure-noise false alarms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rmtprune.spectral import DEFAULT_KS_MAX, SpectrumFit, fit_bulk, mp_ppf, tw1_quantile

NOISES = ["gaussian", "uniform", "sign", "student_t5"]
# Both orientations (m < n and m > n), gamma from 0.1 to 1.
SHAPES = [(100, 1000), (1000, 100), (300, 600), (600, 300), (500, 500)]
SIGMA = 1.3
T5_WHY = (
    "t(5) noise at N <= 1000: the largest |entry| (~20-30 sigma) reaches the BBP threshold "
    "(N p)**0.25 (23 at 300 x 1000), so 'pure' t(5) noise carries genuine outliers; even "
    "with the true sigma2 the top eigenvalue sits ~1.3 TW units high (measured). The "
    "entry maximum grows like (N p)**0.2 vs the threshold's (N p)**0.25: convergence is "
    "far too slow for any TW edge to reach 80% here. See docs/spectral.md."
)


def _noise(rng: np.random.Generator, kind: str, m: int, n: int) -> np.ndarray:
    """Unit-variance i.i.d. noise of the given kind."""
    if kind == "gaussian":
        return rng.standard_normal((m, n))
    if kind == "uniform":
        return rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), (m, n))
    if kind == "sign":
        return rng.choice([-1.0, 1.0], (m, n))
    if kind == "student_t5":
        return rng.standard_t(5, (m, n)) / math.sqrt(5.0 / 3.0)
    raise AssertionError(kind)


def _spiked(seed: int, kind: str, shape: tuple[int, int], strengths: list[float]) -> np.ndarray:
    """``sigma * noise + sum theta_i u_i v_i^T``, theta in units of the BBP threshold sigma (N p)**0.25."""
    rng = np.random.default_rng(seed)
    m, n = shape
    W = SIGMA * _noise(rng, kind, m, n)
    if strengths:
        r = len(strengths)
        U, _ = np.linalg.qr(rng.standard_normal((m, r)))
        V, _ = np.linalg.qr(rng.standard_normal((n, r)))
        theta = np.asarray(strengths) * SIGMA * (max(shape) * min(shape)) ** 0.25
        W += (U * theta) @ V.T
    return W


def _fit(W: np.ndarray, **kw) -> SpectrumFit:
    return fit_bulk(np.linalg.svd(W, compute_uv=False), W.shape, **kw)


# Spikes at >= 1.5x or <= 0.7x the BBP threshold: the three strong ones must be found, the weak not.
STRENGTHS = [3.0, 2.0, 1.5, 0.7, 0.5]


@pytest.mark.parametrize("kind", NOISES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_spiked_model_sigma2_and_exact_count(kind: str, shape: tuple[int, int]) -> None:
    # beta = 0.01: the TW margin leaves a ~1% false-alarm chance per matrix, so the count is exact.
    counts = []
    for seed in range(4):
        fit = _fit(_spiked(seed, kind, shape, STRENGTHS), beta=0.01)
        assert abs(fit.sigma2 / SIGMA**2 - 1.0) < 0.02, (kind, shape, seed, fit.sigma2)
        assert fit.n_spikes >= 3 and fit.n_bulk == min(shape) - fit.n_spikes
        assert fit.ks < 0.05
        counts.append(fit.n_spikes)
    if kind == "student_t5" and counts != [3] * 4:
        pytest.xfail(f"t(5) noise: extra outliers from heavy-tailed entries, counts={counts} ({T5_WHY})")
    assert counts == [3] * 4, (kind, shape, counts)


@pytest.mark.parametrize("kind", NOISES)
def test_spiked_model_square_at_default_beta(kind: str) -> None:
    hits = 0
    for seed in range(5):
        fit = _fit(_spiked(seed, kind, (500, 500), STRENGTHS))
        assert abs(fit.sigma2 / SIGMA**2 - 1.0) < 0.02
        assert fit.n_spikes >= 3  # strong spikes are never missed
        hits += fit.n_spikes == 3
    if kind == "student_t5" and hits < 4:
        pytest.xfail(f"t(5) noise: exact count in {hits}/5 seeds ({T5_WHY})")
    assert hits >= 4


@pytest.mark.parametrize(
    "kind",
    [
        "gaussian",
        "uniform",
        "sign",
        pytest.param(
            "student_t5",
            marks=pytest.mark.xfail(
                strict=True,
                reason=T5_WHY,
            ),
        ),
    ],
)
def test_pure_noise_false_alarms(kind: str) -> None:
    zero = total = 0
    for shape in [(100, 1000), (600, 300), (400, 400)]:
        for seed in range(10):
            fit = _fit(_spiked(100 + seed, kind, shape, []), beta=0.1)
            assert abs(fit.sigma2 / SIGMA**2 - 1.0) < 0.02
            assert fit.ks < 0.04 and fit.accepted(DEFAULT_KS_MAX)
            zero += fit.n_spikes == 0
            total += 1
    assert zero >= 0.8 * total, f"{kind}: 0 spikes in only {zero}/{total} seeds"


def test_deflation_removes_spike_bias() -> None:
    # p = 100 with three strong spikes: the one-pass fit is biased up by O(r / p); deflation is not.
    W = _spiked(0, "gaussian", (100, 1000), [3.0, 2.0, 1.5])
    one_pass = _fit(W, deflate=False)
    deflated = _fit(W)
    assert one_pass.sigma2 / SIGMA**2 - 1.0 > 0.008
    assert abs(deflated.sigma2 / SIGMA**2 - 1.0) < abs(one_pass.sigma2 / SIGMA**2 - 1.0)
    assert deflated.n_spikes == one_pass.n_spikes == 3


def test_quantile_convention_t_k_is_k_minus_half_over_p() -> None:
    # A spectrum that is exactly the MP quantiles at (k - 0.5) / p is fitted with sigma2 = 2 and ks = 0.5 / p.
    m, n = 200, 500
    p, N = 200, 500
    k = np.arange(1, p + 1)
    lam = 2.0 * mp_ppf((k - 0.5) / p, p / N)
    fit = fit_bulk(np.sqrt(lam * N), (m, n), deflate=False)
    assert fit.sigma2 == pytest.approx(2.0, rel=1e-12)
    assert fit.ks == pytest.approx(0.5 / p, abs=1e-12)
    # The other common convention, k / (p + 1), would give a different scale.
    lam2 = 2.0 * mp_ppf(k / (p + 1), p / N)
    assert fit_bulk(np.sqrt(lam2 * N), (m, n), deflate=False).sigma2 != pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.05, 0.01])
def test_edge_formula_with_tw_margin(beta: float) -> None:
    m, n = 300, 900
    p, N = 300, 900
    gamma = p / N
    k = np.arange(1, p + 1)
    s = np.sqrt(1.5 * mp_ppf((k - 0.5) / p, gamma) * N)
    fit = fit_bulk(s, (m, n), beta=beta)
    g = math.sqrt(gamma)
    t = tw1_quantile(1.0 - beta)
    expect = fit.sigma2 * ((1 + g) ** 2 + t * N ** (-2 / 3) * gamma ** (-1 / 6) * (1 + g) ** (4 / 3))
    assert fit.lambda_plus == pytest.approx(expect, rel=1e-12)
    assert fit.s_plus == pytest.approx(math.sqrt(N * fit.lambda_plus), rel=1e-12)
    assert fit.n_spikes == 0 and fit.mp_edges[1] < fit.lambda_plus


def test_fit_fields_and_json() -> None:
    W = _spiked(3, "gaussian", (256, 128), [2.0])
    fit = _fit(W)
    assert fit.shape == (256, 128) and fit.gamma == 0.5 and fit.p == 128 and fit.N == 256
    assert fit.n_spikes + fit.n_bulk == 128
    assert np.all(np.diff(fit.singular_values) <= 0)
    assert fit.eigenvalues[0] == pytest.approx(fit.singular_values[0] ** 2 / 256)
    assert 0.0 < fit.bulk_energy < 1.0 and fit.bulk_fraction == fit.n_bulk / 128
    d = json.loads(json.dumps(fit.to_dict(with_singular_values=True)))
    assert d["n_spikes"] == fit.n_spikes and len(d["singular_values"]) == 128
    assert set(fit.to_dict()) == {
        "shape", "gamma", "sigma2", "lambda_plus", "s_plus", "n_spikes", "n_bulk", "ks", "alpha", "beta"
    }  # fmt: skip


def test_zero_bulk_is_reported_not_fitted() -> None:
    s = np.zeros(50)
    s[:3] = [5.0, 4.0, 3.0]
    fit = fit_bulk(s, (50, 80))
    assert fit.sigma2 == 0.0 and fit.n_spikes == 3 and not fit.accepted()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"s": np.ones(5), "shape": (10, 20)}, ValueError, "got 5 singular values"),
        ({"s": np.ones(10), "shape": (10, 20), "alpha": 0.5}, ValueError, r"alpha=0\.5"),
        ({"s": np.ones(10), "shape": (10, 20), "beta": 0.0}, ValueError, r"beta=0\.0"),
        ({"s": np.full(10, np.nan), "shape": (10, 20)}, ValueError, "NaN"),
        ({"s": -np.ones(10), "shape": (10, 20)}, ValueError, "non-negative"),
        ({"s": np.ones(10), "shape": (10,)}, TypeError, "shape="),
        ({"s": np.ones(1), "shape": (1, 20), "alpha": 0.4}, ValueError, "too small"),
    ],
)
def test_bad_input_raises(kwargs: dict, exc: type, match: str) -> None:
    s = kwargs.pop("s")
    shape = kwargs.pop("shape")
    with pytest.raises(exc, match=match):
        fit_bulk(s, shape, **kwargs)
