"""Plan and apply low-rank compression of a model: one serializable decision per layer, then surgery.

The pipeline is :func:`plan` (singular values, BEMA fit, rank rule -> :class:`Plan`, the model is
not touched) then :func:`apply` (replace each layer to factor by a :class:`~rmtprune.lowrank`
module, in place, restoring everything if anything fails). :func:`compress` is the two together,
computing each layer's SVD once.

Which layer types are prunable, and how, is the registry of :mod:`rmtprune.layers`; the spectra and
fits come from the analyze stage, :func:`rmtprune.analyze`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._progress import progress as _progress
from .analysis import LayerAnalysis, analyze
from .config import CompressionConfig, match_pattern
from .errors import InvalidWeightsError, RmtpruneError, first_line
from .layers import (  # noqa: F401  (LinearHandler, TransposedLinearHandler: old import path, kept one release)
    LayerEntry,
    LayerHandler,
    LinearHandler,
    TransposedLinearHandler,
    collect_layers,
    handler_for,
    parametrized,
    register_handler,
    supported_types,
)

__all__ = [
    "ACTIONS",
    "LayerPlan",
    "Plan",
    "plan",
    "apply",
    "compress",
    "LayerHandler",
    "register_handler",
    "handler_for",
]

#: What :func:`apply` does to a layer: ``factor`` (replace by two thin layers), ``dense-truncate``
#: (write the rank-k reconstruction into the dense weight), ``keep`` (analysed, left as is),
#: ``skip`` (not analysed: unsupported type, grouped conv, parametrized weight such as
#: ``weight_norm``, or not selected by the patterns).
ACTIONS = ("factor", "dense-truncate", "keep", "skip")

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ====================================================================== the plan record
@dataclass
class LayerPlan:
    """The decision for one layer (the public contract read by reports and the training pruner).

    ``rank_before`` is the rank the layer has now (``p`` for a dense layer, ``k`` for a factored
    one) and ``rank`` the rank after :func:`apply` (equal for ``keep``; None for ``skip``).
    ``fit`` is the BEMA fit summary (``SpectrumFit.to_dict()``: sigma2, n_spikes, n_bulk, ks, ...)
    and ``decision`` the rank rule's record (``RankDecision.to_dict()``), where they ran.
    MACs are per sample (per token for linear layers applied to sequences); None where they
    depend on an input size that was not given.
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
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["shape"] = list(self.shape)
        out["matrix_shape"] = None if self.matrix_shape is None else list(self.matrix_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
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
    (or :func:`compress`, which returns it as the report) ``applied`` is True.
    """

    layers: list[LayerPlan]
    config: CompressionConfig
    model_params_before: int = 0
    warnings: list[str] = field(default_factory=list)
    applied: bool = False
    rmtprune_version: str = __version__

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
        return {
            "rmtprune_version": self.rmtprune_version,
            "applied": self.applied,
            "config": self.config.to_dict(),
            "model_params_before": self.model_params_before,
            "warnings": list(self.warnings),
            "totals": self.totals(),
            "layers": [lp.to_dict() for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            layers=[LayerPlan.from_dict(d) for d in data["layers"]],
            config=CompressionConfig.from_dict(data["config"]),
            model_params_before=int(data.get("model_params_before", 0)),
            warnings=list(data.get("warnings", [])),
            applied=bool(data.get("applied", False)),
            rmtprune_version=str(data.get("rmtprune_version", "")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
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
            params = f"{_human(lp.params_before)} -> {_human(lp.params_after)}"
            macs = "" if lp.macs_before is None else f"{_human(lp.macs_before)} -> {_human(lp.macs_after)}"
            rows.append([lp.name, lp.layer_type, mat, lp.action, rank, spikes, ks, params, macs, lp.reason])
        return head, rows

    def summary_lines(self) -> list[str]:
        """Totals as short lines (parameters of the whole model, MACs of the planned layers)."""
        t = self.totals()
        before, after = t["model_params_before"], t["model_params_after"]
        lines = [
            f"layers: {t['factor']} factor, {t['dense-truncate']} dense-truncate, {t['keep']} keep, "
            f"{t['skip']} skip",
            f"params: {before:,} -> {after:,} ({_ratio(after, before)})",
        ]
        if t["macs_before"]:
            lines.append(
                f"MACs/sample (planned layers with known input size): {t['macs_before']:,} -> "
                f"{t['macs_after']:,} ({_ratio(t['macs_after'], t['macs_before'])})"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return lines

    def table(self) -> str:
        """The per-layer plan as an aligned text table followed by the totals."""
        head, rows = self._rows()
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join([*lines, "", *self.summary_lines()]) + "\n"

    def to_markdown(self) -> str:
        """The per-layer plan as a Markdown table followed by the totals."""
        head, rows = self._rows()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join([*lines, "", *(f"- {s}" for s in self.summary_lines())]) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _human(n: int | None) -> str:
    if n is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%} of before" if before else "n/a"


# ====================================================================== planning
def _positions(model: nn.Module, entries: list[LayerEntry], example_input: Any) -> dict[str, int]:
    """Output positions per sample of each entry, from one forward pass on ``example_input``."""
    found: dict[str, int] = {}
    hooks = []
    batch = [1]

    def make_hook(name: str, m_out: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.numel() and m_out:
                found[name] = int(out.numel() // (m_out * batch[0]))

        return hook

    for e in entries:
        if e.handler is not None and not e.reason:
            m = e.handler.matrix_shape(e.module)[0]
            hooks.append(e.module.register_forward_hook(make_hook(e.name, m)))
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        if isinstance(inputs[0], torch.Tensor) and inputs[0].ndim > 0:
            batch[0] = int(inputs[0].shape[0]) or 1
        with torch.no_grad():
            try:
                model(*inputs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shape = tuple(inputs[0].shape) if isinstance(inputs[0], torch.Tensor) else "?"
                raise ValueError(
                    f"the example input of shape {shape} does not fit the model ({first_line(exc, 200)}); "
                    "check --input-shape"
                ) from None
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    return found


def _warn_unmatched(config: CompressionConfig, names: list[str]) -> list[str]:
    out = []
    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for p in patterns:
            if not any(match_pattern(n, p) for n in names):
                out.append(f"{kind} pattern {p!r} matches no layer")
    for p in config.overrides:
        if not any(match_pattern(n, p) for n in names):
            out.append(f"override pattern {p!r} matches no layer")
    for msg in out:
        warnings.warn(msg, UserWarning, stacklevel=3)
    return out


def _check_finite(entries: list[LayerEntry]) -> None:
    for e in entries:
        for w in e.handler.weights(e.module):
            if not bool(torch.isfinite(w.detach()).all()):
                raise InvalidWeightsError(
                    f"layer {e.name!r} has NaN or Inf weights; the model was not changed"
                )


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plan_layer(la: LayerAnalysis, cfg: CompressionConfig, positions: int | None) -> LayerPlan:
    """The decision for one analysed layer: the rule's rank, then factor / dense-truncate / keep."""
    h, mod, name = la.handler, la.module, la.name
    m, n = la.matrix_shape
    p = min(m, n)
    bias = h.has_bias(mod)
    k_now = la.rank
    w_now = k_now * (m + n) if la.factored else m * n
    params_now = _param_count(mod)
    lp = LayerPlan(
        name=name,
        layer_type=la.layer_type,
        shape=la.shape,
        matrix_shape=(m, n),
        action="keep",
        reason="",
        rank_before=k_now,
        rank=k_now,
        rule=cfg.rule,
        params_before=params_now,
        params_after=params_now,
        macs_before=None if positions is None else w_now * positions,
        macs_after=None if positions is None else w_now * positions,
        dtype=la.dtype,
    )
    if la.verdict == "too-small":
        lp.reason = la.message
        return lp
    fit = la.fit
    lp.fit = None if fit is None else fit.to_dict()
    if cfg.rule == "bema" and la.verdict != "fit":
        lp.reason = f"{la.message}; kept" if fit is None else f"no MP-like bulk ({la.message}); kept"
        return lp
    try:
        decision = cfg.make_rule().select(la.s, (m, n), fit=fit)
    except ValueError as exc:
        raise ValueError(f"{exc} for layer {name!r} (rule {cfg.rule!r})") from None
    lp.decision = decision.to_dict()
    k = min(max(decision.rank, cfg.min_rank), p)
    why = decision.reason + (f", raised to min_rank={cfg.min_rank}" if decision.rank < cfg.min_rank else "")
    if k > k_now or (k == k_now and (la.factored or cfg.factor_only_if_smaller)):
        lp.reason = f"{why}; rank {k} >= current rank {k_now}: nothing to cut"
        return lp
    smaller = k * (m + n) < m * n
    if la.factored or smaller or not cfg.factor_only_if_smaller:
        lp.action = "factor"
        w_after = k * (m + n)
        lp.params_after = w_after + (m if bias else 0)
        lp.reason = why
    elif cfg.dense_truncate:
        lp.action = "dense-truncate"
        w_after = m * n
        lp.reason = f"{why}; k(m+n)={k * (m + n)} >= mn={m * n}: rank-{k} weight written back dense"
    else:
        lp.reason = f"{why}; k(m+n)={k * (m + n)} >= mn={m * n}: factoring would not save parameters; kept"
        return lp
    lp.rank = k
    if positions is not None:
        lp.macs_after = w_after * positions
    if la.svd is not None and la.svd[0] is not None:
        U, s_t, Vh = la.svd
        lp._svd = (U[:, :k].clone(), s_t[:k].clone(), Vh[:k].clone(), _versions(h, mod))
    return lp


def _versions(h: LayerHandler, mod: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((id(w), w._version) for w in h.weights(mod))


def plan(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    example_input: Any = None,
    progress: bool | None = False,
    keep_svd: bool = False,
) -> Plan:
    """Decide, for every prunable layer of ``model``, what :func:`apply` will do. The model is not changed.

    Parameters
    ----------
    model : the network.
    config : rule and layer selection (default :class:`CompressionConfig()`).
    example_input : optional input batch (a tensor or a tuple of arguments); one forward pass in
        eval mode records each layer's output size, so conv MACs can be counted.
    progress : show a progress bar over layers (None: when stderr is a terminal).
    keep_svd : compute each layer's full SVD now and keep the top-``k`` triplets of the layers to cut
        in the plan, so :func:`apply` needs no second decomposition (:func:`compress` does this).

    Raises
    ------
    RmtpruneError : the model has no prunable layer.
    InvalidWeightsError : a selected layer has NaN/Inf weights (named in the message).
    ValueError : a rule parameter impossible for a layer (e.g. a fixed rank above ``p``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    entries = collect_layers(model)
    if not any(e.handler is not None for e in entries):
        kinds = ", ".join(sorted({c.__name__ for c in supported_types()}))
        raise RmtpruneError(f"model {type(model).__name__} has no prunable layer (supported types: {kinds})")
    warns = _warn_unmatched(config, [e.name for e in entries])

    todo = [e for e in entries if e.handler is not None and not e.reason and config.selects(e.name)[0]]
    _check_finite(todo)
    pos = _positions(model, todo, example_input) if example_input is not None else {}

    analysis = analyze(model, config, keep_svd=keep_svd, progress=progress, entries=entries)
    # The model's last layer of a prunable type (even if skipped, e.g. a head tied to the embedding).
    handled = [e.name for e in entries if e.handler is not None]
    last = handled[-1] if config.protect_last and handled else None
    layers = []
    for la in analysis:
        if la.verdict == "skip":
            n_params = _param_count(la.module)
            layers.append(
                LayerPlan(
                    name=la.name,
                    layer_type=la.layer_type,
                    shape=la.shape,
                    matrix_shape=la.matrix,
                    action="skip",
                    reason=la.message,
                    params_before=n_params,
                    params_after=n_params,
                )
            )
            continue
        positions = pos.get(la.name, la.handler.default_positions(la.module))
        lp = _plan_layer(la, config.for_layer(la.name), positions)
        if la.name == last and lp.changes:
            lp.reason = f"{lp.reason}; last prunable layer (logits) kept: protect_last=True"
            lp.action, lp.rank, lp._svd = "keep", lp.rank_before, None
            lp.params_after, lp.macs_after = lp.params_before, lp.macs_before
        layers.append(lp)
    return Plan(layers, config, _param_count(model), warns)


def _first_2d_shape(module: nn.Module) -> tuple[int, ...]:
    for p in module.parameters():
        if p.ndim >= 2:
            return tuple(int(v) for v in p.shape)
    return ()


# ====================================================================== surgery
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"the plan does not match the model: layer {name!r} is missing") from None


def _factors(
    lp: LayerPlan, h: LayerHandler, mod: nn.Module, dtype: torch.dtype, svd_dtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U_k sqrt(s_k)`` and ``B = sqrt(s_k) V_k^T``, from the plan's SVD when still valid."""
    k = lp.rank
    cached = lp._svd
    if cached is not None and cached[3] == _versions(h, mod):
        U, s, Vh = cached[:3]
    else:
        U, s, Vh = h.svd(mod, _DTYPES[svd_dtype])
        U, s, Vh = U[:, :k], s[:k], Vh[:k]
    r = s.clamp_min(0).sqrt()
    A = (U * r).to(dtype)
    B = (r[:, None] * Vh).to(dtype)
    return A, B


def apply(model: nn.Module, plan: Plan, *, progress: bool | None = False) -> nn.Module:
    """Perform the plan's surgery on ``model`` in place (and return it).

    ``factor`` layers are replaced by their :mod:`rmtprune.lowrank` module (same device and dtype;
    ``requires_grad`` and train/eval mode carried over; hooks on the old module are not), and
    ``dense-truncate`` layers get their rank-k weight. If anything fails half way, every layer
    already changed is put back and the error re-raised.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    if plan.applied:
        raise ValueError("this plan was already applied; make a new plan for the current model")
    work = []
    for lp in plan.layers:
        if not lp.changes:
            continue
        mod = _get(model, lp.name)
        h = handler_for(mod)
        if h is None or type(mod).__name__ != lp.layer_type:
            raise ValueError(
                f"the plan does not match the model: layer {lp.name!r} is {type(mod).__name__}, "
                f"the plan says {lp.layer_type}"
            )
        why = parametrized(mod, h)
        if why:
            raise ValueError(f"the plan does not match the model: layer {lp.name!r} has a {why}")
        if h.matrix_shape(mod) != tuple(lp.matrix_shape) or h.current_rank(mod) != lp.rank_before:
            raise ValueError(
                f"the plan does not match the model: layer {lp.name!r} has matrix "
                f"{h.matrix_shape(mod)} rank {h.current_rank(mod)}, the plan says {tuple(lp.matrix_shape)} "
                f"rank {lp.rank_before}"
            )
        work.append((lp, mod, h))

    undo: list[Any] = []
    try:
        for lp, mod, h in _progress(work, total=len(work), desc="apply", enable=progress):
            ref = h.weights(mod)[0]
            A, B = _factors(lp, h, mod, ref.dtype, plan.config.for_layer(lp.name).svd_dtype)
            A, B = A.to(ref.device), B.to(ref.device)
            if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
                raise InvalidWeightsError(f"the factors of layer {lp.name!r} are not finite")
            if lp.action == "factor":
                new = h.build(mod, A, B)
                new.train(mod.training)
                trainable = ref.requires_grad
                for prm in new.parameters():
                    prm.requires_grad_(trainable)
                bias = getattr(mod, "bias", None)
                if isinstance(bias, torch.Tensor) and new.bias is not None:
                    new.bias.requires_grad_(bias.requires_grad)
                parent, child = _parent(model, lp.name)
                setattr(parent, child, new)
                undo.append(("module", parent, child, mod))
            else:
                old = mod.weight.detach().clone()
                undo.append(("weight", mod, old))
                h.write_dense(mod, A @ B)
            lp._svd = None
    except BaseException:
        for item in reversed(undo):
            if item[0] == "module":
                setattr(item[1], item[2], item[3])
            else:
                with torch.no_grad():
                    item[1].weight.copy_(item[2])
        raise
    plan.applied = True
    return model


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    example_input: Any = None,
    progress: bool | None = False,
    **overrides: Any,
) -> tuple[nn.Module, Plan]:
    """Plan and apply low-rank compression in place; returns ``(model, report)``.

    ``overrides`` replace fields of ``config`` (e.g. ``compress(model, keep_bulk=0.3)``). Each layer
    is decomposed once (the plan keeps the top-``k`` SVD of the layers it cuts). Works on already
    compressed models too: factored layers are re-cut from QR of their factors. The report is the
    applied :class:`Plan`.
    """
    config = CompressionConfig() if config is None else config
    if overrides:
        known = {f.name for f in dataclasses.fields(CompressionConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown config field(s) {bad}; valid: {', '.join(sorted(known))}")
        config = dataclasses.replace(config, **overrides)
    p = plan(model, config, example_input=example_input, progress=progress, keep_svd=True)
    apply(model, p, progress=progress)
    return model, p
