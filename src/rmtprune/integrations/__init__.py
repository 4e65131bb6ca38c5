"""RMT pruning during training inside other people's training loops: Lightning and the HF Trainer.

- :mod:`.lightning`: ``RMTPruningCallback`` for ``lightning.pytorch`` (and ``pytorch_lightning``);
- :mod:`.hf`: ``RMTPruningCallback`` for ``transformers.Trainer``.

Both hold an :class:`rmtprune.training.RMTPruner` (the schedule, the cut, the decision history) and
do what a framework needs around it: prune at epoch ends, point the framework's optimizer at the
new parameters, log the per-layer ranks to its logger, and store the factored architecture with
each checkpoint so the checkpoint reloads. Importing this package imports neither framework;
each submodule imports its framework when first used.

This module holds what the two share: the per-layer ranks of a model, the names under which they
are logged, and the refactoring of a module to a stored architecture.

References
----------
Shmalo, Y. et al. (2023). Deep learning weight pruning with RMT-SVD: increasing accuracy and
reducing overfitting. arXiv:2303.08986.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["layer_ranks", "rank_metrics", "refactor", "unwrap_optimizer", "METRIC_PREFIX"]

#: Metric names: ``rmtprune/rank/<layer>`` per prunable layer, ``rmtprune/params``, ``rmtprune/f``.
METRIC_PREFIX = "rmtprune"


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """``{layer: current rank}`` of every layer rmtprune can prune (factored layers count once)."""
    from ..layers import handler_for

    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        if any(name.startswith(k + ".") for k in out):
            continue  # the factors inside a factored layer
        h = handler_for(mod)
        if h is not None and not h.unsupported(mod):
            out[name] = int(h.current_rank(mod))
    return out


def rank_metrics(model: nn.Module, f: float | None = None) -> dict[str, float]:
    """The metrics logged after an epoch: each layer's rank, the parameter count and, when the
    epoch cut the model, the fraction ``f`` of the bulk it kept (floats, as loggers want)."""
    out = {f"{METRIC_PREFIX}/rank/{name}": float(r) for name, r in layer_ranks(model).items()}
    out[f"{METRIC_PREFIX}/params"] = float(sum(p.numel() for p in model.parameters()))
    if f is not None:
        out[f"{METRIC_PREFIX}/f"] = float(f)
    return out


def refactor(model: nn.Module, architecture: dict[str, dict[str, Any]], prefix: str = "") -> nn.Module:
    """Replace the layers of ``model`` that ``architecture`` records (:func:`rmtprune.io.factored_layers`
    of the model that was saved) by factored layers of the stored ranks, in place, and return it.

    The factors are left at zero: the checkpoint's state dict loaded next fills them. Layer names in
    ``architecture`` that start with ``prefix`` are taken without it (the stored names are the
    framework module's, e.g. ``net.fc1``, and ``model`` may be the inner ``net``); the others are
    ignored when ``prefix`` is given. A layer missing or of another shape raises
    :class:`rmtprune.errors.CheckpointError` naming it, and the model is then left as it was.
    """
    from ..io import restructure

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(architecture, dict):
        raise TypeError(f"architecture must be a dict of layer specs, got {type(architecture).__name__}")
    layers = {k[len(prefix) :]: v for k, v in architecture.items() if k.startswith(prefix)}
    undo: list[Any] = []
    try:
        restructure(model, layers, undo)
    except BaseException:
        for parent, child, old in reversed(undo):
            setattr(parent, child, old)
        raise
    return model


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``), which share its parameter groups and state."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer
