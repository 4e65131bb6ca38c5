"""CompressionConfig: defaults, validation messages, JSON round trip, patterns and overrides."""

from __future__ import annotations

import pytest

from rmtprune.config import CompressionConfig, match_pattern
from rmtprune.spectral import BemaRule, EnergyRule, FixedRule, GavishDonohoRule


def test_defaults() -> None:
    c = CompressionConfig()
    assert (c.rule, c.keep_bulk, c.alpha, c.beta, c.ks_max, c.min_rank) == ("bema", 0.0, 0.25, 0.1, 0.1, 1)
    assert c.factor_only_if_smaller is True and c.dense_truncate is False
    assert c.include == [] and c.exclude == [] and c.overrides == {}


def test_json_round_trip(tmp_path) -> None:
    c = CompressionConfig(
        rule="fixed",
        ratio=0.25,
        include=["features.*", "fc1"],
        exclude=["head"],
        overrides={"fc1": {"rule": "bema", "ratio": None, "keep_bulk": 0.5}},
        dense_truncate=True,
    )
    assert CompressionConfig.from_json(c.to_json()) == c
    path = tmp_path / "c.json"
    c.to_json(path)
    assert CompressionConfig.from_json(path) == c
    assert CompressionConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rule": "svd"}, ValueError, "rule='svd' is unknown"),
        ({"rule": 3}, TypeError, "rule=3"),
        ({"keep_bulk": 1.5}, ValueError, r"keep_bulk=1.5 must be in \[0, 1\]"),
        ({"keep_bulk": "x"}, TypeError, "keep_bulk='x' must be a number"),
        ({"alpha": 0.5}, ValueError, "alpha=0.5"),
        ({"beta": 0.0}, ValueError, "beta=0.0"),
        ({"ks_max": -1}, ValueError, "ks_max=-1"),
        ({"min_rank": 0}, ValueError, "min_rank=0 must be >= 1"),
        ({"min_rank": 1.0}, TypeError, "min_rank=1.0 must be an int"),
        ({"energy": 0}, ValueError, "energy=0"),
        ({"rule": "fixed"}, ValueError, "exactly one of ratio"),
        ({"rule": "fixed", "ratio": 0.5, "rank": 3}, ValueError, "exactly one of ratio"),
        ({"rank": 0}, ValueError, "rank=0 must be >= 1"),
        ({"sigma": 0}, ValueError, "sigma=0"),
        ({"include": [""]}, TypeError, "include="),
        ({"exclude": 5}, TypeError, "exclude=5"),
        ({"dense_truncate": 1}, TypeError, "dense_truncate=1 must be a bool"),
        ({"svd_dtype": "float16"}, ValueError, "svd_dtype='float16'"),
        ({"overrides": {"fc1": {"include": ["x"]}}}, ValueError, "non-overridable field"),
        ({"overrides": {"fc1": {"keep_bulk": 2}}}, ValueError, "override for 'fc1': keep_bulk=2"),
        ({"overrides": {"fc1": 0.5}}, TypeError, "must be a dict"),
        ({"rule_params": {"fraction": 0.5}}, TypeError, "bad parameters for rule 'bema'"),
        ({"rule": "energy", "rule_params": {"fraction": 0.5}}, ValueError, "set energy= instead"),
        ({"rule_params": [1]}, TypeError, "rule_params=\\[1\\] must be a dict"),
    ],
)
def test_validation_messages(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        CompressionConfig(**kwargs)


def test_from_dict_unknown_field_and_bad_json(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown config field"):
        CompressionConfig.from_dict({"rul": "bema"})
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionConfig.from_json("{bad")
    with pytest.raises(OSError, match="cannot read config file"):
        CompressionConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("name", "pattern", "hit"),
    [
        ("fc1", "fc1", True),
        ("encoder.fc1", "fc1", True),
        ("encoder.fc10", "fc1", False),
        ("features.0", "features.*", True),
        ("classifier.2", "*.2", True),
        ("fc2", "fc?", True),
        ("fc2", "conv*", False),
    ],
)
def test_match_pattern(name: str, pattern: str, hit: bool) -> None:
    assert match_pattern(name, pattern) is hit


def test_selects_and_overrides_in_order() -> None:
    c = CompressionConfig(
        include=["enc.*"],
        exclude=["enc.head"],
        overrides={"enc.*": {"keep_bulk": 0.2}, "fc2": {"keep_bulk": 0.7, "min_rank": 3}},
    )
    assert c.selects("enc.fc1") == (True, "")
    assert c.selects("dec.fc1")[0] is False and "include" in c.selects("dec.fc1")[1]
    assert c.selects("enc.head") == (False, "excluded by pattern 'enc.head'")
    assert c.for_layer("enc.fc1").keep_bulk == 0.2
    resolved = c.for_layer("enc.fc2")
    assert (resolved.keep_bulk, resolved.min_rank) == (0.7, 3)
    assert c.for_layer("other") is c


@pytest.mark.parametrize(
    ("kwargs", "cls"),
    [
        ({}, BemaRule),
        ({"rule": "gavish_donoho", "sigma": 0.1}, GavishDonohoRule),
        ({"rule": "energy", "energy": 0.8}, EnergyRule),
        ({"rule": "fixed", "rank": 4}, FixedRule),
    ],
)
def test_make_rule(kwargs: dict, cls: type) -> None:
    assert isinstance(CompressionConfig(**kwargs).make_rule(), cls)


def test_a_rule_reading_a_missing_field_is_refused_only_when_used() -> None:
    from rmtprune.spectral import RULES, RankRule, RuleParam, register_rule

    class Misdeclared(RankRule):
        parameters = {"x": RuleParam(1.0, None, "no_such_field")}

        def select(self, s, shape, fit=None):  # pragma: no cover - never reached
            raise AssertionError

    register_rule("misdeclared", Misdeclared)
    try:
        assert CompressionConfig().rule == "bema"  # other rules are unaffected
        with pytest.raises(TypeError, match="reads the config field 'no_such_field'"):
            CompressionConfig(rule="misdeclared")
    finally:
        RULES.pop("misdeclared", None)
