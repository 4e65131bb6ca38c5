"""What sparsification did (or plans to do), layer by layer: records, warnings and their rendering."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._format import dumps, table
from ..masks import get_mask
from .state import LayerState
from .storage import StoredSize, encoded_sizes, tensor_size

__all__ = ["LayerSparsity", "SparsifyReport", "layer_record", "dense_warning", "storage_totals"]

#: What the two counts of a report are, in the words the table, summary and Markdown use.
COUNTS_NOTE = (
    "nonzero values: the entries kept (every parameter of a dense tensor, the kept entries of a "
    "pruned one); stored incl. index: what the file holds, those values plus the bitmask/CSR index "
    "bytes of each pruned weight (rmtprune.sparse_format), in parameter-equivalents (bytes / bytes per value)"
)


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
    #: How the weight is written (:mod:`rmtprune.sparse_format`): ``dense`` (no mask), ``bitmask`` or
    #: ``csr``; the bytes of its kept-entry pattern; its bytes in all (values at its dtype + pattern);
    #: and those bytes in values of its dtype (parameter-equivalents, index included).
    storage: str = "dense"
    index_bytes: int = 0
    stored_bytes: int = 0
    stored_equiv: float = 0.0

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
        """The table cells after name, kind, shape and verdict: spikes, ks, sv zeroed, sparsity, nonzero
        values, stored incl. index (parameter-equivalents and format)."""
        sv = "-" if self.sv_zeroed_u is None else f"{(self.sv_zeroed_u + self.sv_zeroed_v) / 2:.1%}"  # type: ignore[operator]
        return [
            "-" if self.n_spikes is None else str(self.n_spikes),
            "-" if self.ks is None else f"{self.ks:.3f}",
            sv,
            f"{self.sparsity:.1%}",
            f"{self.nnz_after:,}/{self.params:,}",
            f"{self.stored_equiv:,.0f} ({self.storage})",
        ]


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did, layer by layer and cycle by cycle, with what the file stores.

    Two counts, not to be confused: ``stored_values`` is the number of *nonzero values* (every
    parameter of an unpruned tensor plus the kept entries of pruned weights), without the pattern
    that says where they are; ``stored_bytes`` is what :mod:`rmtprune.sparse_format` writes for the
    model's state dict in ``storage`` -- values at their dtype *plus* the bitmask/CSR index bytes
    (tied tensors once, buffers included, the file header not) -- and ``stored_equiv`` the same in
    parameter-equivalents (bytes / bytes per value, per tensor). ``dense_bytes`` is that state dict
    written dense. The byte fields are None when the state dict cannot be encoded.
    """

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
    #: The sparse storage format asked for (``auto``, ``bitmask`` or ``csr``) and what it writes.
    storage: str = "auto"
    stored_bytes: int | None = None
    index_bytes: int | None = None
    dense_bytes: int | None = None
    stored_equiv: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (with ``counts``, which says what ``stored_values`` and ``stored_bytes`` count)."""
        out = asdict(self)
        out["layers"] = [layer.to_dict() for layer in self.layers]
        out["counts"] = COUNTS_NOTE
        return out

    def to_json(self) -> str:
        """Indented JSON."""
        return dumps(self.to_dict(), indent=2, sort_keys=True)

    def table(self) -> str:
        """Fixed-width per-layer table (the CLI prints it)."""
        head = _HEAD
        rows = [[r.name, r.kind, "x".join(map(str, r.shape)), r.verdict, *r.cells()] for r in self.layers]
        if any(r.allocation for r in self.layers):  # a layerwise budget: say why each layer got its share
            head += ("why",)
            rows = [row + [r.allocation or "-"] for row, r in zip(rows, self.layers, strict=True)]
        return table(head, rows, sep_line=False)

    @property
    def saved(self) -> float:
        """Fraction of the model's parameters that are not nonzero values (``1 - stored_values /
        total_params``); index bytes not counted, see :attr:`saved_bytes`."""
        return 1.0 - self.stored_values / self.total_params if self.total_params else 0.0

    @property
    def saved_bytes(self) -> float | None:
        """Fraction of the dense bytes the file does not store, index bytes counted
        (``1 - stored_bytes / dense_bytes``)."""
        if self.stored_bytes is None or not self.dense_bytes:
            return None
        return 1.0 - self.stored_bytes / self.dense_bytes

    def summary(self) -> str:
        """One paragraph: target, achieved, nonzero values and what is stored with the index bytes,
        accuracy where measured."""
        verb = "planned" if self.dry_run else "achieved"
        text = (
            f"budget={self.budget} target={self.target:.1%} {verb}={self.achieved:.2%} over "
            f"{self.selected_params:,} selected weights; nonzero values {self.stored_values:,} of "
            f"{self.total_params:,} parameters ({self.saved:.1%} fewer)"
        )
        if self.stored_bytes is not None and self.stored_equiv is not None:
            text += (
                f"; stored incl. index bytes ({self.storage}): {self.stored_equiv:,.0f} "
                f"parameter-equivalents, {self.stored_bytes:,} bytes ({self.index_bytes:,} of them index), "
                f"{self.saved_bytes:.1%} fewer than the {self.dense_bytes:,} dense bytes"
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
        cols = ("layer", "kind", "shape", "verdict", "reason", *_HEAD[4:])
        rows = [
            [f"`{r.name}`", r.kind, "x".join(map(str, r.shape)), r.verdict, r.reason or "-", *r.cells()]
            for r in self.layers
        ]
        if any(r.allocation for r in self.layers):
            cols += ("why",)
            rows = [row + [r.allocation or "-"] for row, r in zip(rows, self.layers, strict=True)]
        out += ["## Layers", "", table(cols, rows, markdown=True), "", f"Counts: {COUNTS_NOTE}."]
        return "\n".join(out) + "\n"


_HEAD = (
    "layer", "kind", "shape", "verdict", "spikes", "ks", "sv-zeroed", "sparsity", "nonzero values",
    "stored incl. index",
)  # fmt: skip


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


def layer_record(layer: LayerState, planned: int | None = None, storage: str = "auto") -> LayerSparsity:
    """The report row of ``layer`` as it is now, or with ``planned`` entries pruned (a plan); its bytes
    as :mod:`rmtprune.sparse_format` writes it in ``storage``."""
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
    masked = mask is not None
    if planned is not None:
        nnz_after = layer.numel - planned
        masked = masked or planned > 0  # a layer the plan prunes nothing of stays unmasked
        if planned and kind in ("dense", "factored"):
            kind = "factored+sparse" if layer.factored_parent else "sparse"
    shape = tuple(int(v) for v in w.shape)
    if masked:
        size = tensor_size(shape, nnz_after, w.dtype, storage)
    else:
        size = StoredSize("dense", layer.numel, layer.numel, w.element_size(), 0)
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
        storage=size.format,
        index_bytes=size.index_bytes,
        stored_bytes=size.bytes,
        stored_equiv=size.equivalent,
    )


def storage_totals(
    model: nn.Module, kept: Mapping[str, torch.Tensor | int], storage: str
) -> tuple[dict[str, Any], list[str]]:
    """The report's byte fields for ``model``'s state dict with the entries in ``kept`` (masks or kept
    counts, keyed ``"<layer>.weight"``) stored sparsely in ``storage``, and a warning when the state
    dict cannot be encoded (the fields are then None)."""
    try:
        sizes = encoded_sizes(model.state_dict(), kept, storage).values()
    except (KeyError, ValueError) as exc:
        none = {"stored_bytes": None, "index_bytes": None, "dense_bytes": None, "stored_equiv": None}
        return none, [f"stored bytes not computed: the state dict cannot be stored sparsely ({exc})"]
    return {
        "stored_bytes": sum(s.bytes for s in sizes),
        "index_bytes": sum(s.index_bytes for s in sizes),
        "dense_bytes": sum(s.dense_bytes for s in sizes),
        "stored_equiv": sum(s.equivalent for s in sizes),
    }, []


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
