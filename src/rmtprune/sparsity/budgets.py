"""Per-layer budgets: how many entries each layer loses for a global target (METHOD.md section 8).

A budget is a small object with one job, :meth:`Budget.counts`: given the layers that take part,
their floors (entries already pruned: masks only grow), caps and the number of entries to prune,
return each layer's prune count. Two families cover the built-in rules:

- :class:`ThresholdBudget`: one global threshold on a per-entry score (:meth:`~ThresholdBudget.score`;
  smallest first), water-filled against the caps (:func:`threshold_counts`);
- :class:`ProportionalBudget`: layer sparsity proportional to a per-layer weight
  (:meth:`~ProportionalBudget.weight`), rounded to meet the total exactly (:func:`proportional_counts`).

A budget owns its parameters: ``params`` names the :class:`~rmtprune.sparsity.SparsifyConfig`
fields it reads (``budget_power``), and :func:`make_budget` builds it from a config. ``needs_fit``
says whether a layer needs an accepted Marchenko-Pastur fit to take part (layers without one are
left dense and reported); ``capped`` whether ``max_layer_sparsity`` applies. Add a rule with
:func:`register_budget`; ``SparsifyConfig(budget=name)`` then accepts it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from .state import LayerState

__all__ = [
    "Budget",
    "ThresholdBudget",
    "ProportionalBudget",
    "register_budget",
    "budget_names",
    "make_budget",
    "allocate",
    "proportional_counts",
    "shifted_counts",
    "threshold_counts",
]


class Budget:
    """A per-layer budget rule: how a global number of pruned entries is split over the layers."""

    #: SparsifyConfig fields this rule reads; :func:`make_budget` passes them as keyword arguments.
    params: ClassVar[tuple[str, ...]] = ()
    #: Whether a layer needs an accepted MP fit to be pruned (else it is left dense and reported).
    needs_fit: ClassVar[bool] = False
    #: Whether ``max_layer_sparsity`` caps each layer (plain global magnitude pruning is not capped).
    capped: ClassVar[bool] = True
    #: Whether the rule reads every layer's spectrum (the analysis runs) without needing the fit
    #: to be accepted (the layerwise allocators of :mod:`.layerwise`).
    needs_spectrum: ClassVar[bool] = False

    def counts(
        self, layers: Sequence[LayerState], floors: list[int], caps: list[int], total: int
    ) -> list[int]:
        """Prune count per layer, ``floors[i] <= k_i <= caps[i]``, summing to ``total`` where reachable."""
        raise NotImplementedError(f"{type(self).__name__} must implement counts()")


class ThresholdBudget(Budget):
    """One global threshold on a per-entry score: the ``total`` smallest scores are pruned."""

    def score(self, layer: LayerState, magnitude: torch.Tensor) -> torch.Tensor:
        """Score of every entry of ``layer`` (flat, float64, CPU), given ``magnitude = |w|`` (with
        calibration, Wanda's ``|w| * ||X_j||_2`` in its place: :meth:`LayerState.entry_scores`)."""
        return magnitude

    def counts(
        self, layers: Sequence[LayerState], floors: list[int], caps: list[int], total: int
    ) -> list[int]:
        scores = []
        for layer in layers:
            w = self.score(layer, layer.entry_scores())
            mask = layer.mask
            if mask is not None:
                w = w.masked_fill(~mask.reshape(-1).cpu(), -math.inf)  # already pruned: counted first
            scores.append(w)
        return threshold_counts(scores, caps, total)


class ProportionalBudget(Budget):
    """Layer sparsity proportional to a per-layer weight (bisection plus largest-remainder rounding)."""

    def weight(self, layer: LayerState) -> float:
        """The layer's weight (>= 0): its sparsity is ``lam * weight``."""
        return 1.0

    def counts(
        self, layers: Sequence[LayerState], floors: list[int], caps: list[int], total: int
    ) -> list[int]:
        weights = [self.weight(layer) for layer in layers]
        return proportional_counts([layer.numel for layer in layers], floors, caps, weights, total)


class GlobalBudget(ThresholdBudget):
    """``global``: one magnitude threshold over all layers, no fit, no per-layer cap (baseline)."""

    capped = False


class UniformBudget(ProportionalBudget):
    """``uniform``: the same sparsity in every layer (baseline)."""


class NoiseBudget(ThresholdBudget):
    """``noise``: one threshold on ``|w| / sigma``, ``sigma`` the layer's fitted MP noise level."""

    needs_fit = True

    def score(self, layer: LayerState, magnitude: torch.Tensor) -> torch.Tensor:
        return magnitude / layer.sigma


class _PowerBudget:
    """Mixin of the budgets with a strength ``budget_power`` (the exponent of the layer's factor)."""

    params = ("budget_power",)
    needs_fit = True

    def __init__(self, budget_power: float = 1.0) -> None:
        self.budget_power = budget_power


class EnergyBudget(_PowerBudget, ThresholdBudget):
    """``energy`` (METHOD.md section 8's direction): one threshold on ``|w| / bulk_energy ** p``."""

    def score(self, layer: LayerState, magnitude: torch.Tensor) -> torch.Tensor:
        return magnitude / layer.bulk_energy**self.budget_power


class SignalBudget(_PowerBudget, ThresholdBudget):
    """``signal`` (default): one threshold on ``|w| * bulk_energy ** p``.

    Deviation from METHOD.md section 8 (budget growing with randomness), and the default, because
    it was measured: on trained ViTs the MP-like layers (value and output projections, patch
    embedding, head: bulk energy ~1, no spikes) carry the function spread over their whole
    spectrum, so pruning them first (energy) costs 10+ pp at 50% before fine-tuning. A layer whose
    energy sits in spikes well above the edge keeps them under a perturbation small against the
    gap (Weyl / Davis-Kahan), so its small entries are the cheaper ones to cut. Found on one
    Fashion-MNIST ViT, then confirmed on held-out models (other seeds, MNIST, a larger ViT):
    benchmarks/results/sparsify_vit.md. Not universal: on a Fashion MLP "energy" is the better
    direction (benchmarks/results/sparsify_budgets.md).
    """

    def score(self, layer: LayerState, magnitude: torch.Tensor) -> torch.Tensor:
        return magnitude * layer.bulk_energy**self.budget_power


class BulkBudget(_PowerBudget, ProportionalBudget):
    """``bulk``: layer sparsity proportional to ``bulk_fraction ** p``."""

    def weight(self, layer: LayerState) -> float:
        return layer.fit.bulk_fraction**self.budget_power  # type: ignore[union-attr]


_REGISTRY: dict[str, type[Budget]] = {
    "noise": NoiseBudget,
    "energy": EnergyBudget,
    "signal": SignalBudget,
    "bulk": BulkBudget,
    "global": GlobalBudget,
    "uniform": UniformBudget,
}


def register_budget(name: str, budget: type[Budget], *, replace: bool = False) -> None:
    """Make ``SparsifyConfig(budget=name)`` use the :class:`Budget` subclass ``budget``.

    Examples
    --------
    >>> import torch
    >>> from rmtprune.sparsity import ThresholdBudget, register_budget
    >>> class Squared(ThresholdBudget):
    ...     def score(self, layer, magnitude):
    ...         return magnitude**2  # same order as |w|: global magnitude pruning, capped
    >>> register_budget("squared", Squared)
    >>> "squared" in budget_names()
    True
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name={name!r} must be a non-empty string")
    if not (isinstance(budget, type) and issubclass(budget, Budget)):
        raise TypeError(f"budget={budget!r} must be a Budget subclass")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not budget:
        raise ValueError(f"budget {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = budget


def budget_names() -> tuple[str, ...]:
    """The registered budget names, built-in ones first."""
    return tuple(_REGISTRY)


def make_budget(name: str, config: Any = None) -> Budget:
    """The budget ``name``, built with the config fields it declares in ``params``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"budget={name!r} must be one of {', '.join(_REGISTRY)}")
    return cls(**{p: getattr(config, p) for p in cls.params if config is not None})


def __getattr__(name: str) -> Any:
    if name == "BUDGETS":  # computed, so a budget registered later is listed
        return budget_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def allocate(
    layers: Sequence[LayerState], budget: Budget, max_layer_sparsity: float, target: float
) -> tuple[list[int], int]:
    """Prune count per layer for a global ``target``; returns ``(counts, wanted_total)``.

    Layers that cannot take part (no accepted fit under a budget that needs one, or protected)
    keep what they already have pruned; the others share the rest through ``budget``.
    """
    total_numel = sum(layer.numel for layer in layers)
    wanted = int(round(target * total_numel))
    active = [i for i, layer in enumerate(layers) if layer.takes_part(budget.needs_fit)]
    fixed = sum(layers[i].pruned for i in range(len(layers)) if i not in set(active))
    floors = [layers[i].pruned for i in active]
    cap_frac = max_layer_sparsity if budget.capped else 1.0
    caps = [max(int(math.floor(cap_frac * layers[i].numel)), f) for i, f in zip(active, floors, strict=True)]
    total = max(wanted - fixed, sum(floors))
    got = budget.counts([layers[i] for i in active], floors, caps, total)
    counts = [layer.pruned for layer in layers]
    for j, i in enumerate(active):
        counts[i] = max(got[j], floors[j])
    return counts, wanted


def proportional_counts(
    numels: list[int], floors: list[int], caps: list[int], weights: list[float], total: int
) -> list[int]:
    """Integer prune counts ``k_l = clip(lam * w_l * n_l, floor_l, cap_l)`` summing to ``total``.

    ``lam`` is found by bisection, then counts are rounded by largest remainder so the sum is
    exact. When ``total`` is out of reach the counts saturate (all floors, or all caps where
    ``w_l > 0``); the caller compares the sum with its target.
    """
    n = np.asarray(numels, dtype=np.float64)
    lo_c = np.asarray(floors, dtype=np.float64)
    hi_c = np.maximum(np.asarray(caps, dtype=np.float64), lo_c)
    w = np.asarray(weights, dtype=np.float64)
    reach = np.where(w > 0, hi_c, lo_c)

    def f(lam: float) -> np.ndarray:
        return np.clip(lam * w * n, lo_c, np.where(w > 0, hi_c, lo_c))

    if total <= lo_c.sum():
        return [int(v) for v in lo_c]
    if total >= reach.sum():
        return [int(v) for v in reach]
    pos = (w > 0) & (n > 0)
    lam_lo, lam_hi = 0.0, float(np.max(hi_c[pos] / (w[pos] * n[pos])))
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if f(mid).sum() < total:
            lam_lo = mid
        else:
            lam_hi = mid
    d = f(lam_hi)
    base = np.clip(np.floor(d), lo_c, reach).astype(np.int64)
    return _round_to_total(base, d - np.floor(d), lo_c, reach, int(total - base.sum()))


def shifted_counts(
    numels: list[int], floors: list[int], caps: list[int], fractions: list[float], total: int
) -> list[int]:
    """Integer prune counts ``k_l = clip((f_l + c) * n_l, floor_l, cap_l)`` summing to ``total``.

    The layerwise allocators (OWL, the RMT budget) give each layer a sparsity ``f_l`` whose
    parameter-weighted mean is already the target; the common shift ``c`` (by bisection, 0 when no
    floor or cap binds) absorbs what the clipping moves, and largest-remainder rounding makes the
    sum exact. Out of reach, the counts saturate (all floors or all caps).
    """
    n = np.asarray(numels, dtype=np.float64)
    lo_c = np.asarray(floors, dtype=np.float64)
    hi_c = np.maximum(np.asarray(caps, dtype=np.float64), lo_c)
    f = np.asarray(fractions, dtype=np.float64)
    if total <= lo_c.sum():
        return [int(v) for v in lo_c]
    if total >= hi_c.sum():
        return [int(v) for v in hi_c]

    def at(c: float) -> np.ndarray:
        return np.clip((f + c) * n, lo_c, hi_c)

    c_lo, c_hi = -1.0 - float(np.max(f)), 1.0 - float(np.min(f))  # at(c_lo) = floors, at(c_hi) = caps
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if at(mid).sum() < total:
            c_lo = mid
        else:
            c_hi = mid
    d = at(c_hi)
    base = np.clip(np.floor(d), lo_c, hi_c).astype(np.int64)
    return _round_to_total(base, d - np.floor(d), lo_c, hi_c, int(total - base.sum()))


def _round_to_total(
    base: np.ndarray, frac: np.ndarray, lo_c: np.ndarray, reach: np.ndarray, rem: int
) -> list[int]:
    """Largest-remainder rounding: move ``rem`` units onto (or off) the largest fractional parts."""
    order = np.argsort(-frac, kind="stable")
    while rem > 0:
        moved = False
        for i in order:
            if rem == 0:
                break
            if base[i] < reach[i]:
                base[i] += 1
                rem -= 1
                moved = True
        if not moved:
            break
    while rem < 0:  # bisection overshoot by rounding: take back from the largest fractional parts
        for i in order[::-1]:
            if rem == 0:
                break
            if base[i] > lo_c[i]:
                base[i] -= 1
                rem += 1
    return [int(v) for v in base]


def threshold_counts(scores: list[torch.Tensor], caps: list[int], total: int) -> list[int]:
    """Prune counts from one global threshold on ``scores`` (smallest first), each layer capped.

    The ``total`` smallest scores over all layers are pruned; a layer that would pass its cap is
    fixed at the cap and the rest re-thresholded (water filling). Already-pruned entries carry
    score ``-inf`` so they are always counted first.
    """
    counts = [0] * len(scores)
    frozen: set[int] = set()
    while True:
        active = [i for i in range(len(scores)) if i not in frozen]
        budget = total - sum(caps[i] for i in frozen)
        if not active or budget <= 0:
            for i in active:
                counts[i] = 0
            return counts
        cat = torch.cat([scores[i].reshape(-1) for i in active])
        owner = torch.cat(
            [torch.full((scores[i].numel(),), j, dtype=torch.int64) for j, i in enumerate(active)]
        )
        k = min(budget, cat.numel())
        idx = (
            torch.topk(cat, k, largest=False, sorted=False).indices if k else torch.empty(0, dtype=torch.long)
        )
        got = torch.bincount(owner[idx], minlength=len(active)).tolist()
        over = [i for j, i in enumerate(active) if got[j] > caps[i]]
        for j, i in enumerate(active):
            counts[i] = got[j]
        if not over:
            return counts
        for i in over:
            frozen.add(i)
            counts[i] = caps[i]
