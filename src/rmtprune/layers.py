"""The layer registry: which module types rmtprune can cut, how to read them, and which layer is the output.

This is the only list of supported layer types. Compression (:mod:`rmtprune.surgery`),
sparsification (:mod:`rmtprune.sparsity`), the analysis stage (:func:`rmtprune.analyze`) and model
files (:mod:`rmtprune.io`) all ask :func:`handler_for` / :func:`collect_layers`, so a type added
with :func:`register_handler` reaches every one of them.

Registered: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, Hugging Face ``transformers`` ``Conv1D``
(GPT-2 style, transposed weight; only once ``transformers`` is imported) and the ``LowRank*``
modules themselves, whose spectrum comes from QR of their factors, never from the ``m x n`` product.

A subclass of a registered type is handled like its base only while it computes what the base
computes: one that overrides the forward path (``forward``, ``_conv_forward``, ``__call__``, or a
``weight`` / ``bias`` property; e.g. timm's ``Conv2dSame`` pads at run time, ``StdConv2d``
standardises its weight) or a module whose instance carries its own ``forward`` is skipped with the
reason (:func:`changed_forward`), by compression, analysis and sparsification alike: cutting it as a
plain layer would silently change its function. Registering the subclass itself
(``register_handler(MyConv)``, the base's handler; or a handler of its own) says it is safe.
Forward hooks and pre-hooks on a layer are not carried over to its factored replacement, so
compression skips a hooked layer with the reason (:func:`hooked`); masking keeps the module and its
hooks, so sparsification still prunes it.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear, LowRankModule

__all__ = [
    "LayerHandler",
    "LinearHandler",
    "TransposedLinearHandler",
    "ConvHandler",
    "LowRankHandler",
    "register_handler",
    "handler_for",
    "changed_forward",
    "hooked",
    "supported_types",
    "LayerEntry",
    "collect_layers",
    "output_layer",
    "parametrization",
]


#: Names of torch's parametrizations and weight hooks, as the user wrote them.
_KNOWN = {
    "_WeightNorm": "weight_norm",
    "_SpectralNorm": "spectral_norm",
    "_Orthogonal": "orthogonal",
    "WeightNorm": "weight_norm",
    "SpectralNorm": "spectral_norm",
}


def parametrization(module: nn.Module) -> str | None:
    """Why ``module``'s weight is not a plain parameter that can be cut or masked, or None.

    A weight under ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``,
    ``spectral_norm``, ``orthogonal``, any custom one) or an old-style hook
    (``torch.nn.utils.weight_norm``: ``weight_g``/``weight_v``; ``spectral_norm``: ``weight_orig``;
    ``torch.nn.utils.prune``) is recomputed from other tensors at every forward pass: factoring or
    masking the computed ``weight`` would silently drop the parametrization (or be undone by it).
    The message says what to remove first.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        found = []
        for tensor, plist in module.parametrizations.items():
            kinds = [_KNOWN.get(type(p).__name__, type(p).__name__) for p in plist]
            found.append(f"{tensor}: {', '.join(kinds)}")
        return (
            f"parametrized weight ({'; '.join(found)}): remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))"
        )
    from torch.nn.utils.prune import BasePruningMethod

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            return "pruned with torch.nn.utils.prune: call prune.remove(module, 'weight') first"
        kind = _KNOWN.get(type(hook).__name__)
        if kind is not None and getattr(hook, "name", None) is not None:
            return f"{kind} hook on {hook.name!r}: call torch.nn.utils.remove_{kind}(module) first"
    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        return "weight_norm hook (weight_g, weight_v): call torch.nn.utils.remove_weight_norm(module) first"
    if hasattr(module, "weight_orig"):
        return "weight recomputed from weight_orig (spectral_norm or prune hook): remove the hook first"
    return None


class LayerHandler:
    """How to read one layer type as an ``m x n`` matrix and how to replace it by its factors.

    Subclass and :func:`register_handler` it to support a new layer type.
    """

    #: True for already factored layers (spectrum from QR of the factors).
    factored: bool = False
    #: Class attributes through which the layer computes its output. A subclass of the registered
    #: type that defines any of them differently is not handled (:func:`changed_forward`).
    forward_path: tuple[str, ...] = ("forward", "__call__", "_call_impl", "weight", "bias")

    def unsupported(self, module: nn.Module) -> str | None:
        """A reason why this particular layer cannot be compressed (e.g. grouped conv), or None."""
        return None

    def matrix(self, module: nn.Module) -> torch.Tensor:
        """The weight as an ``m x n`` (``out x in``) matrix (a view where possible)."""
        raise NotImplementedError

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        m, n = self.matrix(module).shape
        return int(m), int(n)

    def weight_shape(self, module: nn.Module) -> tuple[int, ...]:
        """Shape of the (dense) weight as the layer stores it."""
        return tuple(int(v) for v in module.weight.shape)

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "bias", None) is not None

    def current_rank(self, module: nn.Module) -> int:
        return min(self.matrix_shape(module))

    def weights(self, module: nn.Module) -> list[torch.Tensor]:
        """Tensors the SVD depends on (checked for NaN/Inf, and versioned for the SVD cache)."""
        return [module.weight]

    def default_positions(self, module: nn.Module) -> int | None:
        """Output positions per sample when no example input is given (1 for linear maps)."""
        return 1

    def singular_values(self, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """All ``p`` singular values, descending."""
        M = self.matrix(module).detach().to(dtype)
        return torch.linalg.svdvals(M.T if M.shape[0] < M.shape[1] else M)  # tall is LAPACK's fast path

    def svd(self, module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD ``U, s, Vh`` of the matrix (for factored layers only ``rank`` triplets)."""
        M = self.matrix(module).detach().to(dtype)
        if M.shape[0] < M.shape[1]:
            # torch's row-major wide matrix is LAPACK's tall one: decomposing the transpose is the
            # fast path (measured 2.4x on 128 x 3136 float64).
            U, s, Vh = torch.linalg.svd(M.T, full_matrices=False)
            return Vh.T, s, U.T
        return torch.linalg.svd(M, full_matrices=False)

    def build(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
        """A new module computing ``x -> (A @ B) x + bias``, same device and dtype as ``module``."""
        raise NotImplementedError

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's input ``x`` as rows in the matrix's column space (``rows x n``).

        Each row ``r`` is one position the matrix multiplies (``y = W r``): a token for a linear
        layer, an unfolded patch for a convolution. Calibration (:mod:`rmtprune.calibration`)
        accumulates ``sum r r^T`` from these rows. The default reads the last axis as the features.
        """
        n = self.matrix_shape(module)[1]
        if x.ndim == 0 or x.shape[-1] != n:
            raise ValueError(f"input of shape {tuple(x.shape)} does not end in the layer's {n} features")
        return x.detach().reshape(-1, n)

    def write_dense(self, module: nn.Module, W: torch.Tensor) -> None:
        """Copy the ``m x n`` matrix ``W`` into the layer's dense weight."""
        with torch.no_grad():
            module.weight.copy_(W.reshape(module.weight.shape))


class LinearHandler(LayerHandler):
    """``nn.Linear`` -> :class:`LowRankLinear`."""

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight

    def build(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
        return LowRankLinear.from_factors(A, B, module.bias, original_type=type(module).__name__)


class TransposedLinearHandler(LinearHandler):
    """Hugging Face ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``in x out``."""

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T

    def build(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
        layer = super().build(module, A, B)
        layer.transposed = True  # its ``.weight`` reads ``in x out``, as the replaced layer's did
        return layer

    def write_dense(self, module: nn.Module, W: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(W.T)


class ConvHandler(LayerHandler):
    """``nn.Conv1d`` / ``nn.Conv2d`` (``out x in x k...`` read as ``out x (in * k...)``)."""

    forward_path = (*LayerHandler.forward_path, "_conv_forward")

    def unsupported(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        return None

    def matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight.reshape(module.weight.shape[0], -1)

    def default_positions(self, module: nn.Module) -> int | None:
        return None  # depends on the input size

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _unfold_rows(module, x)

    def build(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
        cls = LowRankConv2d if isinstance(module, nn.Conv2d) else LowRankConv1d
        return cls.from_conv(module, A, B)


def _unfold_rows(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as ``(batch * positions) x (in * k...)`` patch rows (``F.unfold``).

    The column order (channel, then kernel offsets) is the order of ``weight.reshape(out, -1)``.
    A string ``padding`` ("same") is refused: its asymmetric padding has no ``unfold`` equivalent.
    """
    if isinstance(conv.padding, str) or getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(
            f"calibration does not support padding={conv.padding!r} / padding_mode="
            f"{getattr(conv, 'padding_mode', 'zeros')!r} convolutions"
        )
    x = x.detach()
    one_d = isinstance(conv, nn.Conv1d)
    if one_d:  # (B, C, L) -> (B, C, 1, L); an unbatched (C, L) input gets its batch axis first
        x = x.unsqueeze(-2) if x.ndim == 3 else x.unsqueeze(0).unsqueeze(-2)
        k, d, p, st = (1, *conv.kernel_size), (1, *conv.dilation), (0, *conv.padding), (1, *conv.stride)
    else:
        k, d, p, st = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    if x.ndim == 3 and not one_d:
        x = x.unsqueeze(0)  # an unbatched (C, H, W) input
    cols = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=st)  # (B, n, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class LowRankHandler(LayerHandler):
    """Already factored layers: spectrum and re-cut from QR of the factors (``O((m + n) k**2)``)."""

    factored = True

    def matrix(self, module: nn.Module) -> torch.Tensor:  # pragma: no cover - never formed
        raise RuntimeError("the dense matrix of a factored layer is never formed")

    def matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        return module.matrix_shape

    def weight_shape(self, module: nn.Module) -> tuple[int, ...]:
        return module._dense_weight_shape()

    def has_bias(self, module: nn.Module) -> bool:
        return module.bias is not None

    def current_rank(self, module: nn.Module) -> int:
        return module.rank

    def weights(self, module: nn.Module) -> list[torch.Tensor]:
        return [module.first.weight, module.second.weight]

    def default_positions(self, module: nn.Module) -> int | None:
        return 1 if isinstance(module, LowRankLinear) else None

    def singular_values(self, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return module.singular_values()

    def svd(self, module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return module.svd(torch.float64)

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, LowRankLinear):
            return super().input_rows(module, x)
        return _unfold_rows(module.first, x)

    def build(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
        if isinstance(module, LowRankLinear):
            layer = LowRankLinear.from_factors(A, B, module.bias, original_type=module.original_type)
            layer.transposed = module.transposed
            return layer
        return type(module).from_conv(module, A, B)

    def write_dense(self, module: nn.Module, W: torch.Tensor) -> None:  # pragma: no cover
        raise RuntimeError("a factored layer is re-cut, never dense-truncated")


_REGISTRY: dict[type, LayerHandler] = {
    nn.Linear: LinearHandler(),
    nn.Conv1d: ConvHandler(),
    nn.Conv2d: ConvHandler(),
    LowRankModule: LowRankHandler(),
}


def register_handler(layer_type: type, handler: LayerHandler | None = None) -> None:
    """Make layers of ``layer_type`` (and subclasses keeping its forward path) prunable with ``handler``.

    ``handler=None`` registers a subclass of a registered type with its base's handler: the way to
    say that a subclass overriding ``forward`` (which :func:`changed_forward` refuses) still maps
    its input exactly as the base does, so the base's factored replacement is exact, e.g. a
    ``Linear`` subclass whose ``forward`` only adds logging.
    """
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise TypeError(f"layer_type={layer_type!r} must be an nn.Module subclass")
    if handler is None:
        _register_transformers()
        handler = _nearest(layer_type)[1]
        if handler is None:
            kinds = ", ".join(sorted(c.__name__ for c in _REGISTRY))
            raise TypeError(
                f"layer_type={layer_type.__name__} derives from no registered type ({kinds}): "
                "give it a handler, register_handler(layer_type, handler)"
            )
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler={handler!r} must be a LayerHandler instance")
    _REGISTRY[layer_type] = handler


def _register_transformers() -> None:
    # Only when transformers is already imported: a model holding a Conv1D has imported it, and
    # importing transformers ourselves would cost seconds and make it a dependency.
    mod = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(mod, "Conv1D", None) if mod is not None else None
    if conv1d is not None and conv1d not in _REGISTRY:
        _REGISTRY[conv1d] = TransposedLinearHandler()


def _nearest(cls: type) -> tuple[type | None, LayerHandler | None]:
    """The nearest registered class in ``cls``'s MRO and its handler, or ``(None, None)``."""
    for base in cls.__mro__:
        h = _REGISTRY.get(base)
        if h is not None:
            return base, h
    return None, None


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler registered for the module's type (nearest in its MRO), or None.

    None too when the module computes something else than that registered type
    (:func:`changed_forward`): a subclass overriding the forward path, or an instance ``forward``.
    """
    _register_transformers()
    base, h = _nearest(type(module))
    if h is None or _changed(module, base, h):
        return None
    return h


def changed_forward(module: nn.Module) -> str:
    """Why ``module`` does not compute what the registered type it derives from computes, or "".

    A subclass that defines any attribute of the handler's ``forward_path`` (``forward``,
    ``_conv_forward``, ``__call__``, a ``weight`` property ...) differently from the registered
    base, or a module whose instance has its own ``forward`` (``accelerate`` offload hooks, a
    monkey-patch), may map its input differently: timm's ``Conv2dSame`` pads at run time,
    ``StdConv2d`` standardises its weight. Factoring it as the base would change its function,
    and masking it would zero entries of a weight that is transformed before use, so it is not
    handled. Registering the subclass itself (:func:`register_handler`) says it is safe.
    """
    _register_transformers()
    base, h = _nearest(type(module))
    return "" if h is None else _changed(module, base, h)


def _changed(module: nn.Module, base: type | None, h: LayerHandler) -> str:
    from torch.nn.utils import parametrize

    cls = type(module)
    if parametrize.is_parametrized(module):
        # torch's own subclass (``ParametrizedLinear``: ``weight`` a property); the layer is
        # reported through ``parametrization``, its class is the one torch derived from.
        cls = cls.__bases__[0]
    if "forward" in vars(module):
        return (
            f"this {cls.__name__} has its own forward on the instance (a hook or patch replaced it); "
            "factoring or masking it as a plain layer could change its function"
        )
    if base is cls:
        return ""
    for attr in h.forward_path:
        if inspect.getattr_static(cls, attr, None) is not inspect.getattr_static(base, attr, None):
            owner = next((c for c in cls.__mro__ if attr in vars(c)), cls)
            return (
                f"{cls.__name__} overrides {attr} (in {owner.__name__}, a subclass of {base.__name__}); "
                f"factoring or masking it as a plain {base.__name__} would change its function "
                f"(register_handler({cls.__name__}) if it computes exactly what {base.__name__} does)"
            )
    return ""


def hooked(module: nn.Module) -> str:
    """Why a layer with forward hooks or forward pre-hooks is not factored, or "".

    Factoring replaces the module, and its hooks stay on the old one: a hook that changes the input
    or the output would be dropped silently. Hooks that ``parametrization`` explains (legacy
    ``weight_norm``, ``torch.nn.utils.prune``) are reported there. Masking keeps the module and its
    hooks, so sparsification does not ask this.
    """
    kinds = []
    found = (("forward pre-hook", module._forward_pre_hooks), ("forward hook", module._forward_hooks))
    for label, hooks in found:
        if hooks:
            names = sorted({getattr(hk, "__qualname__", type(hk).__name__) for hk in hooks.values()})
            kinds.append(f"{len(hooks)} {label}{'s' if len(hooks) > 1 else ''} ({', '.join(names)})")
    if not kinds:
        return ""
    return (
        f"{' and '.join(kinds)} on the layer; factoring replaces the module and would drop them: "
        "remove them first (handle.remove())"
    )


@dataclass
class LayerEntry:
    """One layer of a model as the registry sees it: its handler, or why it cannot be cut."""

    name: str
    module: nn.Module
    handler: LayerHandler | None
    reason: str  # why unsupported ("" if supported)
    #: Other modules holding one of this layer's weights (a tied ``lm_head`` / ``embed_tokens``):
    #: masking it would prune them too, so sparsification skips it.
    tied_to: tuple[str, ...] = ()


def collect_layers(model: nn.Module) -> list[LayerEntry]:
    """Every layer a plan speaks about: supported ones, and unsupported ones owning a >= 2-D weight."""
    entries: list[LayerEntry] = []
    claimed: list[str] = []  # prefixes of modules handled as a whole (their children are not layers)
    # Who holds each parameter and each module: surgery on a shared one would silently untie it.
    param_owners: dict[int, list[str]] = {}
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
        for prm in module.parameters(recurse=False):
            owners = param_owners.setdefault(id(prm), [])
            if name not in owners:
                owners.append(name)
    for name, module in model.named_modules():
        if claimed and name.startswith(claimed[-1] + "."):  # pre-order: children follow their parent
            continue
        if isinstance(module, nn.MultiheadAttention):
            # It reads out_proj.weight directly: replacing out_proj by two layers would break it.
            entries.append(LayerEntry(name, module, None, "MultiheadAttention reads its weights directly"))
            claimed.append(name)
            continue
        changed = changed_forward(module)
        if changed:
            entries.append(LayerEntry(name, module, None, changed))
            claimed.append(name)
            continue
        h = handler_for(module)
        if h is not None:
            why = (
                parametrized(module, h)
                or h.unsupported(module)
                or shared(name, module, h, param_owners, module_names)
                or _hooked(module, h)
            )
            entries.append(LayerEntry(name, module, h, why, tied_to(name, h.weights(module), param_owners)))
            claimed.append(name)
            continue
        own = [p for p in module.parameters(recurse=False) if p.ndim >= 2]
        if own:
            entries.append(LayerEntry(name, module, None, f"unsupported layer type {type(module).__name__}"))
    return entries


def _hooked(module: nn.Module, h: LayerHandler) -> str:
    """:func:`hooked` for the layer, and for the factors of a factored layer."""
    mods = list(module.modules()) if h.factored else [module]
    for mod in mods:
        why = hooked(mod)
        if why:
            return why if mod is module else f"factor {type(mod).__name__}: {why}"
    return ""


def parametrized(module: nn.Module, h: LayerHandler) -> str:
    """Why a layer whose weight is parametrized (``weight_norm`` and the like) is skipped, or "".

    Factoring it would replace the parametrized module by plain factors, silently dropping the
    parametrization; a factored layer's own factors are checked too.
    """
    mods = list(module.modules()) if h.factored else [module]
    for mod in mods:
        why = parametrization(mod)
        if why is not None:
            return why if mod is module else f"factor {type(mod).__name__}: {why}"
    return ""


def shared(
    name: str,
    module: nn.Module,
    h: LayerHandler,
    param_owners: dict[int, list[str]],
    module_names: dict[int, list[str]],
) -> str:
    """Why a layer cannot be replaced because it is shared (tied weights, one module under two names)."""
    names = module_names.get(id(module), [name])
    if len(names) > 1:
        listed = ", ".join(repr(n) for n in names)
        return f"module is registered under several names ({listed}); cutting it would untie them"
    others = tied_to(name, h.weights(module), param_owners)
    if others:
        return f"weight is tied to {others[0]!r}; cutting it would untie them"
    return ""


def tied_to(name: str, weights: list[torch.Tensor], param_owners: dict[int, list[str]]) -> tuple[str, ...]:
    """The other modules (not ``name`` nor its children) that hold one of ``weights``."""
    others: list[str] = []
    for w in weights:
        for o in param_owners.get(id(w), []):
            if o != name and not o.startswith(name + ".") and o not in others:
                others.append(o)
    return tuple(others)


def supported_types() -> list[type]:
    """The registered layer types (after registering ``transformers``' ``Conv1D`` if it is imported)."""
    _register_transformers()
    return list(_REGISTRY)


def output_layer(model: nn.Module, entries: list[LayerEntry] | None = None) -> tuple[str | None, str]:
    """The model's output layer (a classifier's logits, a language model's head), and how it was found.

    One rule, used by ``protect_last`` in compression and sparsification alike:

    - a Hugging Face model (it has ``get_output_embeddings`` and ``base_model``): the head that
      ``get_output_embeddings()`` returns; a base model without a head (``model.base_model is
      model``, e.g. ``BertModel``, whose ``pooler`` is not an output layer for embeddings) has none;
      any other head model (e.g. a sequence classifier): its last registered layer of a known type;
    - any other model: its last registered layer of a registered type (the logits layer of a
      classifier), even if that layer is itself skipped (e.g. a head tied to the embedding).

    Returns ``(name or None, reason)``; the reason is a short phrase for reports.
    """
    entries = collect_layers(model) if entries is None else entries
    handled = [e for e in entries if e.handler is not None]
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head) and hasattr(model, "base_model"):
        head = get_head()
        for e in handled:
            if head is not None and e.module is head:
                return e.name, "the model's output head"
        if model.base_model is model:
            return None, "a base model without a head has no output layer"
    if not handled:
        return None, "no layer of a registered type"
    return handled[-1].name, "last prunable layer (logits)"
