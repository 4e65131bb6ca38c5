"""Pruning during training (METHOD.md section 7): a callback for any loop, and a complete trainer.

The package, by job:

- :mod:`.config`: :class:`TrainConfig` (a run's settings, the compression of each cut nested as a
  :class:`~rmtprune.config.CompressionConfig`) and :class:`TrainResult`;
- :mod:`.pruner`: the :class:`RMTPruner` callback and :func:`rebuild_optimizer` (optimizer surgery);
- :mod:`.trainer`: :func:`train`, a short loop over epochs;
- :mod:`.opening`: a run's configuration, output directory, checkpoint, data and model, checked
  (``preflight``: every check without building or writing anything);
- :mod:`.setup`: names, devices, data, the model sized on the meta device, optimizer, schedule;
- :mod:`.run_files`: the checkpoints written after every epoch, tables, the output directory;
- :mod:`.resume`: reading a checkpoint back, every field checked before allocation;
- :mod:`.stability`: accuracy stability (:class:`~.stability.StabilityTracker`, ``summarize``):
  epochs where the training loss fell but accuracy fell too, examples flipped correct -> wrong;
- :mod:`.distributed`: the cut under ``torch.distributed`` (rank 0 decides, every rank applies,
  DDP re-wrapped; FSDP refused) and the reductions of a data-parallel run;
- :mod:`.launch`: ``rmtprune train --nproc N`` (one process per rank, torchrun's environment).

Plots of a run are :func:`rmtprune.plotting.plot_training`; the regulariser and the evaluation
are the ones of :mod:`rmtprune.finetune`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..finetune import evaluate as _evaluate
from ..finetune import regularizer as _regularizer
from .config import LR_SCHEDULES, OPTIMIZERS, TrainConfig, TrainResult
from .pruner import RMTPruner, rebuild_optimizer
from .resume import _read_checkpoint, load_checkpoint
from .run_files import (
    _KILL_ENV,
    _KILL_STAGES,
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    RUN_FILES,
    writable_dir,
)
from .trainer import train

__all__ = [
    "RMTPruner",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "rebuild_optimizer",
    "regularization",
    "load_checkpoint",
    "writable_dir",
    "OPTIMIZERS",
    "LR_SCHEDULES",
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "RUN_FILES",
]

# Test hooks and helpers that tests import from here.
_ = (_KILL_ENV, _KILL_STAGES, _read_checkpoint)


def regularization(model: nn.Module, l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """Deprecated: ``rmtprune.finetune.regularizer(model, l1, l2, weights="all")``.

    ``l1 * sum|w| + l2 * sum w**2`` over every trainable tensor with >= 2 dims (factors included).
    """
    warnings.warn(
        "rmtprune.training.regularization is deprecated: use "
        "rmtprune.finetune.regularizer(model, l1, l2, weights='all')",
        DeprecationWarning,
        stacklevel=2,
    )
    return _regularizer(model, l1, l2, weights="all")


def evaluate(
    model: nn.Module, data: Any, device: str | torch.device = "cpu", batch_size: int = 1024
) -> tuple[float, float]:
    """Deprecated: ``rmtprune.finetune.evaluate`` (a dict); this returns ``(loss, accuracy)``.

    Mean cross-entropy and accuracy of ``model`` on a :class:`rmtprune.data.Dataset`, batches of
    ``batch_size`` moved to the model's device.
    """
    from ..zoo.data import batches

    warnings.warn(
        "rmtprune.training.evaluate is deprecated: use rmtprune.finetune.evaluate(model, batches, "
        "reduction='sum'), which returns a dict",
        DeprecationWarning,
        stacklevel=2,
    )
    res = _evaluate(model, lambda: batches(data, batch_size), reduction="sum")
    return res["loss"], res["accuracy"]
