"""Rank rules: how many singular triplets of a layer to keep, all with one decision record.

Each rule is a small object with one method, :meth:`RankRule.select`, over a spectrum. All
return a :class:`RankDecision`, so reports and benchmarks compare rules one to one
(METHOD.md section 5). ``bema`` is the method of the papers; the others are the usual
alternatives a user would otherwise reach for.

A rule owns its parameters: the class attribute :attr:`RankRule.parameters` declares each one
(default, check, and the :class:`~rmtprune.config.CompressionConfig` field it is read from), so
the constructor, :meth:`RankRule.params` and :meth:`RankRule.from_config` need no code per rule.
:attr:`RankRule.gated` says whether the MP gate (``ks <= ks_max``) applies to it. A new rule is a
subclass plus :func:`register_rule`; ``CompressionConfig(rule=name, rule_params={...})`` then
uses it everywhere (``compress``, the CLI's ``--config``, the training pruner).

References
----------
Gavish, M. and Donoho, D. L. (2014). The optimal hard threshold for singular values is 4/sqrt(3).
IEEE Trans. Inf. Theory 60(8), 5040-5053. arXiv:1305.5870.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from .._validate import check_int, check_number
from .bema import DEFAULT_ALPHA, DEFAULT_BETA, SpectrumFit, check_shape, fit_bulk

__all__ = [
    "RankDecision",
    "RankRule",
    "RuleParam",
    "BemaRule",
    "GavishDonohoRule",
    "EnergyRule",
    "FixedRule",
    "RULES",
    "register_rule",
    "get_rule",
    "make_rule",
    "gavish_donoho_omega",
    "gavish_donoho_lambda_star",
]


@dataclass(frozen=True)
class RankDecision:
    """What a rule decided for one spectrum.

    ``rank`` singular triplets are kept (``0 <= rank <= p``). ``threshold`` is the singular-value
    cut the rule used where it has one (``s > threshold`` kept), else NaN. ``n_spikes`` is set by
    rules that see spikes. ``params`` holds the rule's own parameters, ``reason`` a sentence.
    """

    rule: str
    rank: int
    p: int
    threshold: float = float("nan")
    n_spikes: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (NaN threshold written as ``None``)."""
        return {
            "rule": self.rule,
            "rank": self.rank,
            "p": self.p,
            "threshold": None if math.isnan(self.threshold) else self.threshold,
            "n_spikes": self.n_spikes,
            "params": dict(self.params),
            "reason": self.reason,
        }


def _spectrum(s: ArrayLike, shape: Any) -> tuple[np.ndarray, tuple[int, int]]:
    m, n = check_shape(shape)
    arr = np.sort(np.asarray(s, dtype=np.float64).ravel())[::-1]
    if arr.size != min(m, n):
        raise ValueError(f"got {arr.size} singular values for shape {(m, n)}; expected {min(m, n)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("singular values contain NaN or Inf")
    return arr, (m, n)


# ---------------------------------------------------------------------- parameter checks
# Each takes the parameter's name (the config field's name when the config checks it) and the value,
# and returns the normalised value; messages come from rmtprune._validate ("ratio=2.0 must be in (0, 1]").
def check_alpha(name: str, value: Any) -> float:
    """BEMA trim fraction, in (0, 0.5) (also :class:`~rmtprune.config.FitConfig`'s check)."""
    return check_number(name, value, 0.0, 0.5, lo_open=True, hi_open=True)


def check_beta(name: str, value: Any) -> float:
    """Tracy-Widom level, in [0.01, 0.99] (also :class:`~rmtprune.config.FitConfig`'s check)."""
    return check_number(name, value, 0.01, 0.99)


def _fraction(name: str, value: Any) -> float:
    return check_number(name, value, 0.0, 1.0)


def _positive_fraction(name: str, value: Any) -> float:
    return check_number(name, value, 0.0, 1.0, lo_open=True)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def optional(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return optional


def _positive(name: str, value: Any) -> float:
    return check_number(name, value, 0.0, math.inf, lo_open=True)


def _rank(name: str, value: Any) -> int:
    return check_int(name, value, 1)


@dataclass(frozen=True)
class RuleParam:
    """One parameter of a rank rule, as the rule declares it in :attr:`RankRule.parameters`.

    default : the value when the parameter is not given.
    check : ``check(name, value) -> value``: validates and normalises (``TypeError`` for a wrong
        type, ``ValueError`` for a wrong value, both naming ``name=value``); None: taken as given.
    field : the :class:`~rmtprune.config.CompressionConfig` field the parameter is read from
        (``energy`` for the energy rule's ``fraction``); None for a parameter given through the
        config's ``rule_params`` dict.
    """

    default: Any = None
    check: Callable[[str, Any], Any] | None = None
    field: str | None = None


class RankRule(ABC):
    """A rule choosing a rank from a spectrum. Subclasses implement :meth:`select`.

    Class attributes a subclass sets:

    - ``name``: the name it is registered under (:func:`register_rule` sets it when empty);
    - ``parameters``: ``{parameter: RuleParam}``, in constructor order; the constructor takes them
      positionally or by keyword, checks each, stores it as an attribute, then calls
      :meth:`check_params` for checks across parameters;
    - ``gated``: True when the rule relies on the MP bulk fit, so a layer whose fit fails the gate
      (``ks > ks_max``) is kept instead of cut (``bema``); False: the rule runs on any spectrum.
    """

    name: ClassVar[str] = ""
    gated: ClassVar[bool] = False
    parameters: ClassVar[Mapping[str, RuleParam]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(self.parameters)
        kind = type(self).__name__
        if len(args) > len(names):
            raise TypeError(f"{kind}() takes {len(names)} parameter(s) ({', '.join(names)}), got {len(args)}")
        given = dict(zip(names, args, strict=False))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise TypeError(f"{kind}() got multiple values for {twice}")
        given.update(kwargs)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(
                f"{kind}() got unexpected parameter(s) {unknown}; "
                f"its parameters: {', '.join(names) or 'none'}"
            )
        for pname, prm in self.parameters.items():
            value = given.get(pname, prm.default)
            setattr(self, pname, value if prm.check is None else prm.check(pname, value))
        self.check_params()

    def check_params(self) -> None:  # noqa: B027  (a hook: most rules have no cross-parameter check)
        """Checks across parameters, after each was checked alone (raise ``ValueError``)."""

    @abstractmethod
    def select(self, s: ArrayLike, shape: tuple[int, int], fit: SpectrumFit | None = None) -> RankDecision:
        """Decide the rank for singular values ``s`` of an ``m x n`` matrix.

        ``fit`` is an already computed BEMA fit of the same spectrum; rules that need one and do
        not get it compute it.
        """

    def params(self) -> dict[str, Any]:
        """The rule's parameters, as given to its constructor (after their checks)."""
        return {pname: getattr(self, pname) for pname in self.parameters}

    @classmethod
    def config_params(cls, config: Any) -> dict[str, Any]:
        """The constructor arguments a config gives: each parameter's ``field``, plus ``rule_params``."""
        out = {}
        for pname, prm in cls.parameters.items():
            if prm.field is None:
                continue
            if not hasattr(config, prm.field):
                raise TypeError(
                    f"rule {cls.name!r}: parameter {pname!r} reads the config field {prm.field!r}, which "
                    f"{type(config).__name__} does not have (declare field=None and use rule_params)"
                )
            out[pname] = getattr(config, prm.field)
        extra = dict(getattr(config, "rule_params", None) or {})
        for pname in sorted(set(extra) & set(out)):
            field_name = cls.parameters[pname].field
            raise ValueError(
                f"rule_params sets {pname!r}, which rule {cls.name!r} reads from the config field "
                f"{field_name!r}; set {field_name}= instead"
            )
        return {**out, **extra}

    @classmethod
    def from_config(cls, config: Any) -> RankRule:
        """The rule a :class:`~rmtprune.config.CompressionConfig` describes (fields and ``rule_params``)."""
        return _build(cls, cls.config_params(config))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class BemaRule(RankRule):
    """Keep the spikes above the BEMA edge plus ``floor(keep_bulk * n_bulk)`` of the bulk."""

    name = "bema"
    gated = True
    parameters = {
        "keep_bulk": RuleParam(0.0, _fraction, "keep_bulk"),
        "alpha": RuleParam(DEFAULT_ALPHA, check_alpha, "alpha"),
        "beta": RuleParam(DEFAULT_BETA, check_beta, "beta"),
    }
    keep_bulk: float
    alpha: float
    beta: float

    def select(self, s: ArrayLike, shape: tuple[int, int], fit: SpectrumFit | None = None) -> RankDecision:
        arr, shape = _spectrum(s, shape)
        if fit is None:
            fit = fit_bulk(arr, shape, alpha=self.alpha, beta=self.beta)
        kept_bulk = math.floor(self.keep_bulk * fit.n_bulk)
        rank = fit.n_spikes + kept_bulk
        return RankDecision(
            rule=self.name,
            rank=rank,
            p=arr.size,
            threshold=fit.s_plus,
            n_spikes=fit.n_spikes,
            params=self.params(),
            reason=f"{fit.n_spikes} spikes above s_plus={fit.s_plus:.4g} + {kept_bulk} of {fit.n_bulk} bulk",
        )


def gavish_donoho_omega(beta: float) -> float:
    """Approximate ``omega(beta)`` for the unknown-noise optimal hard threshold, ``beta = m/n <= 1``."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gavish_donoho_lambda_star(beta: float) -> float:
    """``lambda*(beta)`` for the known-noise optimal hard threshold, ``beta = m/n <= 1``."""
    return math.sqrt(
        2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta**2 + 14.0 * beta + 1.0))
    )


class GavishDonohoRule(RankRule):
    """Optimal hard threshold of Gavish & Donoho: unknown noise (median rule) or known ``sigma``."""

    name = "gavish_donoho"
    parameters = {"sigma": RuleParam(None, _optional(_positive), "sigma")}
    sigma: float | None

    def select(self, s: ArrayLike, shape: tuple[int, int], fit: SpectrumFit | None = None) -> RankDecision:
        arr, (m, n) = _spectrum(s, shape)
        b = min(m, n) / max(m, n)
        if self.sigma is None:
            tau = gavish_donoho_omega(b) * float(np.median(arr))
            how = f"omega({b:.3g}) * median(s)"
        else:
            tau = gavish_donoho_lambda_star(b) * math.sqrt(max(m, n)) * self.sigma
            how = f"lambda*({b:.3g}) * sqrt(N) * sigma"
        rank = int(np.count_nonzero(arr > tau))
        return RankDecision(
            self.name,
            rank,
            arr.size,
            tau,
            None,
            self.params(),
            f"{rank} singular values above tau={tau:.4g} = {how}",
        )


class EnergyRule(RankRule):
    """Smallest rank keeping at least ``fraction`` of ``sum(s**2)`` (config field ``energy``)."""

    name = "energy"
    parameters = {"fraction": RuleParam(0.9, _positive_fraction, "energy")}
    fraction: float

    def select(self, s: ArrayLike, shape: tuple[int, int], fit: SpectrumFit | None = None) -> RankDecision:
        arr, _ = _spectrum(s, shape)
        e = np.cumsum(arr**2)
        total = e[-1] if e.size else 0.0
        if total <= 0:
            rank = 0
        else:
            # Relative tolerance so that fraction=1 keeps exactly the nonzero spectrum.
            rank = int(np.searchsorted(e, self.fraction * total * (1 - 1e-12), side="left")) + 1
            rank = min(rank, arr.size)
        thr = float(arr[rank]) if 0 < rank < arr.size else float("nan")
        return RankDecision(
            self.name,
            rank,
            arr.size,
            thr,
            None,
            self.params(),
            f"{rank} singular values hold {self.fraction:.4g} of the energy",
        )


class FixedRule(RankRule):
    """A fixed rank ratio (``ratio`` of ``p``, rounded, at least 1) or an absolute ``rank``: exactly one."""

    name = "fixed"
    parameters = {
        "ratio": RuleParam(None, _optional(_positive_fraction), "ratio"),
        "rank": RuleParam(None, _optional(_rank), "rank"),
    }
    ratio: float | None
    rank: int | None

    def check_params(self) -> None:
        if (self.ratio is None) == (self.rank is None):
            raise ValueError("rule 'fixed' needs exactly one of ratio= (in (0, 1]) or rank= (>= 1)")

    def select(self, s: ArrayLike, shape: tuple[int, int], fit: SpectrumFit | None = None) -> RankDecision:
        arr, _ = _spectrum(s, shape)
        p = arr.size
        if self.rank is not None:
            if self.rank > p:
                raise ValueError(f"rank={self.rank} must be in [1, {p}] for a matrix of shape {tuple(shape)}")
            rank, why = self.rank, f"fixed rank {self.rank}"
        else:
            rank = min(p, max(1, round(self.ratio * p)))
            why = f"fixed ratio {self.ratio:.4g} of p={p}"
        thr = float(arr[rank]) if rank < p else float("nan")
        return RankDecision(self.name, rank, p, thr, None, self.params(), why)


#: The registered rules, by name (what ``CompressionConfig.rule`` and ``--rule`` accept).
RULES: dict[str, type[RankRule]] = {
    BemaRule.name: BemaRule,
    GavishDonohoRule.name: GavishDonohoRule,
    EnergyRule.name: EnergyRule,
    FixedRule.name: FixedRule,
}
_BUILTIN = dict(RULES)


def register_rule(name: str, cls: type[RankRule]) -> type[RankRule]:
    """Register the rank rule ``cls`` under ``name``, for ``CompressionConfig(rule=name)``; returns ``cls``.

    ``cls.name`` is set to ``name`` when empty and must equal it otherwise. Registering again under
    the same name replaces a user rule; the built-in rules cannot be replaced.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name={name!r} must be a non-empty string")
    if not isinstance(cls, type) or not issubclass(cls, RankRule):
        raise TypeError(f"cls={cls!r} must be a RankRule subclass")
    if name in _BUILTIN and _BUILTIN[name] is not cls:
        raise ValueError(f"rule {name!r} is built in and cannot be replaced; register under another name")
    if not cls.name:
        cls.name = name
    elif cls.name != name:
        raise ValueError(f"{cls.__name__}.name={cls.name!r} differs from name={name!r}")
    for pname, prm in cls.parameters.items():
        if not isinstance(prm, RuleParam):
            raise TypeError(f"{cls.__name__}.parameters[{pname!r}] must be a RuleParam, got {prm!r}")
    RULES[name] = cls
    return cls


def get_rule(name: Any) -> type[RankRule]:
    """The rule class registered under ``name`` (``TypeError``/``ValueError`` naming the valid rules)."""
    if not isinstance(name, str):
        raise TypeError(f"rule={name!r} must be a string")
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"rule={name!r} is unknown; valid rules: {', '.join(sorted(RULES))}") from None


def _build(cls: type[RankRule], params: dict[str, Any]) -> RankRule:
    try:
        return cls(**params)
    except TypeError as exc:
        raise TypeError(f"bad parameters for rule {cls.name!r}: {exc}") from None


def make_rule(name: str, **params: Any) -> RankRule:
    """Build the rule registered under ``name`` (``bema``, ``energy``, ...) with ``params``."""
    return _build(get_rule(name), params)
