"""Plan and apply low-rank compression of a model, and undo it: plan, apply, compress, densify.

The pipeline is :func:`rmtprune.analyze` (spectra and fits, :mod:`rmtprune.analysis`), then
:func:`plan` (the rank rule per layer -> a :class:`~rmtprune.plan_record.Plan`; the model is not
touched), then :func:`apply` (replace each layer to factor by a :mod:`rmtprune.lowrank` module, in
place, restoring everything if anything fails). :func:`compress` is the two together, computing
each layer's SVD once. :func:`densify` is the inverse and :func:`is_compressed` the check, as
``torch.nn.utils.prune`` has ``remove`` and ``is_pruned``.

Which layer types are prunable, and how, is the registry of :mod:`rmtprune.layers`; which layer is
the model's output (kept by ``protect_last``) is :func:`rmtprune.layers.output_layer`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from ._hf_guard import guard_save_pretrained
from ._progress import progress as _progress
from ._validate import check_fields
from .analysis import LayerAnalysis, analyze
from .config import CompressionConfig, unmatched_patterns
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
from .lowrank import LowRankLinear, LowRankModule
from .masks import is_sparsified, remove_masks
from .plan_record import ACTIONS, LayerPlan, Plan

__all__ = [
    "ACTIONS",
    "LayerPlan",
    "Plan",
    "plan",
    "apply",
    "compress",
    "densify",
    "is_compressed",
    "LayerHandler",
    "register_handler",
    "handler_for",
]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
    out = unmatched_patterns(
        names, "layer", include=config.include, exclude=config.exclude, override=list(config.overrides)
    )
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


def _plan_layer(
    la: LayerAnalysis, cfg: CompressionConfig, positions: int | None, protected: str
) -> LayerPlan:
    """The decision for one analysed layer: the rule's rank, then factor / dense-truncate / keep.

    ``protected`` says why the layer is the model's output layer when ``protect_last`` keeps it
    ("" otherwise): its action can only be ``keep``; the reason still says what the rule found.
    """
    h, mod = la.handler, la.module
    m, n = la.matrix_shape
    k_now = la.rank
    w_now = k_now * (m + n) if la.factored else m * n
    params_now = _param_count(mod)
    lp = LayerPlan(
        name=la.name,
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
        svd_dtype=cfg.svd_dtype,
    )
    if la.verdict == "too-small":
        lp.reason = la.message
        return lp
    fit = la.fit
    lp.fit = None if fit is None else fit.to_dict()
    rule = cfg.make_rule()
    if rule.gated and la.verdict != "fit":
        lp.reason = f"{la.message}; kept" if fit is None else f"no MP-like bulk ({la.message}); kept"
        return lp
    try:
        decision = rule.select(la.s, (m, n), fit=fit)
    except ValueError as exc:
        raise ValueError(f"{exc} for layer {la.name!r} (rule {cfg.rule!r})") from None
    lp.decision = decision.to_dict()
    k = min(max(decision.rank, cfg.min_rank), min(m, n))
    why = decision.reason + (f", raised to min_rank={cfg.min_rank}" if decision.rank < cfg.min_rank else "")
    action, lp.reason = _action(la, cfg, k, why)
    if action == "keep":
        return lp
    if protected:
        lp.reason = f"{lp.reason}; {protected} kept: protect_last=True"
        return lp
    w_after = k * (m + n) if action == "factor" else m * n
    lp.action, lp.rank = action, k
    if action == "factor":
        lp.params_after = w_after + (m if h.has_bias(mod) else 0)
    if positions is not None:
        lp.macs_after = w_after * positions
    if la.svd is not None and la.svd[0] is not None:
        U, s_t, Vh = la.svd
        lp._svd = (U[:, :k].clone(), s_t[:k].clone(), Vh[:k].clone(), _versions(h, mod))
    return lp


def _action(la: LayerAnalysis, cfg: CompressionConfig, k: int, why: str) -> tuple[str, str]:
    """What rank ``k`` means for the layer (``factor``, ``dense-truncate`` or ``keep``), and the reason."""
    m, n = la.matrix_shape
    k_now = la.rank
    if k > k_now or (k == k_now and (la.factored or cfg.factor_only_if_smaller)):
        return "keep", f"{why}; rank {k} >= current rank {k_now}: nothing to cut"
    if la.factored or k * (m + n) < m * n or not cfg.factor_only_if_smaller:
        return "factor", why
    if cfg.dense_truncate:
        return (
            "dense-truncate",
            f"{why}; k(m+n)={k * (m + n)} >= mn={m * n}: rank-{k} weight written back dense",
        )
    return "keep", f"{why}; k(m+n)={k * (m + n)} >= mn={m * n}: factoring would not save parameters; kept"


def _versions(h: LayerHandler, mod: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((id(w), w._version) for w in h.weights(mod))


def _skipped(la: LayerAnalysis) -> LayerPlan:
    n_params = _param_count(la.module)
    return LayerPlan(
        name=la.name,
        layer_type=la.layer_type,
        shape=la.shape,
        matrix_shape=la.matrix,
        action="skip",
        reason=la.message,
        params_before=n_params,
        params_after=n_params,
    )


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
    # The one output-layer rule (layers.output_layer), known before any layer is decided.
    protected = analysis.output_layer if config.protect_last else None
    layers = []
    for la in analysis:
        if la.verdict == "skip":
            layers.append(_skipped(la))
            continue
        positions = pos.get(la.name, la.handler.default_positions(la.module))
        why = analysis.output_reason if la.name == protected else ""
        layers.append(_plan_layer(la, config.for_layer(la.name), positions, why))
    return Plan(layers, config, _param_count(model), warns)


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
    lp: LayerPlan, h: LayerHandler, mod: nn.Module, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U_k sqrt(s_k)`` and ``B = sqrt(s_k) V_k^T``, from the plan's SVD when still valid."""
    k = lp.rank
    cached = lp._svd
    if cached is not None and cached[3] == _versions(h, mod):
        U, s, Vh = cached[:3]
    else:
        U, s, Vh = h.svd(mod, _DTYPES[lp.svd_dtype or "float64"])
        U, s, Vh = U[:, :k], s[:k], Vh[:k]
    r = s.clamp_min(0).sqrt()
    A = (U * r).to(dtype)
    B = (r[:, None] * Vh).to(dtype)
    return A, B


def _carry_over(old: nn.Module, new: nn.Module, ref: torch.Tensor) -> None:
    """Give ``new`` the train/eval mode of ``old``, the ``requires_grad`` of its weight ``ref`` and bias."""
    new.train(old.training)
    for prm in new.parameters():
        prm.requires_grad_(ref.requires_grad)
    bias = getattr(old, "bias", None)
    if isinstance(bias, torch.Tensor) and getattr(new, "bias", None) is not None:
        new.bias.requires_grad_(bias.requires_grad)


def _matching(model: nn.Module, lp: LayerPlan) -> tuple[nn.Module, LayerHandler]:
    """The layer ``lp`` speaks about and its handler, or ``ValueError`` if the model does not match."""
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
    return mod, h


def apply(model: nn.Module, plan: Plan, *, progress: bool | None = False) -> nn.Module:
    """Perform the plan's surgery on ``model`` in place (and return it).

    ``factor`` layers are replaced by their :mod:`rmtprune.lowrank` module (same device and dtype;
    ``requires_grad`` and train/eval mode carried over; hooks on the old module are not), and
    ``dense-truncate`` layers get their rank-k weight, each at the SVD precision its
    :class:`LayerPlan` records. If anything fails half way, every layer already changed is put back
    and the error re-raised.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    if plan.applied:
        raise ValueError("this plan was already applied; make a new plan for the current model")
    work = [(lp, *_matching(model, lp)) for lp in plan.layers if lp.changes]
    undo: list[Any] = []
    try:
        for lp, mod, h in _progress(work, total=len(work), desc="apply", enable=progress):
            ref = h.weights(mod)[0]
            A, B = _factors(lp, h, mod, ref.dtype)
            A, B = A.to(ref.device), B.to(ref.device)
            if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
                raise InvalidWeightsError(f"the factors of layer {lp.name!r} are not finite")
            if lp.action == "factor":
                new = h.build(mod, A, B)
                _carry_over(mod, new, ref)
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
    factored = [lp.name for lp in plan if lp.action == "factor"]
    if factored:  # transformers' own save_pretrained would lose the factored layers
        guard_save_pretrained(model, factored)
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

    ``overrides`` replace fields of ``config`` (e.g. ``compress(model, keep_bulk=0.3)``; an unknown
    name is a ``TypeError``, as for any keyword argument). Each layer is decomposed once (the plan
    keeps the top-``k`` SVD of the layers it cuts). Works on already compressed models too:
    factored layers are re-cut from QR of their factors. The report is the applied :class:`Plan`.
    """
    config = CompressionConfig() if config is None else config
    if overrides:
        try:
            check_fields("config", overrides, (f.name for f in dataclasses.fields(CompressionConfig)))
        except ValueError as exc:
            raise TypeError(str(exc)) from None
        config = dataclasses.replace(config, **overrides)
    p = plan(model, config, example_input=example_input, progress=progress, keep_svd=True)
    apply(model, p, progress=progress)
    return model, p


# ====================================================================== the inverse and the check
def is_compressed(model: nn.Module) -> bool:
    """Whether ``model`` holds a factored (``LowRank*``) layer or a sparsity mask.

    A ``dense-truncate`` cut leaves an ordinary dense layer and is not detected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return any(isinstance(m, LowRankModule) for m in model.modules()) or is_sparsified(model)


def _dense_of(name: str, mod: LowRankModule) -> nn.Module:
    """The dense layer of the type ``mod`` replaced (``original_type``), weight ``A @ B``, bias kept."""
    kind = mod.original_type
    if not isinstance(mod, LowRankLinear) or kind == "Linear":
        dense = mod.to_dense()
        if type(dense).__name__ != kind:
            raise ValueError(f"layer {name!r} replaced a {kind}, which densify cannot rebuild")
        return dense
    # A registered transposed-linear type (transformers' Conv1D): built as T(out, in), its signature.
    t = next((t for t in supported_types() if t.__name__ == kind), None)
    m, n = mod.matrix_shape
    try:
        dense = t(m, n) if t is not None else None
    except Exception:  # any constructor failure means: not rebuildable this way
        dense = None
    h = None if dense is None else handler_for(dense)
    if h is None or h.matrix_shape(dense) != (m, n):
        raise ValueError(
            f"layer {name!r} replaced a {kind}, which densify cannot rebuild (it rebuilds Linear, "
            "Conv1d, Conv2d and registered layer types built as T(out_features, in_features))"
        )
    ref = mod.first.weight
    dense = dense.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        h.write_dense(dense, mod.factors()[0] @ mod.factors()[1])
        if getattr(dense, "bias", None) is not None:
            if mod.bias is None:
                dense.bias = None
            else:
                dense.bias.copy_(mod.bias)
    return dense


def densify(model: nn.Module) -> nn.Module:
    """Undo compression in place (and return the model): the inverse of :func:`compress` and ``sparsify``.

    Every factored ``LowRank*`` layer is replaced by a dense layer of the type it replaced
    (``original_type``: ``Linear``, ``Conv1d``, ``Conv2d``, transformers' ``Conv1D``) holding the
    product ``A @ B`` as its weight and the same bias, on the same device and dtype, with
    ``requires_grad`` and train/eval mode carried over; the outputs are unchanged up to float
    rounding. Sparsity masks are removed (:func:`rmtprune.masks.remove_masks`; the weights keep
    their zeros). The cut is not undone: the noise removed stays removed. Every new layer is built
    before any is swapped in, so a layer that cannot be rebuilt raises ``ValueError`` with the model
    unchanged. An optimizer holding the old parameters must be rebuilt.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LowRankModule):
        raise ValueError("the model itself is a factored layer; use model.to_dense()")
    names: dict[int, list[str]] = {}
    found: dict[int, LowRankModule] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, LowRankModule):
            names.setdefault(id(mod), []).append(name)
            found[id(mod)] = mod
    new = {}
    for key, mod in found.items():
        dense = _dense_of(names[key][0], mod)
        _carry_over(mod, dense, mod.first.weight)
        new[key] = dense
    for key, dense in new.items():  # a module registered under two names stays one module
        for name in names[key]:
            parent, child = _parent(model, name)
            setattr(parent, child, dense)
    if is_sparsified(model):
        remove_masks(model)
    return model


#: The old private name of :func:`rmtprune.layers.collect_layers` (benchmarks of earlier revisions use it).
_collect = collect_layers
