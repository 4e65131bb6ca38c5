"""One parameter (or MAC) budget for the whole model, allocated across layers by a global score.

:func:`rmtprune.compress` with ``target=`` ranks every singular direction of every selected layer by
a score and keeps the best ones until the budget is spent: one threshold for the whole model, then the
budget filled to within one rank step. The allocations:

``rmt`` (the default)
    ``s_i / s_plus``: each direction's singular value over its own layer's fitted noise edge (the
    BEMA Marchenko-Pastur edge; in whitened mode the generalized-MP edge of the whitened noise,
    :func:`rmtprune.spectral.whitened_noise_edge`). The edge is the scale at which a layer's
    directions stop being distinguishable from noise, which is what makes directions of different
    layers comparable without a sweep: a direction at ``2 s_plus`` is as far out of its layer's
    noise as one at ``2 s_plus`` elsewhere, whatever the layers' sizes and weight scales.
``uniform``
    the same parameter ratio in every layer (``k = c m n / (m + n)``): SVD-LLM's and ASVD's allocation.
``energy``
    the same fraction of each layer's energy ``sum s_i^2`` kept everywhere, the fraction chosen globally.
``gavish_donoho``
    Gavish & Donoho's optimal hard threshold per layer (``omega(beta) median(s)``, arXiv:1305.5870)
    times one global multiplier.
``spikes``
    every BEMA spike kept first, then one global fraction ``keep_bulk`` of each layer's bulk.

The costs are as stored: a layer kept at rank ``k`` costs ``k (m + n)`` while that is below ``m n``,
else it stays dense at ``m n`` (times the output positions for MACs); biases are fixed costs. No
torch here: the candidates are plain numbers and numpy arrays.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import ALLOCATIONS
from .spectral.rules import gavish_donoho_omega

__all__ = ["ALLOCATIONS", "Candidate", "Allocation", "allocate", "direction_scores"]


@dataclass
class Candidate:
    """One ``m x n`` layer taking part in the allocation.

    ``s`` are its singular values in the space the truncation happens in (plain or whitened),
    descending, all ``p = min(m, n)`` of them; ``edge`` the noise edge in the same units (``rmt``);
    ``n_spikes`` the directions above it (``spikes``). One rank costs ``(m + n) * positions`` and the
    dense layer ``m n * positions`` (``positions = 1`` counts parameters; output positions per sample
    count MACs); a ``factored`` layer always costs ``k (m + n)``. ``min_rank <= k <= max_rank``.
    """

    name: str
    s: np.ndarray
    m: int
    n: int
    positions: int = 1
    min_rank: int = 1
    max_rank: int | None = None
    edge: float | None = None
    n_spikes: int = 0
    factored: bool = False

    def __post_init__(self) -> None:
        self.s = np.sort(np.asarray(self.s, dtype=np.float64).ravel())[::-1]
        p = min(self.m, self.n)
        if self.s.size != p:
            raise ValueError(
                f"layer {self.name!r}: {self.s.size} singular values for a {self.m}x{self.n} matrix"
            )
        self.max_rank = p if self.max_rank is None else min(int(self.max_rank), p)
        self.min_rank = max(0, min(int(self.min_rank), self.max_rank))

    @property
    def unit(self) -> int:
        return (self.m + self.n) * self.positions

    @property
    def dense(self) -> int:
        return self.m * self.n * self.positions

    def cost(self, k: int) -> int:
        """Stored cost at rank ``k`` (dense when factoring would not save anything)."""
        if self.factored:
            return k * self.unit
        return min(k * self.unit, self.dense) if k < self.s.size else self.dense


@dataclass
class Allocation:
    """The ranks :func:`allocate` chose, the threshold, and the cost reached against the budget."""

    ranks: dict[str, int]
    threshold: float
    budget: int
    cost: int
    scores: dict[str, np.ndarray]

    @property
    def feasible(self) -> bool:
        return self.cost <= self.budget


def direction_scores(c: Candidate, allocation: str) -> np.ndarray:
    """The score of each of ``c``'s directions (higher is kept first), non-increasing along the layer."""
    s = c.s
    p = s.size
    i = np.arange(p)
    if allocation == "rmt":
        if c.edge is None or not c.edge > 0:
            raise ValueError(f"layer {c.name!r} has no noise edge for the rmt allocation")
        out = s / c.edge
    elif allocation == "uniform":
        # direction i (0-based) is kept when the layer's ratio reaches (i + 1) (m + n) / (m n)
        out = -(i + 1) * c.unit / max(c.dense, 1)
    elif allocation == "energy":
        e = s**2
        tot = float(e.sum())
        cum = np.concatenate([[0.0], np.cumsum(e)[:-1]]) / tot if tot > 0 else i / max(p, 1)
        out = 1.0 - cum  # kept when the layer's kept-energy target exceeds what comes before it
    elif allocation == "gavish_donoho":
        pos = s[s > 0]  # a factored layer's cut values are zeros: the median is over the kept ones
        tau = gavish_donoho_omega(min(c.m, c.n) / max(c.m, c.n)) * float(np.median(pos)) if pos.size else 1.0
        out = s / tau
    elif allocation == "spikes":
        k = min(max(int(c.n_spikes), 0), p)
        bulk = p - k
        out = np.empty(p)
        out[:k] = 2.0 + (s[:k] / c.edge if c.edge else 1.0)
        out[k:] = 1.0 - np.arange(bulk) / max(bulk, 1)  # one global fraction of each bulk
    else:
        raise ValueError(f"allocation={allocation!r} must be one of {ALLOCATIONS}")
    return np.minimum.accumulate(np.asarray(out, dtype=np.float64))


def _ranks(cands: Sequence[Candidate], scores: Sequence[np.ndarray], tau: float) -> list[int]:
    out = []
    for c, sc in zip(cands, scores, strict=True):
        k = int(np.count_nonzero(sc >= tau))
        out.append(min(max(k, c.min_rank), c.max_rank))
    return out


def _total(cands: Sequence[Candidate], ranks: Sequence[int]) -> int:
    return sum(c.cost(k) for c, k in zip(cands, ranks, strict=True))


def allocate(
    cands: Sequence[Candidate], budget: int, allocation: str = "rmt", beta: float = 0.1
) -> Allocation:
    """Ranks for ``cands`` whose total cost is at most ``budget`` and within one rank step of it.

    One global threshold ``tau`` on the directions' scores (:func:`direction_scores`): each layer
    keeps its directions scoring ``>= tau`` (clipped to ``[min_rank, max_rank]``); ``tau`` is the
    lowest for which the total fits. Then the budget left is filled one direction at a time, best
    score first, while a direction still fits. When even the floors (``min_rank``) exceed the
    budget, those floors are returned with ``cost > budget`` (``feasible`` False).
    """
    if not cands:
        raise ValueError("no layer takes part in the allocation")
    scores = [direction_scores(c, allocation) for c in cands]
    levels = np.unique(np.concatenate([sc for sc in scores if sc.size] or [np.zeros(1)]))[::-1]
    floors = [c.min_rank for c in cands]
    if _total(cands, floors) > budget:
        return Allocation(
            {c.name: k for c, k in zip(cands, floors, strict=True)},
            np.inf,
            budget,
            _total(cands, floors),
            dict(zip([c.name for c in cands], scores, strict=True)),
        )
    # bisect on the descending levels: fits(i) is True for a prefix (higher tau keeps less)
    lo, hi = 0, len(levels) - 1
    best = -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if _total(cands, _ranks(cands, scores, levels[mid])) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    tau = float(levels[best]) if best >= 0 else np.inf
    ranks = _ranks(cands, scores, tau) if best >= 0 else list(floors)
    # fill: the next direction of each layer, best score first, while it fits. A layer whose next
    # step does not fit is done: its later steps cost as much (or, crossing to dense, come after it).
    left = budget - _total(cands, ranks)
    heap = [(-scores[i][ranks[i]], i) for i, c in enumerate(cands) if ranks[i] < c.max_rank]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c = cands[i]
        step = c.cost(ranks[i] + 1) - c.cost(ranks[i])
        if step > left:
            continue
        ranks[i] += 1
        left -= step
        if ranks[i] < c.max_rank:
            heapq.heappush(heap, (-scores[i][ranks[i]], i))
    return Allocation(
        {c.name: k for c, k in zip(cands, ranks, strict=True)},
        tau,
        budget,
        _total(cands, ranks),
        dict(zip([c.name for c in cands], scores, strict=True)),
    )
