"""Within-layer scores and masks: magnitude ``|W_ij|`` or Wanda's ``|W_ij| * ||X_j||_2``.

A budget (:mod:`.budgets`, :mod:`.layerwise`) decides how many entries each layer loses; this
module decides which. Two scores:

- ``magnitude``: ``|W_ij|``, the smallest of the whole layer pruned (the data-free default);
- ``wanda`` (Sun, Liu, Bair and Kolter 2023): ``|W_ij| * ||X_j||_2``, with ``||X_j||_2`` the norm of
  input feature ``j`` over the calibration rows (:attr:`rmtprune.calibration.InputStats.l2_norm`),
  compared within each output row, Wanda's comparison group: every row of a layer loses the same
  number of entries (``k // m``, and the ``k mod m`` rows with the smallest next score one more, so
  the layer loses exactly ``k``).

Scores are computed in the layer's matrix layout (``out x in``, :meth:`LayerHandler.matrix`) and
masks are returned in the weight's own layout (a GPT-2 ``Conv1D`` stores ``in x out``, a
convolution ``out x in x k...``), through the layer registry's layout rules.

References
----------
Sun, M., Liu, Z., Bair, A. and Kolter, J. Z. (2023). A simple and effective pruning approach for
large language models (Wanda). arXiv:2306.11695.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from ..layers import handler_for

if TYPE_CHECKING:
    from .state import LayerState

__all__ = [
    "SCORES",
    "as_matrix",
    "as_weight",
    "matrix_scores",
    "entry_scores",
    "magnitude_keep",
    "layer_mask",
    "row_counts",
]

#: Within-layer scores; ``auto`` is ``wanda`` with calibration, else ``magnitude``.
SCORES = ("auto", "magnitude", "wanda")


def _handler(layer: LayerState):  # noqa: ANN202 - a LayerHandler
    h = handler_for(layer.module)
    if h is None:  # pragma: no cover - selection only keeps registered types
        raise ValueError(f"layer {layer.name!r}: no layer handler for {type(layer.module).__name__}")
    return h


def as_matrix(layer: LayerState, t: torch.Tensor) -> torch.Tensor:
    """``t`` (in the layout of ``layer``'s weight) as the layer's ``out x in`` matrix."""
    return _handler(layer).matrix(SimpleNamespace(weight=t))


def as_weight(layer: LayerState, m: torch.Tensor) -> torch.Tensor:
    """An ``out x in`` matrix ``m`` in the layout of ``layer``'s weight (inverse of :func:`as_matrix`)."""
    out = SimpleNamespace(
        weight=torch.empty(tuple(layer.module.weight.shape), dtype=m.dtype, device=m.device)
    )
    _handler(layer).write_dense(out, m)
    return out.weight


def matrix_scores(layer: LayerState, score: str) -> torch.Tensor:
    """The ``out x in`` score matrix of ``layer`` (float64, CPU): ``|W|`` or ``|W| * ||X_j||_2``."""
    w = as_matrix(layer, layer.module.weight.detach()).to(device="cpu", dtype=torch.float64).abs()
    if score == "magnitude":
        return w
    if layer.act_norm is None:
        raise ValueError(f"layer {layer.name!r} has no calibration statistics for score='wanda'")
    return w * layer.act_norm.to(device="cpu", dtype=torch.float64)[None, :]


def entry_scores(layer: LayerState, score: str) -> torch.Tensor:
    """The score of every weight entry, flat in the weight's own order (float64, CPU)."""
    if score == "magnitude":
        return layer.module.weight.detach().abs().to(device="cpu", dtype=torch.float64).reshape(-1)
    return as_weight(layer, matrix_scores(layer, score)).reshape(-1)


def row_counts(floors: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Per-row prune counts as even as possible: ``c_i >= floors[i]``, ``c_i <= n``, ``sum c_i`` at
    most ``k`` (water filling: the level ``t`` is the largest with ``sum max(floors, t) <= k``).

    The remainder ``k - sum c_i`` (fewer than the rows at the level) is left to the caller, which
    gives one more entry to the rows with the smallest next score.
    """
    lo, hi = 0, n
    while lo < hi:  # largest level t with sum(max(floors, t)) <= k
        mid = (lo + hi + 1) // 2
        if int(torch.clamp(floors, min=mid).sum()) <= k:
            lo = mid
        else:
            hi = mid - 1
    return torch.clamp(floors, min=lo)


def _wanda_keep(scores: torch.Tensor, old_keep: torch.Tensor | None, k: int) -> torch.Tensor:
    """Keep-mask (``out x in``) pruning exactly ``k`` entries, the same number in every row (+-1)."""
    m, n = scores.shape
    if old_keep is not None:
        scores = scores.masked_fill(~old_keep, -math.inf)  # already pruned: first in their row
    floors = (~old_keep).sum(1) if old_keep is not None else torch.zeros(m, dtype=torch.long)
    counts = row_counts(floors, k, n)
    order = torch.sort(scores, dim=1, stable=True)
    rem = k - int(counts.sum())
    if rem > 0:  # one more entry in the rows whose next-smallest score is smallest
        eligible = counts < n
        nxt = torch.full((m,), math.inf, dtype=scores.dtype)
        rows = torch.nonzero(eligible).reshape(-1)
        nxt[rows] = order.values[rows, counts[rows]]
        counts[torch.topk(nxt, rem, largest=False).indices] += 1
    drop = torch.arange(n)[None, :] < counts[:, None]  # the first c_i of each sorted row
    keep = torch.ones(m, n, dtype=torch.bool)
    keep.scatter_(1, order.indices, ~drop)
    return keep


def magnitude_keep(weight: torch.Tensor, old: torch.Tensor | None, k: int) -> torch.Tensor:
    """Keep-mask of ``weight`` without its ``k`` smallest ``|w|`` (already-pruned entries go first)."""
    s = weight.detach().abs().to(torch.float64).reshape(-1)
    if old is not None:
        s = s.masked_fill(~old.reshape(-1).to(s.device), -math.inf)
    keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
    if k > 0:
        keep[torch.topk(s, k, largest=False, sorted=False).indices] = False
    return keep.reshape(weight.shape)


def layer_mask(layer: LayerState, old: torch.Tensor | None, k: int, score: str) -> torch.Tensor:
    """Keep-mask in the weight's layout pruning ``k`` entries of ``layer`` (already pruned ones first).

    ``magnitude``: the ``k`` smallest ``|w|`` of the layer; ``wanda``: the smallest ``|W_ij| *
    ||X_j||_2`` of each output row, the same count per row (:func:`_wanda_keep`).
    """
    weight = layer.module.weight
    if score == "magnitude":
        return magnitude_keep(weight, old, k)
    old_keep = as_matrix(layer, old.to("cpu")) if old is not None else None
    keep = _wanda_keep(matrix_scores(layer, score), old_keep, k)
    return as_weight(layer, keep).to(weight.device)
