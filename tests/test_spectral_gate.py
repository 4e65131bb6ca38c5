"""The KS gate calibrated by size (spectral/gate.py): the table, its lookup, its level on true MP bulks."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import eigvalsh_tridiagonal

from rmtprune.spectral import DEFAULT_ALPHA, DEFAULT_KS_MAX, fit_bulk
from rmtprune.spectral import gate as G

ROOT = Path(__file__).resolve().parents[1]


def _bidiagonal_sv(rng: np.random.Generator, p: int, N: int) -> np.ndarray:
    """Singular values of a p x N real Gaussian matrix by the Dumitriu-Edelman bidiagonal model."""
    d2 = rng.chisquare(N - np.arange(p))
    e2 = rng.chisquare(np.arange(p - 1, 0, -1))
    diag = d2.copy()
    diag[:-1] += e2
    return np.sqrt(np.maximum(eigvalsh_tridiagonal(diag, np.sqrt(d2[1:] * e2)), 0.0))


def _null_fits(p: int, N: int, n: int, seed: int, dense: bool) -> list:
    rng = np.random.default_rng([seed, p, N])
    out = []
    for _ in range(n):
        if dense:
            s = np.linalg.svd(rng.standard_normal((p, N) if seed % 2 else (N, p)), compute_uv=False)
        else:
            s = _bidiagonal_sv(rng, p, N)
        out.append(fit_bulk(s, (p, N) if seed % 2 else (N, p)))
    return out


def test_table_parses_and_matches_the_generator() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    env = dict(os.environ)
    try:
        import make_ks_table as gen
    finally:  # the generator pins BLAS threads for its own run: not for the tests after this one
        sys.path.remove(str(ROOT / "benchmarks"))
        os.environ.clear()
        os.environ.update(env)
    data = json.loads(G.TABLE_PATH.read_text(encoding="utf-8"))
    assert data["format"] == G.TABLE_FORMAT == gen.TABLE_FORMAT and gen.TABLE_PATH == G.TABLE_PATH
    assert data["p"] == list(gen.P_GRID) and data["gamma"] == list(gen.GAMMAS)
    assert data["alpha"] == list(gen.ALPHAS) and data["levels"] == list(gen.LEVELS)
    assert data["samples"] == [gen.samples_for(p) for p in gen.P_GRID]  # the full run, not --quick
    table = G.null_table()
    q = np.exp(table.log_q)
    assert q.shape == (len(gen.ALPHAS), len(gen.P_GRID), len(gen.GAMMAS), len(gen.LEVELS))
    assert np.all((q > 0) & (q <= 1)) and np.all(np.diff(q, axis=-1) >= 0)
    assert G.TABLE_PATH.stat().st_size < 40_000  # small, text
    bad = dict(data, format="other")
    with pytest.raises(ValueError, match="not a KS null table"):
        G.parse_table(bad)
    with pytest.raises(ValueError, match="shape"):
        G.parse_table(dict(data, levels=data["levels"][:-1]))


def test_lookup_at_grid_points_equals_the_table() -> None:
    data = json.loads(G.TABLE_PATH.read_text(encoding="utf-8"))
    for a in data["alpha"]:
        for i, p in enumerate(data["p"]):
            for j, g in enumerate(data["gamma"]):
                want = data["quantiles"][f"{a:g}"][i][j]
                got = [G.ks_threshold(p, g, eps=1 - lv, alpha=a) for lv in data["levels"]]
                np.testing.assert_allclose(got, want, rtol=1e-9)


def test_threshold_shrinks_with_p_and_is_the_pure_test_at_ks_max_0() -> None:
    ps = np.unique(np.geomspace(24, 100_000, 60).astype(int))
    for g in (0.01, 0.05, 0.3, 0.5, 0.9, 1.0):
        for a in (0.2, DEFAULT_ALPHA, 0.33):
            q = np.array([G.ks_threshold(int(p), g, alpha=a) for p in ps])
            assert np.all(np.diff(q) <= 1e-12), (g, a)
            assert q[-1] > 0 and q[-1] < 2e-4  # extrapolated beyond p = 1024, still shrinking like ~p^-0.9
    # The small layers the fixed 0.1 gate refused for their sampling noise alone.
    assert G.ks_threshold(10, 0.5) > 0.15 and G.ks_threshold(1024, 0.5) < 0.01
    for p, g in ((10, 0.5), (37, 0.21), (700, 0.8), (5000, 0.02)):
        q = G.ks_threshold(p, g)
        assert G.gate_threshold(p, g, 0.0) == q
        assert G.gate_threshold(p, g, DEFAULT_KS_MAX) == max(DEFAULT_KS_MAX, q)
        assert G.ks_threshold(p, g, eps=0.001) > q > G.ks_threshold(p, g, eps=0.05)
    assert G.gate_threshold(10, 0.5, math.inf) == math.inf  # the gate off needs no table: any alpha
    assert G.gate_threshold(10, 0.5, math.inf, alpha=0.05) == math.inf


def test_true_mp_bulks_are_refused_about_1_percent_by_the_pure_test() -> None:
    # Off-grid (p, N), both orientations; dense Gaussian noise up to p = 70, the bidiagonal model above.
    cells = [(10, 37, 300, True), (13, 13, 300, True), (20, 150, 300, True), (40, 57, 300, True),
             (70, 180, 300, True), (300, 700, 150, False), (1000, 1300, 40, False)]  # fmt: skip
    refused, pvalues = 0, []
    for k, (p, N, n, dense) in enumerate(cells):
        fits = _null_fits(p, N, n, seed=k, dense=dense)
        r = sum(not f.accepted(0.0) for f in fits)
        # At a true level of 1%, P(refused > bound) is 1.0e-3, 8.5e-4 and 6.9e-4 (binomial) for 300, 150, 40.
        assert r <= {300: 9, 150: 6, 40: 3}[n], (p, N, r)
        assert all(f.accepted() for f in fits if f.accepted(0.0))  # the default gate is looser
        refused += r
        pvalues += [f.ks_pvalue for f in fits]
    n_all = len(pvalues)
    assert 3 <= refused <= 0.02 * n_all  # ~1%, and not a gate so loose that nothing is refused
    pv = np.array(pvalues)
    for level in (0.05, 0.1, 0.25, 0.5):  # p-values roughly uniform on the null
        assert abs(np.mean(pv <= level) - level) < 5 * math.sqrt(level * (1 - level) / n_all), level


def test_the_fixed_gate_refused_small_true_mp_bulks() -> None:
    fits = _null_fits(10, 20, 200, seed=1, dense=True)
    old = np.mean([f.ks > DEFAULT_KS_MAX for f in fits])
    new = np.mean([not f.accepted() for f in fits])
    assert old > 0.3 and new <= 0.02


def test_fit_reports_its_gate_and_pvalue() -> None:
    fits = _null_fits(12, 30, 200, seed=3, dense=True)
    f = next(f for f in fits if DEFAULT_KS_MAX < f.ks <= G.ks_threshold(12, f.gamma))
    assert f.accepted() and f.ks_gate == f.gate() == G.ks_threshold(12, f.gamma) > DEFAULT_KS_MAX
    d = f.to_dict()
    assert d["ks_pvalue"] == f.ks_pvalue and 0.01 < f.ks_pvalue < 0.75
    msg = G.gate_message(f, DEFAULT_KS_MAX)
    assert msg.startswith(f"ks={f.ks:.3f} <= gate ") and "ks_max=0.1" in msg and "p=12" in msg
    worst = max(fits, key=lambda x: x.ks)
    strict = G.gate_message(worst, 0.0)
    assert not worst.accepted(0.0) and " > gate " in strict and "ks_max=0.0" in strict
    big = _null_fits(200, 400, 1, seed=0, dense=True)[0]
    assert big.ks_gate == DEFAULT_KS_MAX and "p-value" in G.gate_message(big, DEFAULT_KS_MAX)
    assert G.gate_message(big, math.inf).endswith("the gate is off)")


def test_pvalue_ends_and_monotonicity() -> None:
    t = G.null_table()
    assert G.ks_pvalue(1.0, 50, 0.5) == t.pvalue_floor == 0.001
    assert G.ks_pvalue(0.0, 50, 0.5) == t.pvalue_ceiling == 0.75
    assert G.format_pvalue(G.ks_pvalue(1.0, 50, 0.5)) == "< 0.001"
    assert G.format_pvalue(G.ks_pvalue(0.0, 50, 0.5)) == "> 0.75"
    ks = np.linspace(0.0, 0.2, 200)
    pv = [G.ks_pvalue(k, 50, 0.5) for k in ks]
    assert np.all(np.diff(pv) <= 0)
    q99 = G.ks_threshold(50, 0.5)
    assert G.ks_pvalue(q99, 50, 0.5) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: G.ks_threshold(0, 0.5), r"p=0 must be a positive integer"),
        (lambda: G.ks_threshold(10.5, 0.5), r"p=10.5 must be a positive integer"),
        (lambda: G.ks_threshold(10, 1.5), r"gamma=1.5 must be in \(0, 1\]"),
        (lambda: G.ks_threshold(10, 0.5, eps=0.9), r"eps=0.9 must be in \[0.001, 0.75\]"),
        (lambda: G.ks_threshold(10, 0.5, alpha=0.5), r"alpha=0.5 must be in \(0, 0.5\)"),
        (lambda: G.ks_pvalue(1.5, 10, 0.5), r"ks=1.5 must be in \[0, 1\]"),
        (lambda: G.gate_threshold(10, 0.5, -0.1), r"ks_max=-0.1 must be >= 0"),
    ],
)
def test_bad_queries_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_untabulated_alpha() -> None:
    # Every alpha the fit accepts has a gate: outside the table's 0.1-0.4 the nearest column is read.
    s = np.linalg.svd(np.random.default_rng(0).standard_normal((40, 80)), compute_uv=False)
    fit = fit_bulk(s, (40, 80), alpha=0.05)
    assert fit.to_dict()["ks_pvalue"] == G.ks_pvalue(fit.ks, 40, 0.5, alpha=0.1)
    assert fit.accepted() and fit.accepted(math.inf)
    assert G.ks_threshold(64, 0.5, alpha=0.45) == G.ks_threshold(64, 0.5, alpha=0.4)
    q = [G.ks_threshold(64, 0.5, alpha=a) for a in (0.2, 0.22, 0.25)]
    assert min(q[0], q[2]) <= q[1] <= max(q[0], q[2])  # interpolated between tabulated alphas


def test_default_alpha_is_bemas() -> None:
    assert G._DEFAULT_ALPHA == DEFAULT_ALPHA
