"""Rank rules: one decision record for bema, gavish_donoho, energy and fixed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rmtprune.spectral import (
    RULES,
    BemaRule,
    EnergyRule,
    FixedRule,
    GavishDonohoRule,
    RankDecision,
    RankRule,
    RuleParam,
    fit_bulk,
    gavish_donoho_lambda_star,
    gavish_donoho_omega,
    make_rule,
    register_rule,
)


def _planted(seed: int, shape: tuple[int, int], rank: int, sigma: float = 1.0) -> np.ndarray:
    """Rank-``rank`` signal with singular values 3x the noise edge, plus i.i.d. Gaussian noise."""
    rng = np.random.default_rng(seed)
    m, n = shape
    U, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    strength = 3.0 * sigma * (math.sqrt(m) + math.sqrt(n)) * np.linspace(1.0, 2.0, rank)
    return (U * strength) @ V.T + sigma * rng.standard_normal((m, n))


@pytest.fixture(scope="module")
def spectrum() -> tuple[np.ndarray, tuple[int, int]]:
    W = _planted(0, (300, 500), 7)
    return np.linalg.svd(W, compute_uv=False), W.shape


@pytest.mark.parametrize(
    "rule",
    [BemaRule(), GavishDonohoRule(), GavishDonohoRule(sigma=1.0), EnergyRule(0.9), FixedRule(ratio=0.1)],
)
def test_planted_rank_and_record(rule, spectrum) -> None:
    s, shape = spectrum
    d = rule.select(s, shape)
    assert isinstance(d, RankDecision) and d.rule == rule.name and d.p == 300
    assert 0 <= d.rank <= d.p and d.reason
    out = json.loads(json.dumps(d.to_dict()))
    assert out["rule"] == rule.name and out["rank"] == d.rank and out["params"] == rule.params()
    if rule.name in ("bema", "gavish_donoho"):
        assert d.rank == 7


@pytest.mark.parametrize("keep_bulk", [0.0, 0.25, 1.0])
def test_bema_keeps_spikes_plus_bulk_fraction(keep_bulk: float, spectrum) -> None:
    s, shape = spectrum
    fit = fit_bulk(s, shape)
    d = BemaRule(keep_bulk=keep_bulk).select(s, shape, fit=fit)
    assert d.n_spikes == fit.n_spikes == 7
    assert d.rank == 7 + math.floor(keep_bulk * fit.n_bulk)
    assert d.threshold == fit.s_plus
    assert BemaRule(keep_bulk=keep_bulk).select(s, shape).rank == d.rank  # computes the fit itself


@pytest.mark.parametrize("b", [0.1, 0.3, 0.5, 0.75, 1.0])
def test_gavish_donoho_formulas(b: float) -> None:
    assert gavish_donoho_omega(b) == pytest.approx(0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43)
    lam = math.sqrt(2 * (b + 1) + 8 * b / ((b + 1) + math.sqrt(b**2 + 14 * b + 1)))
    assert gavish_donoho_lambda_star(b) == pytest.approx(lam)
    # Square case of the paper: lambda*(1) = 4 / sqrt(3), omega(1) ~ 2.858.
    if b == 1.0:
        assert gavish_donoho_lambda_star(1.0) == pytest.approx(4 / math.sqrt(3))
        assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=5e-3)


@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
def test_gavish_donoho_thresholds(shape: tuple[int, int]) -> None:
    s = np.linalg.svd(_planted(1, shape, 5, sigma=0.5), compute_uv=False)
    b = 300 / 500
    unknown = GavishDonohoRule().select(s, shape)
    assert unknown.threshold == pytest.approx(gavish_donoho_omega(b) * np.median(s))
    known = GavishDonohoRule(sigma=0.5).select(s, shape)
    assert known.threshold == pytest.approx(gavish_donoho_lambda_star(b) * math.sqrt(500) * 0.5)
    assert unknown.rank == known.rank == 5


def test_energy_rule(spectrum) -> None:
    s, shape = spectrum
    e = np.cumsum(s**2) / np.sum(s**2)
    for frac in (0.5, 0.9, 0.99):
        d = EnergyRule(frac).select(s, shape)
        assert e[d.rank - 1] >= frac and (d.rank == 1 or e[d.rank - 2] < frac)
    assert EnergyRule(1.0).select(s, shape).rank == 300
    assert EnergyRule(0.5).select(np.zeros(300), shape).rank == 0


def test_fixed_rule(spectrum) -> None:
    s, shape = spectrum
    assert FixedRule(ratio=0.25).select(s, shape).rank == 75
    assert FixedRule(ratio=1e-6).select(s, shape).rank == 1
    assert FixedRule(rank=40).select(s, shape).rank == 40
    with pytest.raises(ValueError, match=r"rank=400 must be in \[1, 300\]"):
        FixedRule(rank=400).select(s, shape)


@pytest.mark.parametrize(
    ("name", "params", "exc", "match"),
    [
        ("bema", {"keep_bulk": 1.5}, ValueError, r"keep_bulk=1\.5 must be in \[0, 1\]"),
        ("gavish_donoho", {"sigma": -1.0}, ValueError, r"sigma=-1\.0"),
        ("energy", {"fraction": 0.0}, ValueError, r"fraction=0\.0 must be in \(0, 1\]"),
        ("fixed", {"ratio": 2.0}, ValueError, r"ratio=2\.0 must be in \(0, 1\]"),
        ("fixed", {"rank": 0}, ValueError, "rank=0 must be >= 1"),
        ("fixed", {}, ValueError, "exactly one of ratio"),
        ("fixed", {"ratio": 0.5, "rank": 3}, ValueError, "exactly one of ratio"),
        ("nope", {}, ValueError, "rule='nope' is unknown"),
        ("energy", {"frac": 0.5}, TypeError, "bad parameters for rule 'energy'"),
    ],
)
def test_make_rule_errors(name: str, params: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make_rule(name, **params)


def test_make_rule_builds_each(spectrum) -> None:
    s, shape = spectrum
    for name, params in [
        ("bema", {}),
        ("gavish_donoho", {}),
        ("energy", {"fraction": 0.8}),
        ("fixed", {"rank": 3}),
    ]:
        d = make_rule(name, **params).select(s, shape)
        assert d.rule == name


def test_wrong_count_raises(spectrum) -> None:
    s, _ = spectrum
    with pytest.raises(ValueError, match="got 300 singular values"):
        EnergyRule().select(s, (100, 200))


def test_rules_own_their_parameters_and_gate() -> None:
    assert [name for name, cls in RULES.items() if cls.gated] == ["bema"]
    assert EnergyRule.parameters["fraction"].field == "energy"
    assert EnergyRule(0.8).params() == {"fraction": 0.8} and EnergyRule().fraction == 0.9
    assert BemaRule(0.5).params() == {"keep_bulk": 0.5, "alpha": 0.25, "beta": 0.1}
    with pytest.raises(ValueError, match=r"alpha=0\.5 must be in \(0, 0\.5\)"):
        BemaRule(alpha=0.5)
    with pytest.raises(TypeError, match="takes 1 parameter"):
        EnergyRule(0.5, 0.6)


class _TopFraction(RankRule):
    """Keep the top ``share`` of the singular values (a rule with a parameter of its own)."""

    parameters = {"share": RuleParam(0.5, lambda name, v: float(v))}

    def select(self, s, shape, fit=None) -> RankDecision:
        p = min(shape)
        rank = max(1, int(self.share * p))
        return RankDecision(self.name, rank, p, params=self.params(), reason=f"top {self.share:g}")


def test_register_rule() -> None:
    assert register_rule("top_fraction", _TopFraction) is _TopFraction
    try:
        assert _TopFraction.name == "top_fraction" and not _TopFraction.gated
        d = make_rule("top_fraction", share=0.25).select(np.ones(40), (40, 60))
        assert (d.rule, d.rank, d.params) == ("top_fraction", 10, {"share": 0.25})
        with pytest.raises(ValueError, match="built in and cannot be replaced"):
            register_rule("bema", _TopFraction)
        with pytest.raises(ValueError, match="differs from name='other'"):
            register_rule("other", _TopFraction)
        with pytest.raises(TypeError, match="must be a RankRule subclass"):
            register_rule("x", int)  # type: ignore[arg-type]
    finally:
        RULES.pop("top_fraction", None)
