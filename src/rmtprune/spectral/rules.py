"""Rank rules: how many singular triplets of a layer to keep, all with one decision record.

Each rule is a small object with one method, :meth:`RankRule.select`, over a spectrum. All
return a :class:`RankDecision`, so reports and benchmarks compare rules one to one
(METHOD.md section 5). ``bema`` is the method of the papers; the others are the usual
alternatives a user would otherwise reach for.

References
----------
Gavish, M. and Donoho, D. L. (2014). The optimal hard threshold for singular values is 4/sqrt(3).
IEEE Trans. Inf. Theory 60(8), 5040-5053. arXiv:1305.5870.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .bema import DEFAULT_ALPHA, DEFAULT_BETA, SpectrumFit, check_shape, fit_bulk

__all__ = [
    "RankDecision",
    "RankRule",
    "BemaRule",
    "GavishDonohoRule",
    "EnergyRule",
    "FixedRule",
    "RULES",
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


class RankRule(ABC):
    """A rule choosing a rank from a spectrum. Subclasses implement :meth:`select`."""

    name: str = ""

    @abstractmethod
    def select(self, s: ArrayLike, shape: tuple[int, int], fit: SpectrumFit | None = None) -> RankDecision:
        """Decide the rank for singular values ``s`` of an ``m x n`` matrix.

        ``fit`` is an already computed BEMA fit of the same spectrum; rules that need one and do
        not get it compute it.
        """

    def params(self) -> dict[str, Any]:
        """The rule's parameters, as given to its constructor."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class BemaRule(RankRule):
    """Keep the spikes above the BEMA edge plus ``floor(keep_bulk * n_bulk)`` of the bulk."""

    name = "bema"

    def __init__(
        self, keep_bulk: float = 0.0, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA
    ) -> None:
        if not (0.0 <= float(keep_bulk) <= 1.0):
            raise ValueError(f"keep_bulk={keep_bulk!r} must be in [0, 1]")
        self.keep_bulk = float(keep_bulk)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def params(self) -> dict[str, Any]:
        return {"keep_bulk": self.keep_bulk, "alpha": self.alpha, "beta": self.beta}

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

    def __init__(self, sigma: float | None = None) -> None:
        if sigma is not None and not (float(sigma) > 0 and math.isfinite(float(sigma))):
            raise ValueError(f"sigma={sigma!r} must be a finite positive number or None (unknown noise)")
        self.sigma = None if sigma is None else float(sigma)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

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
    """Smallest rank keeping at least ``fraction`` of ``sum(s**2)``."""

    name = "energy"

    def __init__(self, fraction: float = 0.9) -> None:
        if not (0.0 < float(fraction) <= 1.0):
            raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
        self.fraction = float(fraction)

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

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
    """A fixed rank ratio (``ratio`` of ``p``, rounded, at least 1) or an absolute ``rank``."""

    name = "fixed"

    def __init__(self, ratio: float | None = None, rank: int | None = None) -> None:
        if (ratio is None) == (rank is None):
            raise ValueError("give exactly one of ratio= (in (0, 1]) or rank= (a positive int)")
        if ratio is not None and not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"ratio={ratio!r} must be in (0, 1]")
        if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
            raise ValueError(f"rank={rank!r} must be a positive int")
        self.ratio = None if ratio is None else float(ratio)
        self.rank = None if rank is None else int(rank)

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "rank": self.rank}

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


RULES: dict[str, type[RankRule]] = {
    BemaRule.name: BemaRule,
    GavishDonohoRule.name: GavishDonohoRule,
    EnergyRule.name: EnergyRule,
    FixedRule.name: FixedRule,
}


def make_rule(name: str, **params: Any) -> RankRule:
    """Build a rule by name (``bema``, ``gavish_donoho``, ``energy``, ``fixed``) and parameters."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"rule={name!r} is unknown; valid rules: {', '.join(sorted(RULES))}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise TypeError(f"bad parameters for rule {name!r}: {exc}") from None
