"""Pruning masks of sparsified layers: where they live, how they stay frozen, how they are undone.

A sparsified layer keeps a dense ``weight`` whose pruned entries are exactly zero, plus a boolean
buffer ``rmtprune_mask`` (True = kept) on the module. The buffer is *non-persistent*, so
``state_dict()`` keeps its usual keys and loads into an unpruned copy of the model; the sparse
file format (:mod:`rmtprune.sparse_format`) stores the mask itself. Training keeps pruned entries
at zero when gradients are masked before the step and the mask is re-applied after it (momentum
and weight decay would otherwise move them): :func:`freeze_masks` does the latter for any
optimizer, :func:`mask_gradients` the former.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .layers import collect_layers, handler_for, parametrization, supported_types
from .lowrank import LowRankModule

__all__ = [
    "MASK_BUFFER",
    "prunable_layers",
    "get_mask",
    "set_mask",
    "masks_of",
    "restore_masks",
    "apply_masks",
    "mask_gradients",
    "freeze_masks",
    "remove_masks",
    "is_sparsified",
    "count_nonzeros",
    "parametrization",
]

#: Name of the mask buffer on a sparsified module.
MASK_BUFFER = "rmtprune_mask"


def __getattr__(name: str) -> Any:
    if name == "PRUNABLE_TYPES":
        import warnings

        warnings.warn(
            "rmtprune.masks.PRUNABLE_TYPES is deprecated; the layer registry "
            "(rmtprune.layers.supported_types, handler_for) is the one list of layer types",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(t for t in supported_types() if not issubclass(t, LowRankModule))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted_name, module)`` of every weight of a registered layer type, in module order.

    The types are those of the layer registry (:mod:`rmtprune.layers`); a factored layer
    contributes its two factors. A weight under ``torch.nn.utils.prune`` (or an old-style
    ``spectral_norm`` hook) raises ``ValueError``: it is recomputed from ``weight_orig``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for entry in collect_layers(model):
        if entry.handler is None:
            continue
        if entry.handler.factored:
            prefix = f"{entry.name}." if entry.name else ""
            subs = [(prefix + n, m) for n, m in entry.module.named_children() if handler_for(m) is not None]
        else:
            subs = [(entry.name, entry.module)]
        for name, mod in subs:
            if not isinstance(getattr(mod, "weight", None), torch.Tensor):
                continue
            if hasattr(mod, "weight_orig"):  # torch.nn.utils.prune or an old-style spectral_norm hook
                why = parametrization(mod) or "weight recomputed from weight_orig"
                raise ValueError(f"layer {name!r}: {why}")
            yield name, mod


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The module's mask (True = kept), or None when it is not sparsified."""
    return getattr(module, MASK_BUFFER, None)


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Attach ``mask`` (bool, weight-shaped) to ``module`` and zero the pruned entries in place.

    Raises ``ValueError`` for a parametrized weight (see :func:`parametrization`): the zeros would
    land in a tensor recomputed at the next forward pass.
    """
    if isinstance(module, LowRankModule):
        raise ValueError(
            f"cannot mask {type(module).__name__}: its weight is the product of two factors; "
            "mask the factors ('first', 'second') instead"
        )
    why = parametrization(module)
    if why is not None:
        raise ValueError(f"cannot mask {type(module).__name__}: {why}")
    w = module.weight
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    mask = mask.detach().to(device=w.device, dtype=torch.bool)
    if MASK_BUFFER in module._buffers:
        module._buffers[MASK_BUFFER] = mask
    else:
        module.register_buffer(MASK_BUFFER, mask, persistent=False)
    with torch.no_grad():
        w.mul_(mask.to(w.dtype))


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks keyed like the state dict (``"<layer>.weight"``), for the sparsified layers only."""
    out = {}
    for name, mod in model.named_modules():
        mask = get_mask(mod)
        if mask is not None:
            out[f"{name}.weight" if name else "weight"] = mask
    return out


def restore_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach masks keyed ``"<layer>.weight"`` (as :func:`masks_of` and the sparse loader give them)."""
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if key == "weight":
            name = ""
        mod = modules.get(name) if name is not None else None
        if (
            mod is None
            or isinstance(mod, LowRankModule)  # its .weight is a product, the masks go on its factors
            or not isinstance(getattr(mod, "weight", None), torch.Tensor)
        ):
            raise KeyError(f"mask {key!r} names no layer weight of the model")
        set_mask(mod, mask)


def apply_masks(model: nn.Module) -> None:
    """Zero the pruned entries of every sparsified layer (call after an optimizer step)."""
    with torch.no_grad():
        for mod in model.modules():
            mask = get_mask(mod)
            if mask is not None:
                mod.weight.mul_(mask.to(mod.weight.dtype))


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradients of pruned entries (call between ``backward()`` and ``step()``)."""
    for mod in model.modules():
        mask = get_mask(mod)
        if mask is not None and mod.weight.grad is not None:
            mod.weight.grad.mul_(mask.to(mod.weight.grad.dtype))


def freeze_masks(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Keep pruned entries at zero through every ``optimizer.step()``; returns a removable handle.

    Registers a step post-hook that re-applies the masks, so momentum and weight decay cannot
    revive a pruned entry. Works with any ``torch.optim`` optimizer and any training loop.
    """
    return optimizer.register_step_post_hook(lambda *_: apply_masks(model))


def remove_masks(model: nn.Module) -> int:
    """Drop the mask buffers (weights keep their zeros); returns how many layers had one."""
    n = 0
    for mod in model.modules():
        if MASK_BUFFER in mod._buffers:
            del mod._buffers[MASK_BUFFER]
            n += 1
    return n


def is_sparsified(model: nn.Module) -> bool:
    """Whether any layer of ``model`` carries a mask."""
    return any(get_mask(m) is not None for m in model.modules())


def count_nonzeros(model: nn.Module) -> dict[str, int]:
    """Parameters as stored sparsely: ``{"total", "stored", "masked_layers"}``.

    ``stored`` counts every parameter of unmasked tensors plus the kept entries of masked
    weights: exactly the number of values the sparse format writes.
    """
    total = stored = layers = 0
    masked = {id(m.weight): get_mask(m) for m in model.modules() if get_mask(m) is not None}
    for p in model.parameters():
        total += p.numel()
        mask = masked.get(id(p))
        if mask is None:
            stored += p.numel()
        else:
            stored += int(mask.sum())
            layers += 1
    return {"total": total, "stored": stored, "masked_layers": layers}
