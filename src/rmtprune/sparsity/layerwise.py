"""Layerwise sparsity allocators: a sparsity per layer (or per transformer block) around the target.

Each allocator reads one number per layer or block, maps it linearly to a sparsity in a band
around the global target, and leaves the choice of entries within the layer to the score
(:mod:`.scores`: Wanda's ``|W_ij| * ||X_j||_2`` per output row with calibration, ``|W_ij|``
without). Every one meets the global target over the selected layers exactly: the band is centred
so the parameter-weighted mean sparsity is the target, then :func:`~.budgets.shifted_counts` /
:func:`~.budgets.proportional_counts` absorb the caps and round to whole entries.

- ``owl`` (Yin et al. 2023): per block, the outlier ratio ``D`` = the fraction of scores above
  ``M`` times the block's mean score (``outlier_m``, 5); ``D`` min-max normalised to
  ``[0, 2 lam]``, centred, and *subtracted* from the target (more outliers, less sparsity);
  ``lam = budget_range`` (0.08). As ``prune_wanda_outlier`` in github.com/luuyin/OWL
  (``lib/prune_all.py``: ``all_layer_ratio = (D - min) / (max - min) * Lamda * 2``, minus its mean,
  plus ``1 - sparsity``), with the mean parameter-weighted (equal blocks: the same).
- ``alphapruning`` (Lu et al. 2024): per layer, the power-law exponent ``alpha`` of the ESD of
  ``W^T W`` (eigenvalues ``s**2``), averaged per block (their ``mapping_type="block_wise"``);
  ratios ``(alpha - min) / (max - min) * 2 eps + 1 - eps`` scaled by one factor so the
  parameter-weighted mean is the target: layer sparsity ``target * ratio``, a *relative* band
  ``[(1 - eps) t, (1 + eps) t]`` before the scaling (``eps = budget_range``, 0.3). Larger ``alpha``
  (lighter tail, less well trained) gives more sparsity. As ``ww_sparsity`` in
  github.com/haiquanlu/AlphaPruning (``lib/prune.py``); ``alpha`` by ``alpha_fit``: ``peak`` is
  their default ``alpha_peak`` (``net_esd_estimator(fix_fingers="xmin_peak")``: the ``xmin``
  minimising the KS distance among the eigenvalues near the peak of the log-spaced histogram, a
  Hill/MLE fit above each), ``hill`` their ``alpha_mid`` (``xmin`` the median eigenvalue: the Hill
  estimator over the top half, ``k = n/2``).
- ``rmt`` (ours): per layer, a noise-likeness read from the layer's Marchenko-Pastur (BEMA) fit
  (``rmt_metric``), averaged per block (parameter-weighted; ``allocation="layer"`` keeps it per
  layer), min-max normalised to ``[0, 1]`` and mapped to ``[t - eps, t + eps]`` (``eps =
  budget_range``, 0.2): blocks whose spectra are mostly MP bulk get more sparsity, blocks with
  strong spikes less. Metrics: ``bulk_energy`` (share of ``sum s**2`` in the bulk),
  ``bulk_fraction`` (share of singular values in the bulk), ``spike_mass`` (``-log(1 + sum over
  spikes of (s_i / s_plus)**2 / p)``). A layer whose fit the gate refused (KS above ``ks_max``), or
  with no fit, takes the mean metric of the accepted layers (the report says so). See
  :class:`RmtBudget` for the default and how it was chosen.

References
----------
Yin, L., Wu, Y., Zhang, Z., Hsieh, C.-Y., Wang, Y., Jia, Y., Pechenizkiy, M., Liang, Y., Wang, Z.
and Liu, S. (2023). Outlier weighed layerwise sparsity (OWL): a missing secret sauce for pruning
LLMs to high sparsity. arXiv:2310.05175.
Lu, H., Zhou, Y., Liu, S., Wang, Z., Mahoney, M. W. and Yang, Y. (2024). AlphaPruning: using
heavy-tailed self regularization theory for improved layer-wise pruning of large language models.
NeurIPS 2024, arXiv:2410.10912.
Sun, M., Liu, Z., Bair, A. and Kolter, J. Z. (2023). Wanda. arXiv:2306.11695.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..layers import handler_for
from .budgets import Budget, proportional_counts, register_budget, shifted_counts
from .scores import matrix_scores

if TYPE_CHECKING:
    from .state import LayerState

__all__ = [
    "ALLOCATIONS",
    "ALPHA_FITS",
    "RMT_METRICS",
    "DEFAULT_RMT_METRIC",
    "LayerwiseBudget",
    "OwlBudget",
    "AlphaPruningBudget",
    "RmtBudget",
    "block_of",
    "esd_alpha",
]

#: How a layerwise allocator groups layers: ``block`` (by transformer block prefix), ``layer``, or
#: ``auto`` (each allocator's own: OWL and AlphaPruning per block, as their papers).
ALLOCATIONS = ("auto", "block", "layer")
#: AlphaPruning's ESD exponent estimators (``peak``: their ``alpha_peak``; ``hill``: ``alpha_mid``).
ALPHA_FITS = ("peak", "hill")
#: The RMT budget's per-layer metrics (see :class:`RmtBudget`).
RMT_METRICS = ("bulk_energy", "bulk_fraction", "spike_mass")
#: The RMT budget's defaults, chosen on a validation slice (see :class:`RmtBudget`).
DEFAULT_RMT_METRIC = "bulk_energy"
DEFAULT_RMT_RANGE = 0.2
DEFAULT_RMT_ALLOCATION = "block"


def block_of(name: str) -> str:
    """The transformer block of a layer: its name up to the first numeric component after the first.

    ``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; ``encoder.layer.0.attention.self.query``
    -> ``encoder.layer.0``; a name without such a component (``fc1``, ``0``) is its own block.
    """
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return name


def _groups(layers: Sequence[LayerState], by: str) -> list[list[int]]:
    """Indices of ``layers`` per group, groups in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        out.setdefault(block_of(layer.name) if by == "block" else layer.name, []).append(i)
    return list(out.values())


def _minmax(v: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)``; all zeros when every value is the same."""
    lo, hi = float(np.min(v)), float(np.max(v))
    return np.zeros_like(v) if not hi > lo else (v - lo) / (hi - lo)


# ====================================================================== the ESD exponent
def esd_alpha(eigs: np.ndarray, fit: str = "peak", bins: int = 100) -> float:
    """Power-law exponent ``alpha`` of an empirical spectral density (AlphaPruning's ``alpha``).

    ``eigs`` are the eigenvalues of ``W^T W`` (``s**2``, any order; non-positive ones dropped).
    ``fit="hill"``: ``xmin`` the median eigenvalue, ``alpha = 1 + k / sum(log(lambda_i / xmin))``
    over the ``k = n - n // 2`` eigenvalues from it up (their ``xmin_mid``). ``fit="peak"``: that
    estimate for every ``xmin`` among the eigenvalues from ``log10(0.95 * peak)`` to
    ``1.5 * peak`` (``peak`` the left edge of the fullest of ``bins`` log10-spaced histogram bins),
    keeping the one with the smallest KS distance ``max |1 - (lambda / xmin)**(1 - alpha) - i / k|``
    (their ``xmin_peak``). The lower bound compares an eigenvalue with a base-10 logarithm, as in
    their code (``xmin_min = torch.log10(0.95 * xmin2)``), kept for fidelity: it only lowers the
    start of the scan when the peak is above 1.
    """
    if fit not in ALPHA_FITS:
        raise ValueError(f"fit={fit!r} must be one of {ALPHA_FITS}")
    e = np.sort(np.asarray(eigs, dtype=np.float64).reshape(-1))
    e = e[e > 0]
    n_all = e.size
    if n_all < 2:
        raise ValueError(f"need at least two positive eigenvalues, got {n_all}")
    log_e = np.log(e)
    tail = np.cumsum(log_e[::-1])[::-1]  # tail[i] = sum(log_e[i:])
    if fit == "hill":
        i = n_all // 2
        k = n_all - i
        return float(1 + k / (tail[i] - k * log_e[i]))
    h = np.log10(e)
    counts, edges = np.histogram(h, bins=bins, range=(h.min(), h.max()))
    peak = 10 ** edges[int(np.argmax(counts))]
    xmin_min, xmin_max = math.log10(0.95 * peak), 1.5 * peak
    best_alpha, best_d = 0.0, 1.0  # their initial values: alphas = 0, Ds = 1
    for i in range(n_all - 1):
        xmin = e[i]
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        k = n_all - i
        alpha = 1 + k / (tail[i] - k * log_e[i])
        d = 1.0
        if alpha > 1:
            d = float(np.max(np.abs(1 - (e[i:] / xmin) ** (1 - alpha) - np.arange(k) / k)))
        if d < best_d:  # first minimum, as torch.argmin
            best_alpha, best_d = alpha, d
    return float(best_alpha)


# ====================================================================== the allocators
class LayerwiseBudget(Budget):
    """A sparsity per group of layers from one number per group, mapped linearly around the target.

    Subclasses give :meth:`values` (one number per group, larger = more sparsity, and a note per
    layer), the default band ``default_range`` and grouping ``default_allocation``, and whether the
    band is additive (``[t - eps, t + eps]``) or relative (``t * [1 - eps, 1 + eps]``).
    """

    params: ClassVar[tuple[str, ...]] = ("budget_range", "allocation")
    default_range: ClassVar[float] = 0.1
    default_allocation: ClassVar[str] = "block"
    relative: ClassVar[bool] = False
    #: The metric's name in the report.
    metric_name: ClassVar[str] = "metric"

    def __init__(self, budget_range: float | None = None, allocation: str = "auto", **_: object) -> None:
        self.budget_range = self.default_range if budget_range is None else float(budget_range)
        self.allocation = self.default_allocation if allocation == "auto" else allocation

    def values(self, layers: Sequence[LayerState], groups: list[list[int]]) -> tuple[np.ndarray, list[str]]:
        """One number per group (larger: more sparsity) and a note per layer."""
        raise NotImplementedError(f"{type(self).__name__} must implement values()")

    def fractions(self, layers: Sequence[LayerState], target: float) -> tuple[list[float], list[str]]:
        """Per-layer sparsity before the exact rounding (parameter-weighted mean ``target``)."""
        groups = _groups(layers, self.allocation)
        v, notes = self.values(layers, groups)
        z = _minmax(v)
        numel = np.array([sum(layers[i].numel for i in g) for g in groups], dtype=np.float64)
        eps = self.budget_range
        if self.relative:
            frac = target * (1 - eps + 2 * eps * z)
            frac *= target * numel.sum() / max(float((frac * numel).sum()), 1e-300)
        else:
            band = 2 * eps * z
            frac = target + band - float((band * numel).sum() / numel.sum())
        out = [0.0] * len(layers)
        for g, f in zip(groups, frac, strict=True):
            for i in g:
                out[i] = float(f)
        return out, notes

    def counts(
        self, layers: Sequence[LayerState], floors: list[int], caps: list[int], total: int
    ) -> list[int]:
        if not layers:
            return []
        numels = [layer.numel for layer in layers]
        target = total / max(sum(numels), 1)
        frac, notes = self.fractions(layers, target)
        if self.relative:  # AlphaPruning's one scaling factor, solved exactly against the caps
            got = proportional_counts(numels, floors, caps, frac, total)
        else:
            got = shifted_counts(numels, floors, caps, frac, total)
        for layer, k, note in zip(layers, got, notes, strict=True):
            layer.allocation = f"{note} -> {k / max(layer.numel, 1):.1%}"
        return got


class OwlBudget(LayerwiseBudget):
    """``owl``: Outlier Weighed Layerwise sparsity (Yin et al. 2023, arXiv:2310.05175).

    Per block, ``D`` = fraction of the block's scores (Wanda's with calibration, else ``|W|``)
    above ``outlier_m`` times their mean; sparsity ``t - (2 lam z - mean)``, ``z`` the min-max
    normalised ``D``, ``lam = budget_range`` (paper and code: ``M = 5``, ``lam = 0.08``).
    """

    params = ("budget_range", "allocation", "outlier_m")
    default_range = 0.08
    metric_name = "outlier ratio D"

    def __init__(
        self, budget_range: float | None = None, allocation: str = "auto", outlier_m: float = 5.0
    ) -> None:
        super().__init__(budget_range, allocation)
        self.outlier_m = float(outlier_m)

    def values(self, layers: Sequence[LayerState], groups: list[list[int]]) -> tuple[np.ndarray, list[str]]:
        ratios, notes = [], [""] * len(layers)
        for g in groups:
            s = torch.cat([matrix_scores(layers[i], layers[i].score).reshape(-1) for i in g])
            d = float((s > self.outlier_m * s.mean()).double().mean())
            ratios.append(d)
            where = block_of(layers[g[0]].name) if self.allocation == "block" else "layer"
            for i in g:
                layers[i].metric = d
                notes[i] = f"owl: {where} outlier ratio D={d:.3%} (M={self.outlier_m:g})"
        return -np.asarray(ratios), notes  # more outliers: less sparsity


def _eigs(layer: LayerState) -> np.ndarray:
    """``s**2`` of the layer's matrix: the analysis's spectrum, or a fresh float64 SVD."""
    a = layer.analysis
    if a is not None and a.s is not None:
        s = np.asarray(a.s, dtype=np.float64)
    else:
        h = handler_for(layer.module)
        s = h.singular_values(layer.module, torch.float64).cpu().numpy()  # type: ignore[union-attr]
    return s**2


class AlphaPruningBudget(LayerwiseBudget):
    """``alphapruning``: layer sparsity from the ESD's heavy-tail exponent (Lu et al. 2024, arXiv:2410.10912).

    ``alpha`` per layer (:func:`esd_alpha`, ``alpha_fit``), its plain mean per block; ratio
    ``(alpha - min) / (max - min) * 2 eps + 1 - eps`` scaled so the parameter-weighted mean
    sparsity is the target (``eps = budget_range``; their default and LLaMA-2-7B Wanda value 0.3).
    """

    params = ("budget_range", "allocation", "alpha_fit")
    default_range = 0.3
    relative = True
    needs_spectrum = True

    def __init__(
        self, budget_range: float | None = None, allocation: str = "auto", alpha_fit: str = "peak"
    ) -> None:
        super().__init__(budget_range, allocation)
        self.alpha_fit = alpha_fit

    def values(self, layers: Sequence[LayerState], groups: list[list[int]]) -> tuple[np.ndarray, list[str]]:
        alphas = [esd_alpha(_eigs(layer), self.alpha_fit) for layer in layers]
        out, notes = [], [""] * len(layers)
        for g in groups:
            mean = float(np.mean([alphas[i] for i in g]))
            out.append(mean)
            for i in g:
                layers[i].metric = alphas[i]
                block = f", {block_of(layers[i].name)} mean {mean:.3f}" if len(g) > 1 else ""
                notes[i] = f"alphapruning: alpha_{self.alpha_fit}={alphas[i]:.3f}{block}"
        return np.asarray(out), notes


def rmt_metric(layer: LayerState, metric: str) -> float | None:
    """The layer's noise-likeness under ``metric`` (larger: more MP bulk), or None without a fit."""
    fit = layer.fit
    if fit is None:
        return None
    if metric == "bulk_energy":
        return float(fit.bulk_energy)
    if metric == "bulk_fraction":
        return float(fit.bulk_fraction)
    if metric == "spike_mass":
        s = np.asarray(fit.singular_values, dtype=np.float64)[: fit.n_spikes]
        return -math.log1p(float(np.sum((s / fit.s_plus) ** 2)) / fit.p)
    raise ValueError(f"rmt_metric={metric!r} must be one of {RMT_METRICS}")


class RmtBudget(LayerwiseBudget):
    """``rmt``: block (or layer) sparsity from the layers' MP/BEMA fits, in ``[t - eps, t + eps]``.

    A block whose layers' spectra are mostly Marchenko-Pastur bulk (``rmt_metric``:
    ``bulk_energy``, ``bulk_fraction`` or ``spike_mass``, see the module docstring; the block's
    value is the parameter-weighted mean of its layers') gets more sparsity, one with strong spikes
    less; ``eps = budget_range``. Layers without an accepted fit (the gate refused it, or none ran)
    take the mean metric of the accepted ones. ``allocation="layer"`` maps each layer on its own.

    Defaults: ``rmt_metric="bulk_energy"``, ``budget_range=0.2``, ``allocation="block"``, chosen
    together from a pre-registered grid (3 metrics x eps 0.05/0.1/0.2 x layer/block) by the lowest
    perplexity on a validation slice (Python-docs documents in neither calibration nor evaluation)
    at 70% sparsity on SmolLM2-135M with Wanda scores, never on the evaluation text
    (benchmarks/results/sparsify_real.md): 326 against uniform Wanda's 425 and AlphaPruning's 356;
    ``spike_mass`` per block came second (342), ``bulk_fraction`` per block at the same band was
    far worse (1300). Per layer, every metric and band was worse than uniform (456-740): within a
    block the MP-like layers (value and up projections) are not the cheap ones to prune, so the
    RMT signal is used between blocks, as OWL and AlphaPruning use theirs.
    """

    params = ("budget_range", "allocation", "rmt_metric")
    default_range = DEFAULT_RMT_RANGE
    default_allocation = DEFAULT_RMT_ALLOCATION
    needs_spectrum = True

    def __init__(
        self,
        budget_range: float | None = None,
        allocation: str = "auto",
        rmt_metric: str = DEFAULT_RMT_METRIC,
    ) -> None:
        super().__init__(budget_range, allocation)
        if rmt_metric not in RMT_METRICS:
            raise ValueError(f"rmt_metric={rmt_metric!r} must be one of {RMT_METRICS}")
        self.rmt_metric = rmt_metric

    def values(self, layers: Sequence[LayerState], groups: list[list[int]]) -> tuple[np.ndarray, list[str]]:
        raw = [rmt_metric(layer, self.rmt_metric) if layer.fitted else None for layer in layers]
        accepted = [v for v in raw if v is not None]
        mean = float(np.mean(accepted)) if accepted else 0.0
        name = self.rmt_metric
        notes = []
        for layer, v in zip(layers, raw, strict=True):
            layer.metric = v if v is not None else mean
            if v is not None:
                notes.append(f"rmt: {name}={v:.3f}")
            else:
                why = layer.analysis.verdict if layer.analysis is not None else "no fit"
                notes.append(f"rmt: no accepted fit ({why}): mean {name} of the accepted layers {mean:.3f}")
        out = []
        for g in groups:
            w = np.array([layers[i].numel for i in g], dtype=np.float64)
            out.append(float(np.dot(w, [layers[i].metric for i in g]) / w.sum()))
        if self.allocation == "block":
            notes = [f"{n}, {block_of(layer.name)} mean" for n, layer in zip(notes, layers, strict=True)]
        return np.asarray(out), notes


for _name, _cls in (("owl", OwlBudget), ("alphapruning", AlphaPruningBudget), ("rmt", RmtBudget)):
    register_budget(_name, _cls)
