"""Which layers sparsification works on, and their fits: the layer registry and the analyze stage.

Layers come from the one layer registry (:func:`rmtprune.layers.collect_layers`), so a type added
with :func:`rmtprune.layers.register_handler` (or Hugging Face's ``Conv1D``) is pruned too; a
factored layer contributes its two factors. Masking works element-wise on any weight, so layers
compression cannot cut (grouped convolutions, layers with forward hooks, which masking keeps) are
still selected. Skipped, each with a warning: a weight tied to another module (a language model's
``lm_head`` and its ``embed_tokens``: masking would prune the embedding too), a weight recomputed
at every forward pass (``weight_norm`` and the like), and a subclass of a registered type that
overrides its forward (:func:`rmtprune.layers.changed_forward`), where whether zeros in the stored
weight stay zeros in what it computes is unknown (weight standardisation, as in ``StdConv2d``,
turns them into non-zeros). Every layer not handled is named in a warning. Fits come from
:func:`rmtprune.analysis.analyze`, which owns the fit, the gate and the verdict sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis import LayerAnalysis, analyze
from ..config import match_pattern, unmatched_patterns
from ..errors import InvalidWeightsError
from ..layers import LayerEntry, collect_layers, handler_for, output_layer, parametrized
from ..masks import get_mask
from ..spectral import SpectrumFit
from .scores import entry_scores

__all__ = ["LayerState", "select_layers", "fit_layers"]


@dataclass
class LayerState:
    """One selected weight while it is sparsified: its module, fit, noise scale and step-1 record.

    A factor of a low-rank layer names its parent (``factored_parent``) and shares the parent's
    analysis (the fit of the product ``A @ B``).
    """

    name: str
    module: nn.Module
    factored_parent: str | None = None
    parent_module: nn.Module | None = None
    entry: LayerEntry | None = None
    analysis: LayerAnalysis | None = None
    sigma: float = float("nan")
    sv_info: dict[str, float] | None = None
    nnz_before: int = 0
    protected: bool = False
    #: Within-layer score (``magnitude`` or ``wanda``, :mod:`.scores`) and, for ``wanda``, the
    #: calibration's ``||X_j||_2`` per input feature of the layer's matrix.
    score: str = "magnitude"
    act_norm: torch.Tensor | None = None
    #: What a layerwise budget (:mod:`.layerwise`) read for this layer and the sparsity it gave.
    metric: float | None = None
    allocation: str = ""

    @property
    def numel(self) -> int:
        return int(self.module.weight.numel())

    @property
    def mask(self) -> torch.Tensor | None:
        return get_mask(self.module)

    @property
    def pruned(self) -> int:
        mask = self.mask
        return 0 if mask is None else int(self.numel - int(mask.sum()))

    @property
    def fit(self) -> SpectrumFit | None:
        return self.analysis.fit if self.analysis is not None else None

    @property
    def fitted(self) -> bool:
        """Whether the layer has an accepted fit with a finite noise scale."""
        return self.analysis is not None and self.analysis.verdict == "fit" and math.isfinite(self.sigma)

    @property
    def bulk_energy(self) -> float:
        """Share of the layer's ``sum(s**2)`` in the MP bulk: 1 for pure noise, small for strong signal."""
        return max(float(self.fit.bulk_energy), 1e-12)  # type: ignore[union-attr]

    def entry_scores(self) -> torch.Tensor:
        """Every entry's score under :attr:`score`, flat in the weight's order (float64, CPU)."""
        return entry_scores(self, self.score)

    def takes_part(self, needs_fit: bool) -> bool:
        """Whether a budget may prune this layer (protected layers never; others need a fit if asked)."""
        return not self.protected and (self.fitted or not needs_fit)


def _factors(entry: LayerEntry) -> list[tuple[str, nn.Module]]:
    """The prunable sub-layers of a factored layer (its two factors, in registration order)."""
    return [
        (f"{entry.name}.{child}" if entry.name else child, mod)
        for child, mod in entry.module.named_children()
        if handler_for(mod) is not None
    ]


def _candidates(entries: list[LayerEntry]) -> tuple[list[LayerState], list[str]]:
    """Every maskable weight (factors of low-rank layers included), and one warning per layer the
    registry does not handle (an unsupported type such as an embedding, a subclass that changes
    the forward, ``nn.MultiheadAttention``), with the reason: no layer is left out silently."""
    out, warnings = [], []
    for e in entries:
        if e.handler is None:
            warnings.append(f"layer {e.name!r} skipped: {e.reason}")
            continue
        if e.handler.factored:
            out += [LayerState(n, m, e.name, e.module, e) for n, m in _factors(e)]
        elif isinstance(getattr(e.module, "weight", None), torch.Tensor):
            out.append(LayerState(e.name, e.module, entry=e))
    return out, warnings


def select_layers(
    model: nn.Module, include: list[str], exclude: list[str], protect_last: bool = False
) -> tuple[list[LayerState], list[str], list[str]]:
    """Selected layers, one warning per layer skipped (a parametrized weight: masking the computed
    weight would be undone at the next forward pass), and one per unmatched pattern."""
    entries = collect_layers(model)
    candidates, skipped = _candidates(entries)
    out_name = output_layer(model, entries)[0] if protect_last else None
    out: list[LayerState] = []
    names_seen: list[str] = []
    for layer in candidates:
        names = [layer.name] + ([layer.factored_parent] if layer.factored_parent else [])
        names_seen += names

        def hit(pats: list[str], names: list[str] = names) -> bool:
            return any(match_pattern(n, p) for p in pats for n in names)

        if (include and not hit(include)) or hit(exclude):
            continue
        why = parametrized(layer.entry.module, layer.entry.handler)  # type: ignore[union-attr]
        tied = layer.entry.tied_to if layer.factored_parent is None else ()  # type: ignore[union-attr]
        if tied and not why:
            listed = ", ".join(repr(t) for t in tied)
            why = f"weight is tied to {listed}; masking it would prune {listed} too"
        if why:
            skipped.append(f"layer {layer.name!r} skipped: {why}")
            continue
        layer.protected = out_name is not None and out_name in names
        out.append(layer)
    return out, skipped, unmatched_patterns(names_seen, "prunable layer", include=include, exclude=exclude)


def check_finite(layers: list[LayerState]) -> None:
    """Raise :class:`InvalidWeightsError` naming the first layer with a NaN or Inf weight."""
    for layer in layers:
        if not bool(torch.isfinite(layer.module.weight.detach()).all()):
            raise InvalidWeightsError(f"layer {layer.name!r} weight contains NaN or Inf")


def fit_layers(model: nn.Module, layers: list[LayerState], fit: Any, show: bool | None) -> None:
    """Fit every selected layer through :func:`rmtprune.analysis.analyze` and set its noise scale.

    A plain layer's scale is ``sqrt(sigma2)``. A factor of a low-rank layer gets the typical entry
    size of its bulk columns (``A = U sqrt(S)`` has entries of variance ``s_i / m`` in column ``i``,
    ``B = sqrt(S) V^T`` ``s_i / n`` in row ``i``); a factored layer that kept only spikes has no
    noise left to prune (verdict ``spikes-only``).
    """
    todo: dict[str, LayerEntry] = {}
    for layer in layers:
        e = layer.entry
        if e is not None and not (layer.factored_parent is None and e.handler.unsupported(e.module)):
            todo.setdefault(e.name, LayerEntry(e.name, e.module, e.handler, ""))
    result = analyze(model, fit, method="gram", progress=show, entries=list(todo.values()), metrics=False)
    for layer in layers:
        e = layer.entry
        layer.sigma = math.nan
        if e is None or e.name not in todo:
            layer.analysis = _no_fit(layer)
            continue
        la = result[e.name]
        if layer.factored_parent is None:
            layer.analysis = la
            if la.verdict == "fit" and la.fit is not None:
                layer.sigma = math.sqrt(la.fit.sigma2)
            continue
        layer.analysis, layer.sigma = _factor_fit(layer, la)


def _factor_fit(layer: LayerState, la: LayerAnalysis) -> tuple[LayerAnalysis, float]:
    if la.verdict != "fit" or la.fit is None:
        return la, math.nan
    s = np.asarray(la.s)[: la.rank]
    bulk = s[la.fit.n_spikes :]
    if bulk.size == 0:
        why = f"all {s.size} kept triplets are spikes: no noise left to prune"
        spikes = LayerAnalysis(la.name, la.shape, la.dtype, "spikes-only", la.fit, why)
        spikes.svd, spikes.rank = la.svd, la.rank
        return spikes, math.nan
    m, n = la.matrix_shape
    dim = m if layer.module is layer.parent_module.second else n  # type: ignore[union-attr]
    return la, math.sqrt(float(np.mean(bulk)) / dim)


def _no_fit(layer: LayerState) -> LayerAnalysis:
    """The record of a layer the fit cannot read (a grouped convolution mixes independent groups)."""
    w = layer.module.weight.detach()
    dtype = str(w.dtype).replace("torch.", "")
    groups = getattr(layer.module, "groups", 1)
    if groups != 1:
        why = f"grouped convolution (groups={groups}): no fit of the mixed groups"
        return LayerAnalysis(layer.name, tuple(w.shape), dtype, "grouped", None, why)
    why = layer.entry.handler.unsupported(layer.module) if layer.entry is not None else "no handler"
    return LayerAnalysis(layer.name, tuple(w.shape), dtype, "skip", None, why or "")
