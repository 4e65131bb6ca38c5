"""RMT pruning during training with the Hugging Face ``transformers.Trainer``: ``RMTPruningCallback``.

One call::

    from rmtprune.integrations.hf import RMTPruningCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[RMTPruningCallback(every=2)])

At every ``on_epoch_end`` that completes epoch ``start``, ``start + every``, ... (epochs counted
as completed epochs, as :class:`rmtprune.training.RMTPruner` counts them; an epoch cut short by
``max_steps`` is never pruned) the callback cuts ``model`` in place with its
:class:`~rmtprune.training.RMTPruner` (already factored layers are cut again) and rebuilds the
trainer's optimizer in place (accelerate's ``AcceleratedOptimizer`` is unwrapped) with
:func:`rmtprune.training.rebuild_optimizer`: kept parameters keep their state, the new factors
start fresh, a bias moved into a factor keeps its state and its group, and the trainer's LR
scheduler, which holds the
same optimizer, continues where it was.

**Logging.** After every epoch the per-layer ranks, the parameter count and (on a cut) ``f`` are
logged as ``rmtprune/rank/<layer>``, ``rmtprune/params``, ``rmtprune/f``: appended to
``trainer.state.log_history``, or, when the callback is attached with :meth:`attach`
(``RMTPruningCallback(...).attach(trainer)``), through ``trainer.log``, which also hands them to
the ``report_to`` integrations (TensorBoard, W&B, ...). The decisions are in ``callback.history_``.

**Checkpoints.** Each checkpoint directory the trainer writes gets ``rmtprune_trainer.json``:
the factored architecture (:func:`rmtprune.io.factored_layers`) and the decision history; with
``save_model=True`` also ``rmtprune.safetensors`` (+ ``.json``), which :func:`rmtprune.load`
reads back into a fresh model without transformers. The Trainer loads a checkpoint's weights in
``train()`` before any callback runs, so resuming takes one call first::

    ckpt = callback.prepare_resume(trainer, "out/checkpoint-90")  # or True: the last one
    trainer.train(resume_from_checkpoint=ckpt)

which re-factors ``trainer.model`` to the stored architecture, restores the decision history and,
if you passed the trainer an optimizer, rebuilds it over the new parameters.
:func:`load_checkpoint` rebuilds a model from a checkpoint directory outside the Trainer.

**transformers models.** rmtprune makes a cut ``PreTrainedModel`` refuse ``save_pretrained``
(``from_pretrained`` would load its factored layers at random). For the Trainer, which saves
through ``save_pretrained``, the callback replaces that guard on the trainer's model by
transformers' own ``save_pretrained`` followed by :data:`STATE_FILE` and ``config.json``'s
``transformers_weights`` set to :data:`LOAD_HINT`: the checkpoint is written and resumes, and
``from_pretrained`` of it still stops (on that sentence) instead of loading random layers.

**Limits.** One process (``world_size == 1``, at most one GPU): DDP, DataParallel, FSDP and
DeepSpeed are refused at ``on_train_begin`` with a one-line error. Importing this module does
not import transformers.

References
----------
Shmalo, Y. et al. (2023). Deep learning weight pruning with RMT-SVD: increasing accuracy and
reducing overfitting. arXiv:2303.08986.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, RmtpruneError
from ..training.pruner import RMTPruner
from . import rank_metrics, refactor, unwrap_optimizer

__all__ = [
    "RMTPruningCallback",  # noqa: F822 (built on first access by __getattr__)
    "callback_class",
    "load_checkpoint",
    "refactor_from_checkpoint",
    "read_state",
    "write_state",
    "STATE_FILE",
    "MODEL_FILE",
    "LOAD_HINT",
]

#: The file each checkpoint directory gets: architecture and decision history.
STATE_FILE = "rmtprune_trainer.json"
#: The rmtprune copy of the model a checkpoint gets with ``save_model=True``.
MODEL_FILE = "rmtprune.safetensors"
_FORMAT = "rmtprune-hf-trainer"
_MISSING = "transformers is not installed: pip install 'rmtprune[hf]'"


@functools.cache
def callback_class() -> type:
    """The ``RMTPruningCallback`` class on ``transformers.TrainerCallback`` (built once)."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError(f"{_MISSING} ({exc})") from None
    cls = type("RMTPruningCallback", (_PruningMixin, TrainerCallback), {"__module__": __name__})
    cls.__qualname__ = "RMTPruningCallback"
    cls.__doc__ = _PruningMixin.__doc__
    return cls


def __getattr__(name: str) -> Any:
    if name == "RMTPruningCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _PruningMixin:
    """Prune the Trainer's model with an :class:`rmtprune.training.RMTPruner` at epoch ends.

    Parameters
    ----------
    every, start, keep_bulk, decay_T, config, **config_overrides : the schedule and the
        compression of each cut, as for :class:`rmtprune.training.RMTPruner`.
    save_model : also write ``rmtprune.safetensors`` (for :func:`rmtprune.load`) into each
        checkpoint directory (a second copy of the weights).
    log : called with one line per decision (default: silent).

    Attributes
    ----------
    pruner : the :class:`~rmtprune.training.RMTPruner`; ``history_`` and ``events_`` are its logs.
    """

    def __init__(
        self,
        every: int = 1,
        start: int | None = None,
        keep_bulk: float = 0.45,
        decay_T: float | None = None,
        *,
        config: Any = None,
        save_model: bool = False,
        log: Any = None,
        **config_overrides: Any,
    ) -> None:
        self.pruner = RMTPruner(every, start, keep_bulk, decay_T, config=config, log=log, **config_overrides)
        self.save_model = bool(save_model)
        self._trainer: Any = None

    @property
    def history_(self) -> list[dict[str, Any]]:
        """One dict per layer per cut (see :attr:`rmtprune.training.RMTPruner.history_`)."""
        return self.pruner.history_

    def attach(self, trainer: Any) -> Any:
        """Add the callback to ``trainer`` (if not there) and log through ``trainer.log``; returns self."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    # -- the cut --------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Refuse more than one process; a cut at epoch 0 (``start=0``) on a fresh run."""
        _check_single_process(args)
        if state.global_step == 0 and not self.pruner.events_ and self.pruner.should_prune(0):
            self._cut(model, kwargs.get("optimizer"), 0)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Cut if the schedule says so at the epoch just completed, then log the ranks."""
        epoch_f = float(state.epoch or 0.0)
        if not math.isclose(epoch_f, round(epoch_f), abs_tol=1e-6):
            return  # an epoch cut short (max_steps): not a completed epoch
        epoch = round(epoch_f)
        f = None
        if self.pruner.should_prune(epoch):
            self._cut(model, kwargs.get("optimizer"), epoch)
            f = self.pruner.fraction(epoch)
        metrics = rank_metrics(model, f)
        if self._trainer is not None:
            self._trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})

    def _cut(self, model: nn.Module, optimizer: Any, epoch: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"the trainer gave no model to prune (got {type(model).__name__})")
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.pruner.prune(model, epoch, opt)
        _checkpointable(model, self.pruner)

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Write the architecture and the decisions (and the rmtprune model) into the new checkpoint."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir() or not args.should_save:
            return
        write_state(folder, model, self.pruner)
        if self.save_model:
            from ..io import save

            save(model, folder / MODEL_FILE, force=True)

    def prepare_resume(self, trainer: Any, checkpoint: str | os.PathLike[str] | bool) -> str:
        """Before ``trainer.train(resume_from_checkpoint=...)``: re-factor ``trainer.model`` to the
        checkpoint's architecture, restore the decision history, and rebuild an optimizer you gave
        the trainer over the new parameters. ``checkpoint`` is a checkpoint directory, or ``True``
        for the last one in ``trainer.args.output_dir``. Returns the directory, to pass on."""
        folder = _resolve(trainer, checkpoint)
        data = read_state(folder)
        refactor_from_checkpoint(trainer.model, folder, optimizer=trainer.optimizer)
        self.pruner.load_state_dict(data.get("pruner", {}))
        if data["architecture"]:
            _checkpointable(trainer.model, self.pruner)
        return str(folder)


#: What ``config.json`` of a Trainer checkpoint of a cut transformers model says to ``from_pretrained``.
LOAD_HINT = (
    "rmtprune: a Trainer checkpoint of a model cut by rmtprune (factored layers that this config does "
    "not describe); transformers cannot load it by itself: resume with RMTPruningCallback.prepare_resume "
    "or load with rmtprune.integrations.hf.load_checkpoint(DIR, model)"
)


def _checkpointable(model: nn.Module, pruner: RMTPruner) -> None:
    """Let the Trainer checkpoint a cut transformers model: rmtprune's guard makes its
    ``save_pretrained`` refuse (``from_pretrained`` would load the factored layers at random); this
    instance's ``save_pretrained`` becomes transformers' own, followed by :data:`STATE_FILE` and
    ``config.json``'s ``transformers_weights`` set to :data:`LOAD_HINT`, so ``from_pretrained``
    of the directory still stops with that sentence. Other models are left alone."""
    from .._hf_guard import is_transformers_model

    current = vars(model).get("save_pretrained")
    if not is_transformers_model(model) or getattr(current, "_rmtprune_trainer", False):
        return

    def save_pretrained(save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            _mark_directory(Path(save_directory), model, pruner)
        return out

    save_pretrained._rmtprune_trainer = True  # type: ignore[attr-defined]
    object.__setattr__(model, "save_pretrained", save_pretrained)


def _mark_directory(folder: Path, model: nn.Module, pruner: RMTPruner) -> None:
    from .._atomic import atomic_write_text

    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["transformers_weights"] = LOAD_HINT
        atomic_write_text(config, json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_state(folder, model, pruner)


def _check_single_process(args: Any) -> None:
    """One process on at most one device; everything else refused in one line naming it."""
    what = None
    if getattr(args, "deepspeed", None):
        what = "DeepSpeed"
    elif getattr(args, "fsdp", None):
        what = "FSDP"
    elif int(getattr(args, "world_size", 1) or 1) > 1:
        what = f"distributed training (world_size={args.world_size}, {args.parallel_mode})"
    elif int(getattr(args, "n_gpu", 0) or 0) > 1:
        what = f"DataParallel over {args.n_gpu} GPUs"
    if what is not None:
        raise RmtpruneError(
            f"RMTPruningCallback does not support {what}: it prunes one process on one device "
            "(for several processes use rmtprune's DDP support with your own loop, docs/distributed.md)"
        )


# -------------------------------------------------------------------------------------------------
# Checkpoint files
# -------------------------------------------------------------------------------------------------


def write_state(folder: str | os.PathLike[str], model: nn.Module, pruner: RMTPruner | None = None) -> Path:
    """Write :data:`STATE_FILE` into ``folder`` (atomically): the architecture and the decisions."""
    from .._atomic import atomic_write_text
    from .._format import json_default
    from ..io import factored_layers

    data = {
        "format": _FORMAT,
        "version": 1,
        "architecture": factored_layers(model),
        "pruner": pruner.state_dict() if pruner is not None else {},
    }
    path = Path(folder) / STATE_FILE
    atomic_write_text(path, json.dumps(data, indent=1, default=json_default) + "\n")
    return path


def read_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked contents of a checkpoint's :data:`STATE_FILE` (``{}`` parts when it has none)."""
    path = Path(folder) / STATE_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} is not a directory")
    if not path.is_file():
        return {"architecture": {}, "pruner": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} cannot be read: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("architecture"), dict)
    ):
        raise CheckpointError(f"{str(path)!r} is not an rmtprune Trainer state file")
    return data


def _resolve(trainer: Any, checkpoint: str | os.PathLike[str] | bool) -> Path:
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(trainer.args.output_dir)
        if last is None:
            raise CheckpointError(f"no checkpoint found in {trainer.args.output_dir!r}")
        return Path(last)
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a directory or True, got {checkpoint!r}")
    return Path(checkpoint)


def refactor_from_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike[str], *, optimizer: Any = None
) -> nn.Module:
    """Re-factor ``model`` in place to the architecture stored in the checkpoint directory (a model
    never cut is left as it is); an ``optimizer`` over ``model`` is rebuilt over the new parameters."""
    from ..training.pruner import rebuild_optimizer

    data = read_state(checkpoint)
    opt = unwrap_optimizer(optimizer) if optimizer is not None else None
    old = dict(model.named_parameters())
    refactor(model, data["architecture"])
    if opt is not None:
        rebuild_optimizer(opt, model, old)
    return model


def load_checkpoint(
    checkpoint: str | os.PathLike[str], model: nn.Module, *, strict: bool = True
) -> nn.Module:
    """Load a Trainer checkpoint directory's ``model.safetensors`` into ``model`` (a freshly built
    instance of the trained architecture), re-factored first; returns ``model``."""
    from safetensors.torch import load_file

    refactor_from_checkpoint(model, checkpoint)
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no model.safetensors")
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=strict)
    return model
