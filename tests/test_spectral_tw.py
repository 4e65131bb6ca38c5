"""Tracy-Widom (TW1) quantiles: published values and the Fredholm-determinant reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rmtprune.spectral import tw1_quantile

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "make_tw_table.py"


def _reference():
    spec = importlib.util.spec_from_file_location("make_tw_table", TOOLS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("level", "value"), [(0.90, 0.4501), (0.95, 0.9793), (0.99, 2.0234), (0.50, -1.2686)]
)
def test_published_values(level: float, value: float) -> None:
    assert tw1_quantile(level) == pytest.approx(value, abs=1e-3)
    assert round(tw1_quantile(level), 4) == value


def test_random_levels_match_fredholm_reference() -> None:
    ref = _reference()
    levels = np.concatenate([[0.01, 0.99], np.random.default_rng(7).uniform(0.01, 0.99, 8)])
    ours = tw1_quantile(levels)
    theirs = np.array([ref.tw1_quantile(t) for t in levels])
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # In fact far better than the 1e-3 the fit needs.
    np.testing.assert_allclose(ours, theirs, atol=5e-5)


def test_reference_cdf_is_a_distribution() -> None:
    ref = _reference()
    assert 0.0 <= ref.tw1_cdf(-7.0) < 1e-3 and ref.tw1_cdf(6.0) > 1 - 1e-5
    assert ref.tw1_cdf(ref.tw1_quantile(0.9)) == pytest.approx(0.9, abs=1e-10)


def test_vectorised_and_monotone() -> None:
    t = np.linspace(0.01, 0.99, 981)
    q = tw1_quantile(t)
    assert q.shape == t.shape and np.all(np.diff(q) > 0)
    assert isinstance(tw1_quantile(0.9), float)
    assert tw1_quantile(np.array([[0.5, 0.9]])).shape == (1, 2)


@pytest.mark.parametrize("level", [0.0, 0.001, 0.999, 1.0, float("nan"), -0.5])
def test_out_of_range_raises_with_value(level: float) -> None:
    with pytest.raises(ValueError, match=r"level=.*must be in \[0\.005, 0\.995\]"):
        tw1_quantile(level)
