"""What sparsification did (or plans to do), layer by layer: records, warnings and their rendering."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .._format import dumps, table
from ..masks import get_mask
from .state import LayerState

__all__ = ["LayerSparsity", "SparsifyReport", "layer_record", "dense_warning"]


@dataclass
class LayerSparsity:
    """One selected layer: its fit, what step 1 did, its budget and nonzeros before / after."""

    name: str
    layer_type: str
    kind: str
    shape: list[int]
    dtype: str
    verdict: str
    reason: str
    params: int
    nnz_before: int
    nnz_after: int
    n_spikes: int | None = None
    n_bulk: int | None = None
    ks: float | None = None
    s_plus: float | None = None
    sigma: float | None = None
    score: float | None = None
    sv_zeroed_u: float | None = None
    sv_zeroed_v: float | None = None
    sv_rel_change: float | None = None
    #: What a layerwise budget read for this layer (OWL's outlier ratio, AlphaPruning's alpha, the
    #: RMT metric) and, in words, the sparsity it gave and why.
    metric: float | None = None
    allocation: str = ""

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are pruned (as stored)."""
        return 1.0 - self.nnz_after / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (with ``sparsity``)."""
        out = asdict(self)
        out["sparsity"] = self.sparsity
        return out

    def cells(self) -> list[str]:
        """The table cells after name, kind, shape and verdict: spikes, ks, sv zeroed, sparsity, nnz."""
        sv = "-" if self.sv_zeroed_u is None else f"{(self.sv_zeroed_u + self.sv_zeroed_v) / 2:.1%}"  # type: ignore[operator]
        return [
            "-" if self.n_spikes is None else str(self.n_spikes),
            "-" if self.ks is None else f"{self.ks:.3f}",
            sv,
            f"{self.sparsity:.1%}",
            f"{self.nnz_after:,}/{self.params:,}",
        ]


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did, layer by layer and cycle by cycle, with nonzeros as stored."""

    target: float
    budget: str
    achieved: float
    selected_params: int
    selected_nnz: int
    total_params: int
    stored_values: int
    layers: list[LayerSparsity]
    cycles: list[dict[str, Any]] = field(default_factory=list)
    final_finetune: dict[str, Any] | None = None
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    #: The within-layer score: ``magnitude`` (``|w|``) or ``wanda`` (``|w| * ||X_j||_2`` per output row).
    score: str = "magnitude"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        out = asdict(self)
        out["layers"] = [layer.to_dict() for layer in self.layers]
        return out

    def to_json(self) -> str:
        """Indented JSON."""
        return dumps(self.to_dict(), indent=2, sort_keys=True)

    def table(self) -> str:
        """Fixed-width per-layer table (the CLI prints it)."""
        head = ("layer", "kind", "shape", "verdict", "spikes", "ks", "sv-zeroed", "sparsity", "nnz")
        rows = [[r.name, r.kind, "x".join(map(str, r.shape)), r.verdict, *r.cells()] for r in self.layers]
        if any(r.allocation for r in self.layers):  # a layerwise budget: say why each layer got its share
            head += ("why",)
            rows = [row + [r.allocation or "-"] for row, r in zip(rows, self.layers, strict=True)]
        return table(head, rows, sep_line=False)

    @property
    def saved(self) -> float:
        """Fraction of the model's parameters not stored (``1 - stored_values / total_params``)."""
        return 1.0 - self.stored_values / self.total_params if self.total_params else 0.0

    def summary(self) -> str:
        """One paragraph: target, achieved, nonzeros as stored, accuracy where measured."""
        verb = "planned" if self.dry_run else "achieved"
        text = (
            f"budget={self.budget} target={self.target:.1%} {verb}={self.achieved:.2%} over "
            f"{self.selected_params:,} selected weights; stored values {self.stored_values:,} of "
            f"{self.total_params:,} parameters ({self.saved:.1%} fewer)"
        )
        if self.score != "magnitude":
            text += f"; within-layer score {self.score}"
        if self.eval_before and self.eval_after:
            text += f"; accuracy {self.eval_before['accuracy']:.2%} -> {self.eval_after['accuracy']:.2%}"
        return text

    def to_markdown(self) -> str:
        """Markdown: summary, warnings, cycles and the per-layer table."""
        out = ["# rmtprune sparsify report", "", self.summary(), ""]
        if self.warnings:
            out += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        if self.cycles:
            rows = []
            for c in self.cycles:
                ft = c.get("finetune") or {}
                ev = c.get("eval") or {}
                loss = f"{ft['mean_loss']:.4f}" if ft.get("steps") else "-"
                acc = f"{ev['accuracy']:.2%}" if ev else "-"
                rows.append([c["cycle"], f"{c['target']:.1%}", f"{c['achieved']:.2%}", loss, acc])
            head = ("cycle", "target", "achieved", "fine-tune loss", "accuracy")
            out += ["## Cycles", "", table(head, rows, markdown=True), ""]
        cols = ("layer", "kind", "shape", "verdict", "reason", "spikes", "ks", "sv zeroed", "sparsity", "nnz")
        rows = [
            [f"`{r.name}`", r.kind, "x".join(map(str, r.shape)), r.verdict, r.reason or "-", *r.cells()]
            for r in self.layers
        ]
        if any(r.allocation for r in self.layers):
            cols += ("why",)
            rows = [row + [r.allocation or "-"] for row, r in zip(rows, self.layers, strict=True)]
        out += ["## Layers", "", table(cols, rows, markdown=True)]
        return "\n".join(out) + "\n"


def _reason(layer: LayerState, nnz_after: int) -> str:
    a = layer.analysis
    reason = ""
    if layer.protected:
        reason = "output layer kept dense (protect_last)"
    elif a is None:
        reason = "no fit needed by this budget"
    elif a.verdict != "fit":
        reason = (
            f"left dense: {a.message or a.verdict}" if nnz_after == layer.numel else (a.message or a.verdict)
        )
    if layer.factored_parent:
        reason = (reason + "; " if reason else "") + f"factor of low-rank layer '{layer.factored_parent}'"
    return reason


def layer_record(layer: LayerState, planned: int | None = None) -> LayerSparsity:
    """The report row of ``layer`` as it is now, or with ``planned`` entries pruned (a plan)."""
    w = layer.module.weight
    a = layer.analysis
    fit = a.fit if a is not None else None
    mask = get_mask(layer.module)
    nnz_after = layer.numel if mask is None else int(mask.sum())
    sparse = mask is not None and nnz_after < layer.numel
    kind = "factored" if layer.factored_parent else "dense"
    if sparse:
        kind = "factored+sparse" if layer.factored_parent else "sparse"
    reason = _reason(layer, nnz_after)
    if planned is not None:
        nnz_after = layer.numel - planned
        if planned and kind in ("dense", "factored"):
            kind = "factored+sparse" if layer.factored_parent else "sparse"
    sv = layer.sv_info or {}
    return LayerSparsity(
        name=layer.name,
        layer_type=type(layer.module).__name__,
        kind=kind,
        shape=[int(v) for v in w.shape],
        dtype=str(w.dtype).replace("torch.", ""),
        verdict=a.verdict if a is not None else "not-fitted",
        reason=reason,
        params=layer.numel,
        nnz_before=layer.nnz_before,
        nnz_after=nnz_after,
        n_spikes=fit.n_spikes if fit is not None else None,
        n_bulk=fit.n_bulk if fit is not None else None,
        ks=fit.ks if fit is not None else None,
        s_plus=fit.s_plus if fit is not None else None,
        sigma=layer.sigma if math.isfinite(layer.sigma) else None,
        score=fit.bulk_fraction if fit is not None else None,
        sv_zeroed_u=sv.get("zeroed_u"),
        sv_zeroed_v=sv.get("zeroed_v"),
        sv_rel_change=sv.get("rel_change"),
        metric=layer.metric,
        allocation=layer.allocation,
    )


def dense_warning(layers: list[LayerState], records: list[LayerSparsity], needs_fit: bool) -> list[str]:
    """One warning naming the layers a fit-based budget left dense for want of an accepted fit."""
    if not needs_fit:
        return []
    dense = [
        r.name
        for layer, r in zip(layers, records, strict=True)
        if not layer.protected and r.verdict not in ("fit", "not-fitted") and r.nnz_after == r.params
    ]
    dense += [
        r.name
        for layer, r in zip(layers, records, strict=True)
        if not layer.protected and r.verdict == "fit" and r.sigma is None and r.nnz_after == r.params
    ]
    if not dense:
        return []
    # A transformer has hundreds of such layers: name a few, the table lists them all.
    shown = ", ".join(dense[:_NAMED]) + (
        f" and {len(dense) - _NAMED} more (see the table)" if len(dense) > _NAMED else ""
    )
    return [f"{len(dense)} layer(s) left dense without an accepted MP fit: {shown}"]


#: How many layer names a warning lists before "and N more".
_NAMED = 5
