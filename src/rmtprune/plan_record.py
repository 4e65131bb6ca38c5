"""The plan record: one serializable decision per layer (:class:`LayerPlan`) and the whole :class:`Plan`.

What :func:`rmtprune.plan` returns, :func:`rmtprune.apply` performs and :func:`rmtprune.compress`
returns as its report: a JSON round trip (:meth:`Plan.to_json` / :meth:`Plan.from_json`), a text
table (:meth:`Plan.table`) and a Markdown one (:meth:`Plan.to_markdown`), rendered through
:mod:`rmtprune._format` like every other report. No torch here: the records are plain data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from ._format import dumps, human, ratio
from ._format import table as render_table
from .config import CompressionConfig

__all__ = ["ACTIONS", "LayerPlan", "Plan"]

#: What :func:`apply` does to a layer: ``factor`` (replace by two thin layers), ``dense-truncate``
#: (write the rank-k reconstruction into the dense weight), ``keep`` (analysed, left as is),
#: ``skip`` (not analysed: unsupported type, grouped conv, parametrized weight such as
#: ``weight_norm``, or not selected by the patterns).
ACTIONS = ("factor", "dense-truncate", "keep", "skip")


# ====================================================================== the plan record
@dataclass
class LayerPlan:
    """The decision for one layer (the public contract read by reports and the training pruner).

    ``rank_before`` is the rank the layer has now (``p`` for a dense layer, ``k`` for a factored
    one) and ``rank`` the rank after :func:`apply` (equal for ``keep``; None for ``skip``).
    ``fit`` is the BEMA fit summary (``SpectrumFit.to_dict()``: sigma2, n_spikes, n_bulk, ks, ...)
    and ``decision`` the rank rule's record (``RankDecision.to_dict()``), where they ran.
    MACs are per sample (per token for linear layers applied to sequences); None where they
    depend on an input size that was not given. ``svd_dtype`` is the layer's resolved SVD
    precision (per-layer overrides applied; None for ``skip``), what :func:`~rmtprune.apply` uses.
    ``truncation`` is ``whitened`` for a layer cut in its calibration-whitened space (its factors
    live only in the in-memory plan), ``svd`` or None for a plain truncated SVD.
    """

    name: str
    layer_type: str
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int] | None
    action: str
    reason: str
    rank_before: int | None = None
    rank: int | None = None
    rule: str | None = None
    fit: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    dtype: str = ""
    svd_dtype: str | None = None
    truncation: str | None = None
    _svd: Any = field(default=None, repr=False, compare=False)

    @property
    def sigma2(self) -> float | None:
        """Fitted noise variance, or None when no fit ran."""
        return None if self.fit is None else self.fit.get("sigma2")

    @property
    def n_spikes(self) -> int | None:
        """Singular values above the BEMA edge, or None when no fit ran."""
        return None if self.fit is None else self.fit.get("n_spikes")

    @property
    def ks(self) -> float | None:
        """KS distance of the bulk to the fitted MP law, or None when no fit ran."""
        return None if self.fit is None else self.fit.get("ks")

    @property
    def changes(self) -> bool:
        """Whether :func:`apply` modifies this layer."""
        return self.action in ("factor", "dense-truncate")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the public fields."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["shape"] = list(self.shape)
        out["matrix_shape"] = None if self.matrix_shape is None else list(self.matrix_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        """Build from :meth:`to_dict` output (``ValueError`` for an unknown action)."""
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        if data.get("matrix_shape") is not None:
            data["matrix_shape"] = tuple(data["matrix_shape"])
        if data.get("action") not in ACTIONS:
            raise ValueError(f"action={data.get('action')!r} of layer {data.get('name')!r} not in {ACTIONS}")
        return cls(**data)


@dataclass
class Plan:
    """Per-layer decisions for a whole model, plus the config and totals. JSON round trip.

    Iterate it for the :class:`LayerPlan` records, index it by layer name. After :func:`apply`
    (or :func:`compress`, which returns it as the report) ``applied`` is True. ``budget`` records a
    ``target`` / ``target_macs`` plan: the allocation, the threshold, the cost before / wanted /
    after, and what the guard changed.
    """

    layers: list[LayerPlan]
    config: CompressionConfig
    model_params_before: int = 0
    warnings: list[str] = field(default_factory=list)
    applied: bool = False
    rmtprune_version: str = __version__
    budget: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> LayerPlan:
        if isinstance(key, int):
            return self.layers[key]
        for lp in self.layers:
            if lp.name == key:
                return lp
        raise KeyError(f"no layer {key!r} in the plan")

    @property
    def names(self) -> list[str]:
        return [lp.name for lp in self.layers]

    def by_action(self, action: str) -> list[LayerPlan]:
        """The layers with this action (one of :data:`ACTIONS`)."""
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} must be one of {ACTIONS}")
        return [lp for lp in self.layers if lp.action == action]

    @property
    def params_before(self) -> int:
        """Parameters of the planned layers now."""
        return sum(lp.params_before for lp in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the planned layers after :func:`apply`."""
        return sum(lp.params_after for lp in self.layers)

    @property
    def model_params_after(self) -> int:
        """Parameters of the whole model after :func:`apply`."""
        return self.model_params_before - (self.params_before - self.params_after)

    @property
    def macs_before(self) -> int | None:
        """MACs per sample of the layers where they are known (None if none is)."""
        v = [lp.macs_before for lp in self.layers if lp.macs_before is not None]
        return sum(v) if v else None

    @property
    def macs_after(self) -> int | None:
        v = [lp.macs_after for lp in self.layers if lp.macs_after is not None]
        return sum(v) if v else None

    def totals(self) -> dict[str, Any]:
        """Counts per action and parameter / MAC totals."""
        return {
            "layers": len(self.layers),
            **{a: len(self.by_action(a)) for a in ACTIONS},
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "layer_params_before": self.params_before,
            "layer_params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict: version, config, totals and every layer's record."""
        return {
            "rmtprune_version": self.rmtprune_version,
            "applied": self.applied,
            "config": self.config.to_dict(),
            "model_params_before": self.model_params_before,
            "warnings": list(self.warnings),
            "budget": self.budget,
            "totals": self.totals(),
            "layers": [lp.to_dict() for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Build from :meth:`to_dict` output (a plan written before ``svd_dtype`` was recorded per
        layer gets it from its config)."""
        config = CompressionConfig.from_dict(data["config"])
        layers = []
        for d in data["layers"]:
            if "svd_dtype" not in d and d.get("action") != "skip":
                d = {**d, "svd_dtype": config.for_layer(d["name"]).svd_dtype}
            layers.append(LayerPlan.from_dict(d))
        return cls(
            layers=layers,
            config=config,
            model_params_before=int(data.get("model_params_before", 0)),
            warnings=list(data.get("warnings", [])),
            applied=bool(data.get("applied", False)),
            rmtprune_version=str(data.get("rmtprune_version", "")),
            budget=data.get("budget"),
        )

    def to_json(self) -> str:
        """Indented JSON text of :meth:`to_dict`."""
        return dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ text
    def _rows(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "type", "matrix", "action", "rank", "spikes", "ks", "params", "MACs", "reason"]
        rows = []
        for lp in self.layers:
            mat = "" if lp.matrix_shape is None else f"{lp.matrix_shape[0]}x{lp.matrix_shape[1]}"
            rank = "" if lp.rank_before is None else f"{lp.rank_before} -> {lp.rank}"
            ks = "" if lp.ks is None else f"{lp.ks:.3f}"
            spikes = "" if lp.n_spikes is None else str(lp.n_spikes)
            params = f"{human(lp.params_before)} -> {human(lp.params_after)}"
            macs = "" if lp.macs_before is None else f"{human(lp.macs_before)} -> {human(lp.macs_after)}"
            rows.append([lp.name, lp.layer_type, mat, lp.action, rank, spikes, ks, params, macs, lp.reason])
        return head, rows

    def summary_lines(self) -> list[str]:
        """Totals as short lines (parameters of the whole model, MACs of the planned layers)."""
        t = self.totals()
        before, after = t["model_params_before"], t["model_params_after"]
        lines = [
            f"layers: {t['factor']} factor, {t['dense-truncate']} dense-truncate, {t['keep']} keep, "
            f"{t['skip']} skip",
            f"params: {before:,} -> {after:,} ({ratio(after, before)})",
        ]
        if t["macs_before"]:
            lines.append(
                f"MACs/sample (planned layers with known input size): {t['macs_before']:,} -> "
                f"{t['macs_after']:,} ({ratio(t['macs_after'], t['macs_before'])})"
            )
        b = self.budget
        if b:
            what = "MACs" if b["of"] == "macs" else "parameters"
            lines.append(
                f"budget: {b['allocation']} allocation ({b['truncation']} truncation) kept "
                f"{b['after']:,} of {b['before']:,} selected-layer {what} ({ratio(b['after'], b['before'])}; "
                f"asked {b['target'] if b['of'] == 'params' else b['target_macs']})"
            )
            for g in b.get("guard_changes", []):
                lines.append(
                    f"guard: {g['layer']} error {g['error']:.3g} at rank {g['rank']} -> rank {g['new_rank']} "
                    f"(error {g['new_error']:.3g})"
                )
        lines += [f"warning: {w}" for w in self.warnings]
        return lines

    def table(self) -> str:
        """The per-layer plan as an aligned text table followed by the totals."""
        head, rows = self._rows()
        return "\n".join([render_table(head, rows), "", *self.summary_lines()]) + "\n"

    def to_markdown(self) -> str:
        """The per-layer plan as a Markdown table followed by the totals."""
        head, rows = self._rows()
        return (
            "\n".join(
                [render_table(head, rows, markdown=True), "", *(f"- {s}" for s in self.summary_lines())]
            )
            + "\n"
        )
