"""Tests of the Marchenko-Pastur law in ``rmtprune.spectral.mp`` against closed forms and scipy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.integrate import IntegrationWarning, quad

from rmtprune.spectral import MarchenkoPastur, mp_cdf, mp_pdf, mp_ppf, mp_support

GAMMAS = [1e-3, 0.01, 0.1, 0.5, 0.9, 0.999, 1.0]
SIGMA2S = [0.3, 1.0, 7.0]

gammas = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
sigma2s = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


def _cdf_by_quadrature(x: float, gamma: float, sigma2: float) -> float:
    """Reference cdf: integrate the density in the angle variable, where it is smooth at both edges."""
    a, b = mp_support(gamma, sigma2)
    theta = np.arccos(np.clip(1.0 - 2.0 * (x - a) / (b - a), -1.0, 1.0))

    def integrand(t: float) -> float:
        u = a + (b - a) * 0.5 * (1.0 - np.cos(t))
        return float(mp_pdf(u, gamma, sigma2)) * (b - a) * 0.5 * np.sin(t)

    # Near gamma = 1 the integrand turns over at angles ~ sqrt(a / b): split there so quad sees it.
    cuts = [c for c in (2.0 * np.sqrt(a / b), 20.0 * np.sqrt(a / b)) if 0.0 < c < theta]
    edges = [0.0, *cuts, theta]
    # quad may warn that roundoff keeps it from its 1e-13 request; the callers' tolerances
    # (1e-10, 1e-8) are the real check, so the warning is noise in the test log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrationWarning)
        return sum(
            quad(integrand, lo, hi, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        )


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("sigma2", SIGMA2S)
def test_cdf_matches_numerical_integration(gamma: float, sigma2: float) -> None:
    a, b = mp_support(gamma, sigma2)
    xs = np.linspace(a, b, 17)[1:-1]
    ref = np.array([_cdf_by_quadrature(x, gamma, sigma2) for x in xs])
    np.testing.assert_allclose(mp_cdf(xs, gamma, sigma2), ref, atol=1e-10)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_pdf_integrates_to_one(gamma: float) -> None:
    a, b = mp_support(gamma, 2.0)
    assert _cdf_by_quadrature(b, gamma, 2.0) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_cdf_exactly_zero_below_and_one_above_support(gamma: float) -> None:
    a, b = mp_support(gamma, 1.5)
    below = np.array([-1.0, 0.0, a * (1 - 1e-9), a]) if a > 0 else np.array([-1.0, 0.0])
    above = np.array([b, b * (1 + 1e-12), b + 1.0, 1e30, np.inf])
    assert np.all(mp_cdf(below, gamma, 1.5) == 0.0)
    assert np.all(mp_cdf(above, gamma, 1.5) == 1.0)
    assert np.all(mp_pdf(np.concatenate([below, above[1:]]), gamma, 1.5) == 0.0)


@pytest.mark.parametrize(
    ("gamma", "sigma2", "edges"),
    [(1.0, 1.0, (0.0, 4.0)), (0.25, 1.0, (0.25, 2.25)), (0.25, 4.0, (1.0, 9.0)), (1e-2, 1.0, (0.81, 1.21))],
)
def test_support_edges(gamma: float, sigma2: float, edges: tuple[float, float]) -> None:
    assert mp_support(gamma, sigma2) == pytest.approx(edges, abs=1e-12)
    assert MarchenkoPastur(gamma, sigma2).support == pytest.approx(edges, abs=1e-12)


def test_vectorised_shapes_and_ppf_endpoints() -> None:
    mp = MarchenkoPastur(0.3, 2.0)
    x = np.linspace(0.0, 5.0, 12).reshape(3, 4)
    assert mp.pdf(x).shape == (3, 4)
    assert mp.cdf(x).shape == (3, 4)
    q = np.linspace(0.0, 1.0, 10).reshape(2, 5)
    out = mp.ppf(q)
    assert out.shape == (2, 5)
    assert out[0, 0] == pytest.approx(mp.support[0])
    assert out[-1, -1] == pytest.approx(mp.support[1])
    assert np.ndim(mp_cdf(1.0, 0.3)) == 0


def test_gamma_one_hard_edge() -> None:
    # At gamma = 1 the density blows up like x**-1/2 at 0: cdf(x) ~ (2 / pi) sqrt(x) for small x.
    x = np.array([1e-10, 1e-8, 1e-6])
    np.testing.assert_allclose(mp_cdf(x, 1.0), 2.0 / np.pi * np.sqrt(x), rtol=1e-3)
    assert mp_ppf(0.0, 1.0) == 0.0
    q = np.array([1e-9, 1e-6, 1e-3, 0.5, 1 - 1e-9])
    np.testing.assert_allclose(mp_cdf(mp_ppf(q, 1.0), 1.0), q, rtol=1e-9, atol=1e-13)
    # Known closed form: median of the unit MP law at gamma = 1 (quarter-circle law of s**2).
    assert float(mp_cdf(mp_ppf(0.5, 1.0), 1.0)) == pytest.approx(0.5, abs=1e-12)


def test_mean_and_variance_by_quadrature() -> None:
    gamma, sigma2 = 0.4, 1.7
    a, b = mp_support(gamma, sigma2)
    m1 = quad(lambda x: x * float(mp_pdf(x, gamma, sigma2)), a, b, limit=200)[0]
    m2 = quad(lambda x: x * x * float(mp_pdf(x, gamma, sigma2)), a, b, limit=200)[0]
    assert m1 == pytest.approx(sigma2, rel=1e-6)
    assert MarchenkoPastur(gamma, sigma2).mean() == sigma2
    assert m2 - m1**2 == pytest.approx(gamma * sigma2**2, rel=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mp_pdf(1.0, 0.0), r"gamma=0\.0"),
        (lambda: mp_cdf(1.0, 1.5), r"gamma=1\.5"),
        (lambda: mp_ppf(0.5, -0.2), r"gamma=-0\.2"),
        (lambda: mp_cdf(1.0, float("nan")), r"gamma=nan"),
        (lambda: mp_pdf(1.0, 0.5, 0.0), r"sigma2=0\.0"),
        (lambda: mp_cdf(1.0, 0.5, -1.0), r"sigma2=-1\.0"),
        (lambda: mp_support(0.5, float("inf")), r"sigma2=inf"),
        (lambda: MarchenkoPastur(2.0), r"gamma=2\.0"),
        (lambda: mp_ppf(1.5, 0.5), r"q=.*1\.5"),
        (lambda: mp_ppf([0.2, -0.1], 0.5), r"q=.*-0\.1"),
        (lambda: mp_ppf(float("nan"), 0.5), r"q=.*nan"),
    ],
)
def test_bad_parameters_raise_with_value(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=60, deadline=None)
@given(gamma=gammas, sigma2=sigma2s)
def test_property_cdf_monotone_in_unit_interval(gamma: float, sigma2: float) -> None:
    a, b = mp_support(gamma, sigma2)
    x = np.linspace(a - 0.1 * (b - a), b + 0.1 * (b - a), 801)
    c = mp_cdf(x, gamma, sigma2)
    assert np.all(np.diff(c) >= 0.0)
    assert c[0] == 0.0 and c[-1] == 1.0
    assert np.all((c >= 0.0) & (c <= 1.0))


@settings(max_examples=60, deadline=None)
@given(gamma=gammas, sigma2=sigma2s, q=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
# Found by hypothesis: a tiny level at a soft edge that is almost hard needed more than 6 Newton steps.
@example(gamma=0.984375, sigma2=1.0, q=[1.0335133235444751e-09])
def test_property_ppf_inverts_cdf(gamma: float, sigma2: float, q: list[float]) -> None:
    q = np.asarray(q)
    x = mp_ppf(q, gamma, sigma2)
    a, b = mp_support(gamma, sigma2)
    assert np.all((x >= a) & (x <= b))
    np.testing.assert_allclose(mp_cdf(x, gamma, sigma2), q, atol=1e-9)
    order = np.argsort(q)
    assert np.all(np.diff(x[order]) >= -1e-12 * b)


@settings(max_examples=25, deadline=None)
@given(gamma=gammas, sigma2=sigma2s)
@example(gamma=0.99999, sigma2=1.0)
def test_property_pdf_integrates_to_one(gamma: float, sigma2: float) -> None:
    # Adaptive quadrature in the angle variable, with no help from the cdf under test.
    _, b = mp_support(gamma, sigma2)
    assert _cdf_by_quadrature(b, gamma, sigma2) == pytest.approx(1.0, abs=1e-8)
