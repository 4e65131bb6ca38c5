"""Tests of the heavy-tailed ESD metrics (spectral/esd_metrics.py): exact answers on planted spectra."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rmtprune.spectral import fit_bulk
from rmtprune.spectral.esd_metrics import (
    ESDMetrics,
    PowerLawFit,
    TrapReport,
    conv_eigenvalues,
    correlation_traps,
    esd_metrics,
    hill_alpha,
    powerlaw_fit,
    summarize,
)


def pareto(alpha: float, n: int, xmin: float = 1.0, seed: int = 0) -> np.ndarray:
    """Samples of the density ``(alpha - 1) xmin**(alpha - 1) x**-alpha`` on ``[xmin, inf)``."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [1.8, 2.5, 4.0])
@pytest.mark.parametrize("n", [400, 2000])
def test_powerlaw_fit_recovers_alpha_of_pareto_samples(alpha: float, n: int) -> None:
    fit = powerlaw_fit(pareto(alpha, n, seed=n))
    # the xmin search keeps a tail of n_tail values; the MLE's sd is (alpha - 1) / sqrt(n_tail)
    assert fit.n_tail >= 20
    assert abs(fit.alpha - alpha) < 4 * (alpha - 1) / math.sqrt(fit.n_tail) + 0.02
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail))
    assert 0 < fit.D < 0.1


def test_powerlaw_fit_finds_a_planted_break() -> None:
    # a uniform body below 1 and a Pareto(3) tail above it: xmin lands at the break
    rng = np.random.default_rng(3)
    body = rng.uniform(0.01, 1.0, 1500)
    tail = pareto(3.0, 1500, xmin=1.0, seed=4)
    fit = powerlaw_fit(np.concatenate([body, tail]))
    assert 0.95 <= fit.xmin <= 1.3
    assert abs(fit.alpha - 3.0) < 0.25
    assert 1000 <= fit.n_tail <= 1510


def test_powerlaw_fit_is_scale_free_and_order_free() -> None:
    x = pareto(2.5, 500, seed=9)
    a, b = powerlaw_fit(x), powerlaw_fit(1e-3 * x[::-1])
    assert b.alpha == pytest.approx(a.alpha, rel=1e-9)
    assert b.xmin == pytest.approx(1e-3 * a.xmin, rel=1e-9)
    assert b.n_tail == a.n_tail


def test_powerlaw_fit_matches_the_brute_force_definition() -> None:
    # the vectorised search against a literal loop over candidates (the CSN/WW definition)
    x = np.sort(np.random.default_rng(5).lognormal(0, 1, 120))
    best = (np.inf, 0.0, 0.0)
    for i in range(x.size - 1):
        t = x[i:]
        a = 1 + t.size / np.sum(np.log(t / t[0]))
        d = np.max(np.abs(1 - (t / t[0]) ** (1 - a) - np.arange(t.size) / t.size))
        best = min(best, (d, a, t[0]))
    fit = powerlaw_fit(x)
    assert (fit.D, fit.alpha, fit.xmin) == pytest.approx(best, rel=1e-9)


def test_powerlaw_fit_xmax_and_min_tail() -> None:
    x = pareto(2.0, 800, seed=2)
    cut = powerlaw_fit(x, xmax=float(np.quantile(x, 0.9)))
    assert cut.n_tail < powerlaw_fit(x).n_tail + 1
    assert powerlaw_fit(x, min_tail=700).n_tail >= 700


def test_powerlaw_fit_small_sample_rule() -> None:
    # fewer than 20 values: tails of >= 8 and the (n - 1) bias-corrected exponent
    x = pareto(3.0, 12, seed=7)
    fit = powerlaw_fit(x)
    assert fit.n_tail >= 8
    t = np.sort(x)[-fit.n_tail :]
    assert fit.alpha == pytest.approx(1 + (t.size - 1) / np.sum(np.log(t / t[0])))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0], "at least 2"),
        ([0.0, 0.0, 0.0], "at least 2"),
        ([2.0, 2.0, 2.0], "at least 2"),
        ([1.0, np.nan], "NaN"),
    ],
)
def test_powerlaw_fit_rejects_degenerate_input(values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        powerlaw_fit(values)


def test_powerlaw_fit_rejects_bad_min_tail() -> None:
    with pytest.raises(ValueError, match="min_tail=1"):
        powerlaw_fit([1.0, 2.0, 3.0], min_tail=1)


def test_hill_alpha_on_pareto_and_its_k() -> None:
    x = pareto(2.5, 4000, seed=11)
    assert abs(hill_alpha(x) - 2.5) < 0.1  # default k: tail from the median
    assert abs(hill_alpha(x, k=200) - 2.5) < 0.35
    # definition: 1 + k / sum log(x_i / x_(k)) over the k largest
    top = np.sort(x)[-50:]
    assert hill_alpha(x, k=50) == pytest.approx(1 + 50 / np.sum(np.log(top / top[0])))
    with pytest.raises(ValueError, match="k=1 must be"):
        hill_alpha(x, k=1)
    assert math.isnan(hill_alpha([3.0, 3.0, 3.0]))


def test_norm_metrics_on_a_closed_form_matrix() -> None:
    s = np.array([4.0, 2.0, 1.0, 1.0])  # e.g. diag(s) padded to 4 x 6
    m = esd_metrics(s, (4, 6))
    assert m.log_norm == pytest.approx(math.log10(16 + 4 + 1 + 1))
    assert m.log_spectral_norm == pytest.approx(math.log10(16))
    assert m.stable_rank == pytest.approx(22 / 16)
    assert m.mp_softrank is None  # no fit given
    assert m.alpha_weighted == pytest.approx(m.alpha * math.log10(16))
    assert m.log_alpha_norm == pytest.approx(math.log10(np.sum((s**2) ** m.alpha)))


def test_entropy_flat_vs_rank_one() -> None:
    assert esd_metrics(np.ones(50), (50, 80)).entropy == pytest.approx(1.0)
    assert esd_metrics(np.r_[5.0, np.zeros(49)], (50, 80)).entropy == 0.0
    mid = esd_metrics(np.linspace(1, 10, 50), (50, 80)).entropy
    assert 0.5 < mid < 1.0


def test_esd_metrics_on_gaussian_noise_with_fit() -> None:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((200, 400))
    s = np.linalg.svd(W, compute_uv=False)
    m = esd_metrics(s, W.shape, fit=fit_bulk(s, W.shape))
    # pure noise: the MP edge is (about) the top eigenvalue, and the tail is steep
    assert 0.9 < m.mp_softrank < 1.1
    assert m.alpha > 3.0
    assert m.alpha_n_tail >= 2
    assert m.log_norm == pytest.approx(math.log10(np.sum(W**2)))


def test_esd_metrics_degenerate_inputs() -> None:
    zero = esd_metrics(np.zeros(8), (8, 8))
    assert math.isnan(zero.alpha) and zero.alpha_n_tail == 0
    assert math.isnan(zero.log_norm) and math.isnan(zero.entropy)
    d = zero.to_dict()
    assert d["alpha"] is None and d["log_norm"] is None and d["alpha_n_tail"] == 0
    tiny = esd_metrics([3.0, 1.0, 0.5], (3, 5))  # p < 10 still gives numbers
    assert math.isfinite(tiny.alpha) and tiny.alpha_n_tail == 3
    with pytest.raises(ValueError, match="at most 3"):
        esd_metrics(np.ones(4), (3, 5))
    with pytest.raises(ValueError, match="non-negative"):
        esd_metrics([1.0, -1.0], (2, 2))


def test_json_round_trip() -> None:
    m = esd_metrics(np.linspace(1, 3, 30), (30, 40), fit=None)
    d = json.loads(json.dumps(m.to_dict()))
    assert set(d) == {f for f in ESDMetrics.__dataclass_fields__}
    assert d["alpha"] == pytest.approx(m.alpha) and d["mp_softrank"] is None
    f = PowerLawFit(float("nan"), 1.0, float("inf"), 0, 0.5).to_dict()
    assert f == {"alpha": None, "xmin": 1.0, "D": None, "n_tail": 0, "sigma": 0.5}
    t = TrapReport(2.0, 1.5, 1, float("nan")).to_dict()
    assert json.loads(json.dumps(t)) == {
        "rand_max_eigenvalue": 2.0,
        "rand_mp_edge": 1.5,
        "n_traps": 1,
        "rand_distance": None,
    }


def test_correlation_traps_gaussian_has_none() -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal((120, 200))
    counts = [correlation_traps(W, seed=k).n_traps for k in range(5)]
    assert sum(c == 0 for c in counts) >= 4
    rep = correlation_traps(W, seed=0)
    assert rep.rand_max_eigenvalue <= rep.rand_mp_edge * 1.05
    assert rep.rand_distance < 0.05  # a shuffled Gaussian matrix has the same ESD


def test_correlation_traps_planted_heavy_entry_and_rank_one() -> None:
    rng = np.random.default_rng(2)
    W = rng.standard_normal((120, 200))
    W[3, 7] = 60.0  # one huge entry survives shuffling: a trap
    rep = correlation_traps(W, seed=0)
    assert rep.n_traps >= 1 and rep.rand_max_eigenvalue > rep.rand_mp_edge
    # rank-one structure is a correlation: shuffling removes it, so the ESDs differ, with no trap
    u, v = rng.standard_normal(120), rng.standard_normal(200)
    S = rng.standard_normal((120, 200)) + 0.5 * np.outer(u, v)
    r1 = correlation_traps(S, seed=0)
    assert r1.n_traps == 0
    assert r1.rand_distance > correlation_traps(rng.standard_normal((120, 200)), seed=0).rand_distance


def test_correlation_traps_is_seeded_and_checks_input() -> None:
    W = np.random.default_rng(4).standard_normal((30, 50))
    assert correlation_traps(W, seed=3) == correlation_traps(W, seed=3)
    with pytest.raises(ValueError, match="too small"):
        correlation_traps(np.ones((5, 20)))
    with pytest.raises(ValueError, match="2-D"):
        correlation_traps(np.ones(20))


def test_summarize_means_skip_missing_values() -> None:
    a = esd_metrics(np.linspace(1, 4, 40), (40, 60))
    b = esd_metrics(np.zeros(10), (10, 10))  # alpha and norms NaN
    out = summarize([a, b])
    assert out["n_layers"] == 2.0
    assert out["alpha"] == pytest.approx(a.alpha)
    assert out["log_norm"] == pytest.approx(a.log_norm)
    assert "mp_softrank" not in out  # no layer has one
    json.dumps(out)


def test_conv_eigenvalues_is_the_pooled_per_slice_spectrum() -> None:
    W = np.random.default_rng(3).standard_normal((12, 5, 3, 2))
    slices = [np.linalg.svd(W[:, :, i, j], compute_uv=False) ** 2 for i in range(3) for j in range(2)]
    want = np.sort(np.concatenate(slices)) * 0.5  # WW 0.7.7's conv2d_norm: each slice times sqrt(1/2)
    got = conv_eigenvalues(W)
    assert got.shape == (3 * 2 * 5,)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # a 1x1 conv is the matrix out x in, eigenvalues halved
    W1 = W[:, :, :1, :1]
    np.testing.assert_allclose(
        conv_eigenvalues(W1), np.sort(np.linalg.svd(W1[:, :, 0, 0], compute_uv=False) ** 2) / 2
    )
    with pytest.raises(ValueError, match="4-D"):
        conv_eigenvalues(W[:, :, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        conv_eigenvalues(np.full((2, 2, 1, 1), np.nan))


def test_esd_metrics_from_eigenvalues() -> None:
    X = np.random.default_rng(4).standard_normal((60, 40))
    s = np.linalg.svd(X, compute_uv=False)
    fit = fit_bulk(s, X.shape)
    base = esd_metrics(s, X.shape, fit=fit)
    same = esd_metrics(s, X.shape, fit=fit, eigenvalues=s**2)
    assert base.mp_softrank is not None and same.mp_softrank is None  # the fit is of the other spectrum
    assert same.to_dict() == {**base.to_dict(), "mp_softrank": None}
    ev = conv_eigenvalues(np.random.default_rng(5).standard_normal((20, 8, 3, 3)))
    m = esd_metrics(s, X.shape, eigenvalues=ev)  # any count: 72 eigenvalues for a 60 x 40 shape
    assert math.isclose(m.log_norm, math.log10(ev.sum())) and m.alpha == powerlaw_fit(ev).alpha
    with pytest.raises(ValueError, match="eigenvalues"):
        esd_metrics(s, X.shape, eigenvalues=[1.0, -1.0])


def test_conv_ww_changes_only_the_metrics_of_4d_weights() -> None:
    import torch

    from rmtprune.analysis import analyze, analyze_tensor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3), torch.nn.Flatten(), torch.nn.Linear(64, 40))
    a, b = analyze(model), analyze(model, conv="ww")
    assert [la.name for la in a.layers] == [la.name for la in b.layers] == ["0", "2"]
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.verdict, x.fit, list(x.s)) == (y.verdict, y.fit, list(y.s))
    assert a.layers[1].metrics == b.layers[1].metrics  # the Linear layer
    W = model[0].weight.detach().double().numpy()
    want = esd_metrics(a.layers[0].s, (32, 144), eigenvalues=conv_eigenvalues(W))
    assert b.layers[0].metrics == want and b.layers[0].metrics.alpha != a.layers[0].metrics.alpha
    t_ww = analyze_tensor("conv", W, conv="ww")  # numpy path, and the tensor path agree
    assert t_ww.metrics.alpha == analyze_tensor("conv", model[0].weight, conv="ww").metrics.alpha
    assert t_ww.metrics.alpha == want.alpha and t_ww.verdict == analyze_tensor("conv", W).verdict
    with pytest.raises(ValueError, match="conv="):
        analyze(model, conv="slices")
    with pytest.raises(ValueError, match="conv="):
        analyze_tensor("conv", W, conv="slices")
