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

__all__ = ["layer_ranks", "rank_metrics", "refactor", "regroup_copies", "unwrap_optimizer", "METRIC_PREFIX"]

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


def regroup_copies(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old_params: dict[str, nn.Parameter],
    old_groups: dict[int, int],
) -> None:
    """After :func:`rmtprune.training.rebuild_optimizer`, move each new tensor that takes the place of
    a removed one of the same leaf name and shape in the same layer (the bias of a factored layer,
    ``fc1.bias`` -> ``fc1.second.bias``) into the group the removed one was in, and list every group's
    parameters in model order.

    ``rebuild_optimizer`` puts new tensors in the group of the nearest old parameter (for a bias,
    the layer's weight). Frameworks that rebuild an optimizer from the model by name rules (the
    Hugging Face Trainer: no weight decay on biases) would then disagree with the saved optimizer
    on the group sizes, and its state would not load on resume. ``old_groups`` maps ``id`` of each
    parameter taken before the cut to its group index. A single-group optimizer is unchanged.
    """
    if len(optimizer.param_groups) < 2:
        return
    named = list(model.named_parameters())
    order = {id(p): i for i, (_, p) in enumerate(named)}
    live = {id(p) for _, p in named}
    removed = [(n, p) for n, p in old_params.items() if id(p) not in live and id(p) in old_groups]
    target: dict[int, int] = {}
    for name, p in named:
        if id(p) in old_groups:
            continue
        path, _, leaf = name.rpartition(".")
        for old_name, old in removed:
            old_path, _, old_leaf = old_name.rpartition(".")
            if (
                old_leaf == leaf
                and old.shape == p.shape
                and (path == old_path or path.startswith(old_path + "."))
            ):
                target[id(p)] = old_groups[id(old)]
                break
    if not target:
        return
    lists: list[list[torch.Tensor]] = [[] for _ in optimizer.param_groups]
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            lists[target.get(id(p), gi)].append(p)
    for group, params in zip(optimizer.param_groups, lists, strict=True):
        ours = sorted((p for p in params if id(p) in order), key=lambda p: order[id(p)])
        group["params"] = ours + [p for p in params if id(p) not in order]
