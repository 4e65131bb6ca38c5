"""RMT pruning during training with PyTorch Lightning: ``RMTPruningCallback``.

One call::

    from rmtprune.integrations.lightning import RMTPruningCallback
    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[RMTPruningCallback(every=2)])

At the end of every ``every``-th training epoch from ``start`` (epochs counted as completed
epochs, as :class:`rmtprune.training.RMTPruner` counts them) the callback cuts the
LightningModule in place with its :class:`~rmtprune.training.RMTPruner` (already factored layers
are cut again) and points the trainer's optimizers at the new parameters. After every epoch it
logs each prunable layer's rank, the parameter count and (on a cut) ``f`` with
``pl_module.log`` as ``rmtprune/rank/<layer>``, ``rmtprune/params``, ``rmtprune/f``, so they reach
the trainer's logger and ``trainer.callback_metrics``; the decisions are in ``callback.history_``.

**Optimizer.** ``optimizer="inplace"`` (the default) rebuilds each of ``trainer.optimizers`` in
place with :func:`rmtprune.training.rebuild_optimizer`: kept parameters keep their state
(momentum, Adam moments), the new factors start fresh (a bias moved into a factor keeps its
state and its group), and the schedulers, which
hold the same optimizer objects, continue where they were. This is what ``rmtprune.train`` does, and the tests
check that a Lightning run gives the same per-epoch losses. ``optimizer="setup_optimizers"``
uses Lightning's own mechanism, ``trainer.strategy.setup_optimizers(trainer)``, which calls
``configure_optimizers`` again: new optimizer objects, **all optimizer state restarts**; the
learning-rate schedule continues, because the callback carries every group's current ``lr`` and
every scheduler's ``state_dict`` over to the new ones (when ``configure_optimizers`` returns as
many optimizers, groups and schedulers as before; otherwise a warning says the schedule restarts).

**Checkpoints.** Every checkpoint holds the factored architecture under the key ``"rmtprune"``
(:func:`rmtprune.io.factored_layers`) and the callback's decision history (its ``state_dict``).
``trainer.fit(model, ckpt_path=...)`` with the callback in the trainer re-factors the freshly
built (dense) module to the stored architecture before Lightning loads the state dict: Lightning
has no callback hook before that load, so from ``setup`` to ``teardown`` the callback wraps the
strategy's ``load_model_state_dict`` on that strategy object. Outside Lightning,
:func:`load_checkpoint` rebuilds a module from a ``.ckpt`` file (or the module's own
``on_load_checkpoint`` may call :func:`refactor_checkpoint`, which also makes
``LightningModule.load_from_checkpoint`` work).

**Strategies.** One process on one device (``SingleDeviceStrategy``: CPU, one GPU, MPS). Any
other strategy (DDP, FSDP, DeepSpeed, ...) is refused in ``setup`` with a one-line error naming
it: every rank would have to take the identical decision and re-wrap its module.

**Packages.** ``RMTPruningCallback`` subclasses ``lightning.pytorch.Callback`` (or
``pytorch_lightning.Callback`` when only ``pytorch_lightning`` is installed). For a
``pytorch_lightning.Trainer`` when both are installed, use
``callback_class("pytorch_lightning")(every=2)``; the callback refuses a trainer of the other
package with a message saying so. Importing this module imports neither package.

References
----------
Shmalo, Y. et al. (2023). Deep learning weight pruning with RMT-SVD: increasing accuracy and
reducing overfitting. arXiv:2303.08986.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, RmtpruneError
from ..training.pruner import RMTPruner, rebuild_optimizer
from . import rank_metrics, refactor, unwrap_optimizer

__all__ = [
    "RMTPruningCallback",  # noqa: F822 (built on first access by __getattr__)
    "callback_class",
    "load_checkpoint",
    "refactor_checkpoint",
    "PACKAGES",
    "CHECKPOINT_KEY",
    "OPTIMIZER_MODES",
]

#: The Lightning packages the callback can be built on, in the order ``"auto"`` tries them.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")
#: Where a checkpoint holds the factored architecture: ``checkpoint["rmtprune"]["architecture"]``.
CHECKPOINT_KEY = "rmtprune"
#: How the optimizers follow a cut (see the module docstring).
OPTIMIZER_MODES = ("inplace", "setup_optimizers")
_MISSING = "Lightning is not installed: pip install 'rmtprune[lightning]' (or pytorch_lightning)"


def _package_name(name: str) -> str:
    """``name`` checked, ``"auto"`` resolved to the first of :data:`PACKAGES` that imports."""
    if name == "auto":
        for candidate in PACKAGES:
            try:
                importlib.import_module(candidate)
            except ImportError:
                continue
            return candidate
        raise ImportError(_MISSING)
    if name not in PACKAGES:
        raise ValueError(f"package={name!r} must be 'auto' or one of {', '.join(PACKAGES)}")
    return name


def callback_class(package: str = "auto") -> type:
    """The ``RMTPruningCallback`` class built on ``package``'s ``Callback``.

    ``"lightning.pytorch"`` or ``"pytorch_lightning"``; ``"auto"`` is the first of :data:`PACKAGES`
    that imports. The class is built once per package (``"auto"`` gives the same class object).
    """
    return _build(_package_name(package))


@functools.cache
def _build(package: str) -> type:
    try:
        pl = importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{package} is not importable ({exc}); {_MISSING}") from None
    cls = type("RMTPruningCallback", (_PruningMixin, pl.Callback), {"_pl": pl, "__module__": __name__})
    cls.__qualname__ = "RMTPruningCallback"
    cls.__doc__ = _PruningMixin.__doc__
    return cls


def __getattr__(name: str) -> Any:
    if name == "RMTPruningCallback":
        return callback_class("auto")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _PruningMixin:
    """Prune the LightningModule with an :class:`rmtprune.training.RMTPruner` at epoch ends.

    Parameters
    ----------
    every, start, keep_bulk, decay_T, config, **config_overrides : the schedule and the
        compression of each cut, as for :class:`rmtprune.training.RMTPruner`.
    optimizer : ``"inplace"`` (default: rebuild each optimizer in place, keeping the state of
        kept parameters and the LR schedule's position, as ``rmtprune.train`` does) or
        ``"setup_optimizers"`` (Lightning's ``trainer.strategy.setup_optimizers``: fresh optimizer
        state; the LR schedule's position is carried over).
    log : called with one line per decision (default: silent); ranks always go to ``pl_module.log``.

    Attributes
    ----------
    pruner : the :class:`~rmtprune.training.RMTPruner`; ``history_`` and ``events_`` are its logs.
    """

    _pl: ModuleType

    def __init__(
        self,
        every: int = 1,
        start: int | None = None,
        keep_bulk: float = 0.45,
        decay_T: float | None = None,
        *,
        config: Any = None,
        optimizer: str = "inplace",
        log: Any = None,
        **config_overrides: Any,
    ) -> None:
        if optimizer not in OPTIMIZER_MODES:
            raise ValueError(f"optimizer={optimizer!r} must be one of {', '.join(OPTIMIZER_MODES)}")
        self.pruner = RMTPruner(every, start, keep_bulk, decay_T, config=config, log=log, **config_overrides)
        self.optimizer_mode = optimizer
        self._wrapped: Any = None

    @property
    def history_(self) -> list[dict[str, Any]]:
        """One dict per layer per cut (see :attr:`rmtprune.training.RMTPruner.history_`)."""
        return self.pruner.history_

    # -- set up and tear down -----------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the trainer's package and strategy; hook the re-factoring before the state dict load."""
        if not isinstance(trainer, self._pl.Trainer):
            other = "pytorch_lightning" if self._pl.__name__ == "lightning.pytorch" else "lightning.pytorch"
            raise RmtpruneError(
                f"this RMTPruningCallback is built on {self._pl.__name__} but the trainer is a "
                f"{type(trainer).__module__.split('.')[0]} Trainer; use "
                f"rmtprune.integrations.lightning.callback_class({other!r})(...)"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, self._pl.strategies.SingleDeviceStrategy):
            raise RmtpruneError(
                f"RMTPruningCallback does not support the {type(strategy).__name__} strategy: it prunes "
                "one process on one device (SingleDeviceStrategy); for several processes use "
                "rmtprune's DDP support with your own loop, docs/distributed.md"
            )
        if self._wrapped is None:
            original = strategy.load_model_state_dict

            def load_model_state_dict(checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
                refactor_checkpoint(strategy.lightning_module, checkpoint)
                return original(checkpoint, *args, **kwargs)

            strategy.load_model_state_dict = load_model_state_dict
            self._wrapped = strategy

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the wrapper :meth:`setup` put on the strategy."""
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("load_model_state_dict", None)
            self._wrapped = None

    # -- the cut --------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """A cut at epoch 0 (``start=0``) on a fresh fit (never on a resumed one)."""
        if trainer.ckpt_path is None and not self.pruner.events_ and self.pruner.should_prune(0):
            self._cut(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Cut if the schedule says so, then log the ranks."""
        epoch = int(trainer.current_epoch) + 1  # epochs completed
        f = None
        if self.pruner.should_prune(epoch):
            self._cut(trainer, pl_module, epoch)
            f = self.pruner.fraction(epoch)
        pl_module.log_dict(
            rank_metrics(pl_module, f), on_step=False, on_epoch=True, logger=bool(trainer.loggers)
        )

    def _cut(self, trainer: Any, pl_module: nn.Module, epoch: int) -> None:
        optimizers = [unwrap_optimizer(opt) for opt in trainer.optimizers]
        old = dict(pl_module.named_parameters())
        inplace = self.optimizer_mode == "inplace"
        self.pruner.prune(pl_module, epoch, optimizers[0] if inplace and optimizers else None)
        if not optimizers:
            return
        if not inplace:
            _setup_optimizers(trainer)
            return
        for opt in optimizers[1:]:
            rebuild_optimizer(opt, pl_module, old)

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Store the factored architecture beside the state dict."""
        from ..io import factored_layers

        checkpoint[CHECKPOINT_KEY] = {"version": 1, "architecture": factored_layers(pl_module)}

    def state_dict(self) -> dict[str, Any]:
        """The decision history (saved by Lightning in the checkpoint's ``callbacks``)."""
        return {"pruner": self.pruner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the decision history saved by :meth:`state_dict`."""
        self.pruner.load_state_dict(state_dict.get("pruner", {}))


def _setup_optimizers(trainer: Any) -> None:
    """``trainer.strategy.setup_optimizers(trainer)``, the LR schedule's position carried over."""
    old_opts = list(trainer.optimizers)
    lrs = [[g["lr"] for g in opt.param_groups] for opt in old_opts]
    scheds = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    new_opts = list(trainer.optimizers)
    new_scheds = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    same = (
        len(new_opts) == len(old_opts)
        and all(len(o.param_groups) == len(g) for o, g in zip(new_opts, lrs, strict=True))
        and len(new_scheds) == len(scheds)
    )
    if not same:
        warnings.warn(
            "configure_optimizers returned other optimizers, groups or schedulers after the cut; "
            "the learning-rate schedule restarts",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    for opt, group_lrs in zip(new_opts, lrs, strict=True):
        for group, lr in zip(opt.param_groups, group_lrs, strict=True):
            group["lr"] = lr
    for sched, state in zip(new_scheds, scheds, strict=True):
        sched.load_state_dict(state)


# -------------------------------------------------------------------------------------------------
# Reloading outside the callback
# -------------------------------------------------------------------------------------------------


def refactor_checkpoint(module: nn.Module, checkpoint: dict[str, Any], prefix: str = "") -> nn.Module:
    """Re-factor ``module`` in place to the architecture a checkpoint of the callback stores.

    ``checkpoint`` is the loaded checkpoint dict; a checkpoint without the ``"rmtprune"`` key (a
    model never cut) leaves the module as it is. Call it from a LightningModule's
    ``on_load_checkpoint`` to make ``load_from_checkpoint`` work; ``prefix`` as in
    :func:`rmtprune.integrations.refactor`.
    """
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if entry is None:
        return module
    if not isinstance(entry, dict) or not isinstance(entry.get("architecture"), dict):
        raise CheckpointError(f"checkpoint[{CHECKPOINT_KEY!r}] must be a dict with an 'architecture' dict")
    return refactor(module, entry["architecture"], prefix)


def load_checkpoint(
    path: str | os.PathLike[str],
    module: nn.Module,
    *,
    prefix: str = "",
    strict: bool = True,
    weights_only: bool = True,
) -> nn.Module:
    """Load a Lightning checkpoint written with the callback into ``module`` (re-factored first).

    ``module`` is a freshly built instance of the trained architecture: the LightningModule, or
    (with ``prefix="net."``) the network it holds as ``self.net``. The file is read with
    ``torch.load(weights_only=True)`` (no code runs; a checkpoint whose hyper-parameters hold
    arbitrary objects needs ``weights_only=False``, only for a file you trust). Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    try:
        ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=weights_only)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read Lightning checkpoint {str(path)!r}: {str(exc)[:300]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    refactor_checkpoint(module, ckpt, prefix)
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=strict)
    return module
