"""BEMA fit on seeded synthetic spiked models: noise scale, spike count, pure-noise false alarms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from _synthetic import SIGMA
from _synthetic import spiked as _spiked
from rmtprune.spectral import DEFAULT_KS_MAX, SpectrumFit, fit_bulk, mp_ppf, tw1_quantile
from rmtprune.spectral.heavy import fit_matrix

NOISES = ["gaussian", "uniform", "sign", "t5"]
# Both orientations (m < n and m > n), gamma from 0.1 to 1.
SHAPES = [(100, 1000), (1000, 100), (300, 600), (600, 300), (500, 500)]
# Student-t(5) entries need the heavy-tail path (spectral/heavy.py): with the TW edge alone, t(5) noise at
# N <= 1000 shows false spikes in ~50% of pure-noise seeds (the largest |entry|, ~20-30 sigma, reaches the
# BBP threshold (N p)**0.25; see docs/spectral.md). So these tests fit through fit_matrix(noise="auto"),
# which keeps the MP/TW fit for light tails and takes the t-matched simulated edge when the tail test fires.
HEAVY = {"t5"}


def _fit(W: np.ndarray, **kw) -> SpectrumFit:
    return fit_bulk(np.linalg.svd(W, compute_uv=False), W.shape, **kw)


def _fit_auto(W: np.ndarray, kind: str, **kw) -> SpectrumFit:
    """fit_matrix(noise="auto"): the tail test must pick the heavy path exactly for the heavy kinds."""
    fit = fit_matrix(W, noise="auto", n_sim=32, **kw)  # 32 nulls: test speed (the default is 32-256)
    assert fit.noise == ("resample" if kind in HEAVY else "mp"), (kind, fit.noise)
    return fit


# Spikes at >= 1.5x or <= 0.7x the BBP threshold: the three strong ones must be found, the weak not.
STRENGTHS = [3.0, 2.0, 1.5, 0.7, 0.5]


@pytest.mark.parametrize("kind", NOISES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_spiked_model_sigma2_and_exact_count(kind: str, shape: tuple[int, int]) -> None:
    # beta = 0.01: the TW margin leaves a ~1% false-alarm chance per matrix, so the count is exact.
    # Heavy tails: the simulated edge at beta = 0.01 would need ~300 nulls (a quantile beyond the
    # largest of 32 draws is not estimable), so beta = 0.1 there and 3 of 4 exact. At p = 100 the
    # 1.5x spike (44.1 sigma at 100 x 1000) sits below the t(5) null's 90% top quantile (~45 sigma):
    # no unconditional edge can count it, so only the two strong ones are required there.
    heavy = kind in HEAVY
    strong = 2 if heavy and min(shape) < 300 else 3
    counts = []
    for seed in range(4):
        fit = _fit_auto(_spiked(seed, kind, shape, STRENGTHS), kind, beta=0.1 if heavy else 0.01)
        assert abs(fit.sigma2 / SIGMA**2 - 1.0) < 0.02, (kind, shape, seed, fit.sigma2)
        assert fit.n_spikes >= strong and fit.n_bulk == min(shape) - fit.n_spikes
        assert fit.ks < 0.05
        counts.append(fit.n_spikes)
    if heavy:
        assert sum(c in (strong, 3) for c in counts) >= 3, (kind, shape, counts)
    else:
        assert counts == [3] * 4, (kind, shape, counts)


@pytest.mark.parametrize("kind", NOISES)
def test_spiked_model_square_at_default_beta(kind: str) -> None:
    hits = 0
    for seed in range(5):
        fit = _fit_auto(_spiked(seed, kind, (500, 500), STRENGTHS), kind)
        assert abs(fit.sigma2 / SIGMA**2 - 1.0) < 0.02
        assert fit.n_spikes >= 3  # strong spikes are never missed
        hits += fit.n_spikes == 3
    assert hits >= 4


@pytest.mark.parametrize("kind", NOISES)
def test_pure_noise_false_alarms(kind: str) -> None:
    zero = total = 0
    for shape in [(100, 1000), (600, 300), (400, 400)]:
        for seed in range(10):
            fit = _fit_auto(_spiked(100 + seed, kind, shape, []), kind, beta=0.1)
            assert abs(fit.sigma2 / SIGMA**2 - 1.0) < (0.03 if kind in HEAVY else 0.02)
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
    assert {
        "shape", "gamma", "sigma2", "lambda_plus", "s_plus", "n_spikes", "n_bulk", "ks", "alpha", "beta",
        "noise",
    } <= set(fit.to_dict())  # fmt: skip
    assert d["noise"] == "mp"


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
