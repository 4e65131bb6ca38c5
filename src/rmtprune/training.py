"""Pruning during training (METHOD.md section 7): a callback for any loop, and a complete trainer.

:class:`RMTPruner` is the callback: at the end of every ``every``-th epoch from ``start`` it
fits each layer's Marchenko-Pastur bulk, keeps ``n_spikes + floor(f(epoch) * n_bulk)``
singular triplets and factors the layer (through :func:`rmtprune.compress`), then rebuilds the
optimizer's parameter groups over the new parameters. :func:`train` is a full run around it:
data, model, optimizer, learning-rate schedule, L1/L2 regularisation, per-epoch metrics, plots
and atomic checkpoints that ``resume=True`` continues from, bit for bit.

References
----------
Shmalo, Y. et al. (2023). Deep learning weight pruning with RMT-SVD: increasing accuracy and
reducing overfitting. arXiv:2303.08986.
Berlyand, L., Sandier, E., Shmalo, Y. and Zhang, L. (2023). Enhancing accuracy in deep learning
using random matrix theory. arXiv:2310.03165.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._atomic import atomic_path, atomic_write_text
from ._progress import progress
from .errors import CheckpointError, RmtpruneError, first_line
from .finetune import DivergedError, optimizer_step
from .io import factored_layers, restructure
from .spectral import DEFAULT_KS_MAX

__all__ = [
    "RMTPruner",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "rebuild_optimizer",
    "regularization",
    "load_checkpoint",
    "OPTIMIZERS",
    "LR_SCHEDULES",
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
]

LogFn = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Optimizer surgery
# --------------------------------------------------------------------------------------------


def _module_path(name: str) -> str:
    return name.rpartition(".")[0]


def _closest_old(name: str, old_names: list[str]) -> str | None:
    """The old parameter that lived closest to ``name`` in the module tree (longest shared prefix)."""
    path = _module_path(name)
    while True:
        for old in old_names:
            op = _module_path(old)
            if op == path or (path and op.startswith(path + ".")) or not path:
                return old
        if not path:
            return None
        path = _module_path(path)


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old_params: dict[str, nn.Parameter],
) -> dict[str, list[str]]:
    """Point ``optimizer`` at ``model``'s parameters after module surgery, in place.

    Parameters still present (same object) keep their group and their state (momentum, Adam
    moments); parameters that were removed lose theirs; new parameters (the factors of a layer
    that was cut) join the group of the old parameter closest to them in the module tree and
    start with fresh state, except a tensor copied unchanged into the new layer (its bias),
    which takes over the state of the one it copies. Group hyper-parameters, ``lr`` included,
    are untouched, so a learning rate scheduler attached to ``optimizer`` continues where it was.

    Parameters
    ----------
    optimizer : the optimizer that was training ``model`` before the surgery.
    model : the model after surgery.
    old_params : ``dict(model.named_parameters())`` taken before the surgery.

    Returns
    -------
    dict with the parameter names that were ``kept``, ``carried`` (new tensor, state taken over
    from the identical old one), ``added`` (fresh state) and ``removed``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group_of: dict[int, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = gi
    old_ids = {id(p) for p in old_params.values()}
    old_names = list(old_params)
    new_named = list(model.named_parameters())
    new_ids = {id(p) for _, p in new_named}

    # Parameters the optimizer holds that are not (and were not) the model's: left as they are.
    foreign: list[list[torch.Tensor]] = [
        [p for p in g["params"] if id(p) not in old_ids and id(p) not in new_ids]
        for g in optimizer.param_groups
    ]
    new_lists: list[list[torch.Tensor]] = [[] for _ in optimizer.param_groups]
    kept, added, carried = [], [], []
    removed = [n for n, p in old_params.items() if id(p) not in new_ids and id(p) in group_of]
    for name, p in new_named:
        if id(p) in group_of:
            new_lists[group_of[id(p)]].append(p)
            kept.append(name)
            continue
        if id(p) in old_ids:  # an old parameter the optimizer never trained (frozen): still not trained
            continue
        old = _closest_old(name, old_names)
        if old is None or id(old_params[old]) not in group_of:
            continue
        new_lists[group_of[id(old_params[old])]].append(p)
        twin = _same_tensor(name, p, old_params, removed)
        if twin is not None and old_params[twin] in optimizer.state:
            # A tensor copied unchanged into the new layer (the bias of a cut layer): same state.
            optimizer.state[p] = _clone_state(optimizer.state[old_params[twin]])
            carried.append(name)
        else:
            added.append(name)

    for gi, group in enumerate(optimizer.param_groups):
        group["params"] = new_lists[gi] + foreign[gi]
    live = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p in [p for p in optimizer.state if id(p) not in live]:
        del optimizer.state[p]
    return {"kept": kept, "carried": carried, "added": added, "removed": removed}


def _same_tensor(
    name: str, p: torch.Tensor, old_params: dict[str, nn.Parameter], removed: list[str]
) -> str | None:
    """A removed parameter of the same layer, leaf name and value as ``p`` (a bias moved into a factor)."""
    leaf = name.rpartition(".")[2]
    path = _module_path(name)
    for old in removed:
        o = old_params[old]
        same_place = path == _module_path(old) or path.startswith(_module_path(old) + ".")
        if (
            same_place
            and old.rpartition(".")[2] == leaf
            and o.shape == p.shape
            and torch.equal(o.data, p.data)
        ):
            return old
    return None


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Regularisation
# --------------------------------------------------------------------------------------------


def _weights(model: nn.Module) -> Iterable[torch.Tensor]:
    return (p for p in model.parameters() if p.requires_grad and p.ndim >= 2)


def regularization(model: nn.Module, l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """``l1 * sum|w| + l2 * sum w**2`` over the weights (tensors with >= 2 dims, factors included).

    Biases and normalisation parameters are not penalised. The papers use 1e-6 to 5e-6 for each.
    """
    for name, v in (("l1", l1), ("l2", l2)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{name}={v!r} must be a float")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name}={v!r} must be a finite number >= 0")
    total = torch.zeros(())
    if l1 == 0 and l2 == 0:
        return total
    for w in _weights(model):
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value!r} must be <= {high}")
    return value


class RMTPruner:
    """Prune a model's layers to their RMT rank periodically during training (Algorithm 1).

    Call :meth:`maybe_prune` at the end of every epoch with the number of epochs completed so
    far. At epochs ``start, start + every, ...`` each prunable layer whose bulk fits the
    Marchenko-Pastur law (KS distance ``<= ks_max``) keeps ``n_spikes + floor(f(epoch) * n_bulk)``
    singular triplets and is stored as two thin factors; already factored layers are cut again.
    ``f`` is the constant ``keep_bulk`` or, with ``decay_T``, the linear decay
    ``max(0, 1 - epoch / decay_T)``. Every decision is appended to :attr:`history_`.

    Parameters
    ----------
    every : prune every this many epochs.
    start : first epoch that prunes; default ``every`` (so never at random initialisation unless
        ``start=0`` is asked for: an untrained layer is all bulk and would lose most of its rank).
    keep_bulk : constant fraction of the bulk kept, in [0, 1] (the 2023 notebook used 0.45).
    decay_T : if given, ``f(epoch) = max(0, 1 - epoch / decay_T)`` instead (papers: 200 or 300).
    config : a base :class:`rmtprune.CompressionConfig` (rule, gate ``ks_max``, ``min_rank``,
        ``include``/``exclude`` patterns, per-layer ``overrides``...); default ``CompressionConfig()``.
        Its ``keep_bulk`` is replaced by ``f(epoch)`` at each cut.
    **config_overrides : fields of the config to replace (``ks_max=0.2``, ``min_rank=4``, ...).
    log : called with one line per decision and per optimizer rebuild (default: silent).

    Attributes
    ----------
    history_ : list of dicts, one per layer per cut: ``epoch, layer, f, rank_before, rank_after,
        n_spikes, n_bulk, sigma2, ks, action, reason, params_before, params_after``.
    events_ : list of dicts, one per cut: ``epoch, f, params_before, params_after, seconds,
        optimizer`` (names of parameters whose optimizer state was kept / fresh).
    """

    def __init__(
        self,
        every: int = 1,
        start: int | None = None,
        keep_bulk: float = 0.45,
        decay_T: float | None = None,
        *,
        config: Any = None,
        log: LogFn | None = None,
        **config_overrides: Any,
    ) -> None:
        self.every = _check_int("every", every, 1)
        self.start = self.every if start is None else _check_int("start", start, 0)
        if not isinstance(keep_bulk, (int, float)) or isinstance(keep_bulk, bool):
            raise TypeError(f"keep_bulk={keep_bulk!r} must be a float in [0, 1]")
        if not 0.0 <= keep_bulk <= 1.0:
            raise ValueError(f"keep_bulk={keep_bulk!r} must be in [0, 1]")
        self.keep_bulk = float(keep_bulk)
        if decay_T is not None:
            if not isinstance(decay_T, (int, float)) or isinstance(decay_T, bool):
                raise TypeError(f"decay_T={decay_T!r} must be a positive number or None")
            if not (decay_T > 0 and math.isfinite(decay_T)):
                raise ValueError(f"decay_T={decay_T!r} must be a positive finite number")
        self.decay_T = None if decay_T is None else float(decay_T)
        self.config = config
        self.config_overrides = dict(config_overrides)
        self.log = log
        self.history_: list[dict[str, Any]] = []
        self.events_: list[dict[str, Any]] = []
        self._base_config()  # validate the compression options now, not at the first cut

    # -- schedule ------------------------------------------------------------------------------

    def fraction(self, epoch: int) -> float:
        """``f(epoch)``: the fraction of the bulk kept by a cut at ``epoch``."""
        _check_int("epoch", epoch, 0)
        if self.decay_T is None:
            return self.keep_bulk
        return max(0.0, 1.0 - epoch / self.decay_T)

    def should_prune(self, epoch: int) -> bool:
        """Whether a cut happens at the end of ``epoch`` (epochs completed so far)."""
        _check_int("epoch", epoch, 0)
        return epoch >= self.start and (epoch - self.start) % self.every == 0

    def schedule(self, epochs: int) -> list[tuple[int, float]]:
        """``(epoch, f(epoch))`` for every cut in a run of ``epochs`` epochs (epoch 0 = initialisation)."""
        return [(e, self.fraction(e)) for e in range(0, epochs + 1) if self.should_prune(e)]

    # -- the cut -------------------------------------------------------------------------------

    def _base_config(self, keep_bulk: float | None = None) -> Any:
        """The compression config of a cut: ``config`` with the overrides and ``keep_bulk = f``."""
        from .config import CompressionConfig

        fields: dict[str, Any] = dict(self.config_overrides)
        if keep_bulk is not None:
            fields["keep_bulk"] = keep_bulk
        if self.config is None:
            return CompressionConfig(**fields)
        if not isinstance(self.config, CompressionConfig):
            raise TypeError(f"config must be a rmtprune.CompressionConfig, got {type(self.config).__name__}")
        known = {f.name for f in dataclasses.fields(CompressionConfig)}
        bad = sorted(set(fields) - known)
        if bad:
            raise TypeError(f"unknown CompressionConfig field(s) {bad}; valid: {', '.join(sorted(known))}")
        return dataclasses.replace(self.config, **fields)

    def maybe_prune(
        self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.Optimizer | None:
        """Cut ``model`` in place if the schedule says so at ``epoch``; return the optimizer.

        The optimizer returned is the same object, its parameter groups rebuilt over the new
        parameters (see :func:`rebuild_optimizer`), so a scheduler built on it keeps working.
        """
        if self.should_prune(epoch):
            self.prune(model, epoch, optimizer)
        return optimizer

    def prune(
        self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.Optimizer | None:
        """Cut ``model`` in place now, whatever the schedule, with ``f(epoch)``; return the optimizer."""
        from .surgery import compress

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        f = self.fraction(epoch)
        t0 = time.perf_counter()
        old = dict(model.named_parameters())
        before = sum(p.numel() for p in old.values())
        out, report = compress(model, config=self._base_config(keep_bulk=f))
        if out is not model:
            raise RuntimeError("rmtprune.compress returned a new model; RMTPruner needs in-place surgery")
        opt_info = None
        if optimizer is not None:
            opt_info = rebuild_optimizer(optimizer, model, old)
        seconds = time.perf_counter() - t0
        after = sum(p.numel() for p in model.parameters())
        rows = [dict(epoch=epoch, f=f, **row) for row in _report_rows(report)]
        self.history_.extend(rows)
        event = {
            "epoch": epoch,
            "f": f,
            "params_before": before,
            "params_after": after,
            "seconds": seconds,
            "optimizer": opt_info,
        }
        self.events_.append(event)
        if self.log is not None:
            for row in rows:
                self.log(_format_decision(row))
            if opt_info is not None and opt_info["added"]:
                carried = f", {', '.join(opt_info['carried'])} take over the state of the tensor they copy"
                self.log(
                    f"epoch {epoch}: optimizer rebuilt: {len(opt_info['kept'])} parameters keep their state, "
                    f"{len(opt_info['added'])} new ({', '.join(opt_info['added'])}) start with fresh state"
                    + (carried if opt_info["carried"] else "")
                )
            self.log(f"epoch {epoch}: f={f:.3f}, parameters {before:,} -> {after:,} ({seconds:.2f} s)")
        return optimizer

    def state_dict(self) -> dict[str, Any]:
        """The decision log, for checkpoints."""
        return {"history": [dict(r) for r in self.history_], "events": [dict(e) for e in self.events_]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the decision log saved by :meth:`state_dict`."""
        self.history_ = [dict(r) for r in state.get("history", [])]
        self.events_ = [dict(e) for e in state.get("events", [])]


def _format_decision(row: dict[str, Any]) -> str:
    def g(key: str, fmt: str = "{}") -> str:
        v = row.get(key)
        return "-" if v is None else fmt.format(v)

    return (
        f"epoch {row['epoch']}: {row['layer']}: {row['action']} rank {g('rank_before')} -> "
        f"{g('rank_after')} (n_spikes={g('n_spikes')}, n_bulk={g('n_bulk')}, sigma2={g('sigma2', '{:.3g}')}, "
        f"ks={g('ks', '{:.3f}')}, f={row['f']:.3f})" + (f": {row['reason']}" if row.get("reason") else "")
    )


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

#: Optimizers :func:`train` builds (SGD with momentum, or AdamW).
OPTIMIZERS = ("sgd", "adamw")
#: Learning-rate schedules, stepped once per epoch: constant, cosine annealing to 0 over the run,
#: or step decay by ``lr_gamma`` every ``lr_step`` epochs.
LR_SCHEDULES = ("constant", "cosine", "step")
#: File names in the output directory: the latest complete checkpoint and the one before it.
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
_CORRUPT = "checkpoint.corrupt.pt"
_FORMAT = "rmtprune-train-checkpoint"
_VERSION = 1
#: Config fields that may differ when a run is resumed (they do not change what was trained).
_RESUME_MAY_CHANGE = ("epochs", "device", "track_spectra", "eval_before_prune")
#: Sanity bounds: more epochs than this is a typo, a seed must fit torch's 64-bit generator.
_MAX_EPOCHS = 1_000_000
_MAX_SEED = 2**63 - 1
_MAX_FLOAT32 = float(torch.finfo(torch.float32).max)
#: Device types a run can train on (``meta`` holds no data; the rest are not built into torch).
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in ``config.json`` and in every checkpoint."""

    dataset: str = field(default="mnist", metadata={"help": "dataset name (see rmtprune.data.DATASETS)"})
    model: str = field(default="mlp:1000", metadata={"help": "model spec (see rmtprune.models)"})
    epochs: int = field(default=10, metadata={"help": "number of epochs"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (with momentum) or adamw"})
    lr: float = field(default=0.01, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "optimizer weight decay"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant, cosine or step"})
    lr_step: int = field(default=10, metadata={"help": "epochs between decays of the step schedule"})
    lr_gamma: float = field(default=0.1, metadata={"help": "factor of each step decay"})
    l1: float = field(default=0.0, metadata={"help": "L1 penalty mu1 on the weights (papers: 1e-6..5e-6)"})
    l2: float = field(default=0.0, metadata={"help": "L2 penalty mu2 on the weights (papers: 1e-6..5e-6)"})
    batch_size: int = field(default=128, metadata={"help": "mini-batch size"})
    seed: int = field(default=0, metadata={"help": "seed of every random number generator"})
    prune: bool = field(default=True, metadata={"help": "prune during training"})
    prune_every: int = field(default=2, metadata={"help": "prune every this many epochs"})
    prune_start: int | None = field(default=None, metadata={"help": "first pruning epoch (default: every)"})
    keep_bulk: float = field(default=0.45, metadata={"help": "constant fraction f of the bulk kept"})
    decay_T: float | None = field(  # noqa: N815 - the papers' T
        default=None, metadata={"help": "f(e) = max(0, 1 - e / T) instead"}
    )
    ks_max: float = field(default=DEFAULT_KS_MAX, metadata={"help": "KS gate of the MP fit"})
    min_rank: int = field(default=1, metadata={"help": "never cut a layer below this rank"})
    keep_output_rank: bool = field(
        default=True, metadata={"help": "never cut the output (logits) layer below its full rank"}
    )
    exclude: list[str] = field(default_factory=list, metadata={"help": "layer patterns never pruned"})
    train_subset: int | None = field(default=None, metadata={"help": "use the first n training samples"})
    test_subset: int | None = field(default=None, metadata={"help": "use the first n test samples"})
    eval_before_prune: bool = field(
        default=False, metadata={"help": "also measure test accuracy just before each cut"}
    )
    track_spectra: bool = field(default=True, metadata={"help": "fit every layer's spectrum every epoch"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def __post_init__(self) -> None:
        for name in ("dataset", "model", "optimizer", "lr_schedule", "device"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a string")
        for name in ("prune", "track_spectra", "keep_output_rank", "eval_before_prune"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
        _check_int("epochs", self.epochs, 1, _MAX_EPOCHS)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0, _MAX_SEED)
        _check_int("prune_every", self.prune_every, 1)
        _check_int("lr_step", self.lr_step, 1)
        _check_int("min_rank", self.min_rank, 1)
        if self.prune_start is not None:
            _check_int("prune_start", self.prune_start, 0)
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "l1", "l2", "keep_bulk", "ks_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}={v!r} must be a number")
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")
            setattr(self, name, float(v))
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "l1", "l2"):
            # The optimizer multiplies float32 weights by these: a larger value overflows in torch.
            if getattr(self, name) > _MAX_FLOAT32:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} must be <= {_MAX_FLOAT32:.3g} (the largest float32)"
                )
        if self.keep_bulk > 1:
            raise ValueError(f"keep_bulk={self.keep_bulk!r} must be in [0, 1]")
        if self.decay_T is not None:
            if isinstance(self.decay_T, bool) or not isinstance(self.decay_T, (int, float)):
                raise TypeError(f"decay_T={self.decay_T!r} must be a number or None")
            if not (math.isfinite(self.decay_T) and self.decay_T > 0):
                raise ValueError(f"decay_T={self.decay_T!r} must be a positive number")
            self.decay_T = float(self.decay_T)
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise TypeError(f"exclude={self.exclude!r} must be a list of layer-name patterns")
        self.exclude = list(self.exclude)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they name the field)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig field(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained (pruned) model and everything it measured.

    ``metrics`` has one dict per epoch (see ``metrics.json``), ``decisions`` one per layer per
    cut, ``initial_params`` the parameter count of the model as built (before any cut),
    ``timings`` the seconds spent training, pruning, evaluating, fitting spectra for the metrics
    and writing files over the whole run (the resumed part only, after a resume).
    """

    model: nn.Module
    config: TrainConfig
    metrics: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    timings: dict[str, float]
    out: Path | None = None
    resumed_from: int | None = None
    initial_params: int = 0

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics."""
        return self.metrics[-1] if self.metrics else {}


# -- building blocks ---------------------------------------------------------------------------


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    from torch.optim import lr_scheduler

    if cfg.lr_schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.lr_schedule == "step":
        return lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    return lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def _compression_config(cfg: TrainConfig) -> Any:
    """The compression config of a run: the gate, ``min_rank``, exclusions, the output layer's guard."""
    from .config import CompressionConfig

    return CompressionConfig(
        keep_bulk=cfg.keep_bulk,
        ks_max=cfg.ks_max,
        min_rank=cfg.min_rank,
        exclude=list(cfg.exclude),
        protect_last=cfg.keep_output_rank,
    )


def _make_pruner(cfg: TrainConfig, compression: Any, log: LogFn | None) -> RMTPruner | None:
    if not cfg.prune:
        return None
    return RMTPruner(
        every=cfg.prune_every,
        start=cfg.prune_start,
        keep_bulk=cfg.keep_bulk,
        decay_T=cfg.decay_T,
        config=compression,
        log=log,
    )


def evaluate(
    model: nn.Module, data: Any, device: str | torch.device = "cpu", batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a :class:`rmtprune.data.Dataset` (eval, no grad)."""
    from .data import batches

    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches(data, batch_size):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "loader": loader_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any], loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    loader_gen.set_state(state["loader"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints -------------------------------------------------------------------------------

#: Tests only: ``EPOCH:STAGE[:FRACTION]`` makes the process SIGKILL itself while it writes the
#: checkpoint of epoch EPOCH, at STAGE: ``write`` (after FRACTION of the bytes, default 0.5),
#: ``written`` (temporary file complete, nothing renamed), ``rotated`` (``checkpoint.prev.pt``
#: replaced, ``checkpoint.pt`` not yet) or ``saved`` (both renamed, tables not yet written).
_KILL_ENV = "_RMTPRUNE_TEST_KILL"
_KILL_STAGES = ("write", "written", "rotated", "saved")


def _kill_point(epoch: int) -> tuple[str, float] | None:
    """The (stage, fraction) at which the test hook kills this epoch's checkpoint write, if any."""
    spec = os.environ.get(_KILL_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if int(parts[0]) != epoch or parts[1] not in _KILL_STAGES:
            return None
        return parts[1], float(parts[2]) if len(parts) > 2 else 0.5
    except (IndexError, ValueError):
        return None


def _kill_here(point: tuple[str, float] | None, stage: str) -> None:
    if point is not None and point[0] == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_state(path: Path, state: dict[str, Any], point: tuple[str, float] | None) -> None:
    with open(path, "wb") as fh:
        if point is not None and point[0] == "write":
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            fh.write(data[: int(len(data) * min(max(point[1], 0.0), 1.0))])
            fh.flush()
            os.fsync(fh.fileno())
            _kill_here(point, "write")
        torch.save(state, fh)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a second name of ``src`` (a hard link), or a copy where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``out/checkpoint.pt`` atomically; the one it replaces becomes ``checkpoint.prev.pt``.

    Order: the new checkpoint is written and fsynced under a temporary name; then the current one
    is linked to a temporary name and renamed over ``checkpoint.prev.pt``; then the new one is
    renamed over ``checkpoint.pt``. At every instant ``checkpoint.pt`` is a complete checkpoint
    (the old one, then the new one) and ``checkpoint.prev.pt`` a complete earlier one, so a crash,
    SIGKILL or Ctrl-C anywhere loses at most the epoch being saved. Temporary folders of a killed
    writer are removed by the next write (see :mod:`rmtprune._atomic`).
    """
    latest, prev = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    point = _kill_point(int(state["epoch"]))
    try:
        with atomic_path(latest) as tmp:
            _write_state(tmp, state, point)
            _kill_here(point, "written")
            if latest.exists():
                with atomic_path(prev) as tmp_prev:
                    _link_or_copy(latest, tmp_prev)
            _kill_here(point, "rotated")
        _kill_here(point, "saved")
    except (OSError, RuntimeError) as exc:
        kept = latest if latest.exists() else prev
        note = f"; the last complete checkpoint {str(kept)!r} is kept" if kept.exists() else ""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RmtpruneError(f"could not write checkpoint {str(latest)!r}: {reason}{note}") from exc
    return latest


def _short(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (torch's messages run long)."""
    text = f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Bounds on what a checkpoint may hold: nesting depth (a real one has 6 levels), containers and
#: values in all (a real one has a few per parameter tensor and per epoch).
_MAX_DEPTH = 16
_MAX_NODES = 10_000_000
_SCALARS = (str, int, float, bool, type(None))
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _BadFieldError(Exception):
    """A checkpoint field that is not what a checkpoint holds (the message names it)."""


def _check_structure(obj: Any, max_bytes: int) -> None:
    """Walk everything ``torch.load`` returned without recursion: refuse a cycle, nesting deeper
    than ``_MAX_DEPTH``, more than ``_MAX_NODES`` values, any type but containers, scalars and
    dense CPU tensors, and a tensor claiming more bytes than the file holds (a zero-stride view).
    """
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    nodes = 0
    while stack:
        o, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(o))
            done.add(id(o))
            continue
        nodes += 1
        if nodes > _MAX_NODES:
            raise _BadFieldError(f"it holds more than {_MAX_NODES:,} values")
        if isinstance(o, _SCALARS):
            continue
        if isinstance(o, torch.Tensor):
            if o.layout != torch.strided or o.device.type != "cpu" or o.is_quantized:
                raise _BadFieldError(
                    f"it holds a {o.layout} tensor on {o.device.type} (only dense CPU tensors are saved)"
                )
            if o.numel() * o.element_size() > max_bytes:
                raise _BadFieldError(
                    f"a tensor of shape {tuple(o.shape)} claims more bytes than the file holds"
                )
            continue
        if not isinstance(o, (dict, list, tuple)):
            raise _BadFieldError(
                f"it holds a {type(o).__name__} (only containers, numbers, strings and tensors are saved)"
            )
        if id(o) in on_path:
            raise _BadFieldError("it holds a container that contains itself")
        if id(o) in done:
            continue
        if depth >= _MAX_DEPTH:
            raise _BadFieldError(f"it is nested deeper than {_MAX_DEPTH} levels")
        on_path.add(id(o))
        stack.append((o, depth, True))
        items = [v for kv in o.items() for v in kv] if isinstance(o, dict) else o
        stack.extend((v, depth + 1, False) for v in items)


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise _BadFieldError(what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_rows(rows: Any, name: str) -> None:
    """A list of flat dicts of scalars (a nested dict of scalars allowed one level down)."""
    _want(isinstance(rows, list), f"{name} is not a list")
    for i, row in enumerate(rows):
        _want(isinstance(row, dict) and all(isinstance(k, str) for k in row), f"{name}[{i}] is not a dict")
        for key, value in row.items():
            if isinstance(value, dict):
                for sub in value.values():
                    ok = isinstance(sub, _SCALARS) or (
                        isinstance(sub, (dict, list)) and all(isinstance(x, _SCALARS) for x in _values(sub))
                    )
                    _want(ok, f"{name}[{i}][{key!r}] holds something other than numbers and names")
            else:
                _want(isinstance(value, _SCALARS), f"{name}[{i}][{key!r}] is not a number or a name")


def _values(obj: dict | list) -> list[Any]:
    return list(obj.values()) if isinstance(obj, dict) else list(obj)


def _check_architecture(arch: Any) -> None:
    _want(isinstance(arch, dict), "architecture is not a dict")
    from .lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear

    kinds = {c.__name__ for c in (LowRankLinear, LowRankConv1d, LowRankConv2d)}
    for name, spec in arch.items():
        where = f"architecture[{name!r}]"
        _want(isinstance(name, str) and isinstance(spec, dict), f"{where} is not a layer spec")
        _want(spec.get("type") in kinds, f"{where} type={spec.get('type')!r} is not one of {sorted(kinds)}")
        _want(isinstance(spec.get("original_type"), str), f"{where} original_type is not a name")
        shape = spec.get("matrix_shape")
        _want(
            isinstance(shape, (list, tuple))
            and len(shape) == 2
            and all(_is_int(v) and v >= 1 for v in shape),
            f"{where} matrix_shape={shape!r} is not two positive ints",
        )
        wshape = spec.get("weight_shape")
        _want(
            isinstance(wshape, (list, tuple)) and all(_is_int(v) and v >= 1 for v in wshape),
            f"{where} weight_shape={wshape!r} is not positive ints",
        )
        rank = spec.get("rank")
        _want(
            _is_int(rank) and 1 <= rank <= min(shape),
            f"{where} rank={rank!r} must be an int in [1, min(m, n)={min(shape)}] "
            f"for matrix {shape[0]}x{shape[1]}",
        )
        _want(isinstance(spec.get("bias"), bool), f"{where} bias is not a bool")


def _check_rng(rng: Any) -> None:
    _want(isinstance(rng, dict), "rng is not a dict")
    size = torch.get_rng_state().numel()
    for key in ("torch", "loader"):
        t = rng.get(key)
        _want(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == (size,),
            f"rng[{key!r}] is not a generator state ({size} bytes)",
        )
    npst = rng.get("numpy")
    _want(isinstance(npst, dict), "rng['numpy'] is not a dict")
    keys = npst.get("keys")
    _want(npst.get("kind") == "MT19937", "rng['numpy'] kind is not MT19937")
    _want(
        isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and tuple(keys.shape) == (624,),
        "rng['numpy'] keys are not 624 int64 values",
    )
    _want(bool(((keys >= 0) & (keys < 2**32)).all()), "rng['numpy'] keys are not 32-bit values")
    _want(_is_int(npst.get("pos")) and 0 <= npst["pos"] <= 624, "rng['numpy'] pos is not in [0, 624]")
    _want(npst.get("has_gauss") in (0, 1), "rng['numpy'] has_gauss is not 0 or 1")
    _want(_is_num(npst.get("cached_gaussian")), "rng['numpy'] cached_gaussian is not a number")
    py = rng.get("python")
    _want(
        isinstance(py, (list, tuple))
        and len(py) == 3
        and py[0] == 3
        and isinstance(py[1], (list, tuple))
        and len(py[1]) == 625
        and all(_is_int(v) and 0 <= v < 2**32 for v in py[1])
        and (py[2] is None or _is_num(py[2])),
        "rng['python'] is not a Python random state",
    )
    cuda = rng.get("cuda", [])
    _want(
        isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda),
        "rng['cuda'] is not a list of generator states",
    )


def _check_optimizer_state(opt: Any) -> None:
    _want(isinstance(opt, dict), "optimizer is not a dict")
    groups, st = opt.get("param_groups"), opt.get("state")
    _want(
        isinstance(groups, list) and all(isinstance(g, dict) for g in groups),
        "optimizer param_groups is not a list",
    )
    _want(isinstance(st, dict), "optimizer state is not a dict")
    for i, g in enumerate(groups):
        for key, value in g.items():
            where = f"optimizer param_groups[{i}][{key!r}]"
            if key == "params":
                _want(
                    isinstance(value, list) and all(_is_int(v) for v in value),
                    f"{where} is not a list of ints",
                )
            elif isinstance(value, (list, tuple)):
                _want(all(_is_num(v) and math.isfinite(v) for v in value), f"{where} is not finite numbers")
            else:
                _want(isinstance(value, _SCALARS), f"{where} is not a number")
                _want(not _is_num(value) or math.isfinite(value), f"{where}={value!r} is not finite")
        lr = g.get("lr")
        _want(_is_num(lr) and lr >= 0, f"optimizer param_groups[{i}] lr={lr!r} is not a number >= 0")
    for key, entry in st.items():
        _want(
            _is_int(key) and isinstance(entry, dict), f"optimizer state[{key!r}] is not a parameter's state"
        )
        for name, value in entry.items():
            _want(
                isinstance(value, torch.Tensor) or _is_num(value),
                f"optimizer state[{key}][{name!r}] is not a tensor or a number",
            )


def _check_state(state: Any, max_bytes: int) -> None:
    """Everything about a checkpoint that does not need the model; raise :class:`_BadFieldError`."""
    _check_structure(state, max_bytes)
    _want(
        isinstance(state, dict) and state.get("format") == _FORMAT,
        "it is not an rmtprune training checkpoint",
    )
    _want(state.get("version") == _VERSION, f"checkpoint version {state.get('version')!r} is not {_VERSION}")
    missing = [
        k
        for k in ("epoch", "config", "architecture", "model", "optimizer", "scheduler", "rng")
        if k not in state
    ]
    _want(not missing, f"it lacks {', '.join(missing)}")
    _want(isinstance(state["config"], dict), "config is not a dict")
    try:
        cfg = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise _BadFieldError(f"it holds an invalid run configuration: {exc}") from None
    epoch = state["epoch"]
    _want(_is_int(epoch) and 1 <= epoch <= cfg.epochs, f"epoch={epoch!r} is not in [1, epochs={cfg.epochs}]")
    _want(state.get("data_dir") is None or isinstance(state["data_dir"], str), "data_dir is not a path")
    _check_architecture(state["architecture"])
    sd = state["model"]
    _want(isinstance(sd, dict) and bool(sd), "model is not a state dict")
    for key, t in sd.items():
        _want(isinstance(key, str) and isinstance(t, torch.Tensor), f"model[{key!r}] is not a named tensor")
        _want(t.dtype in _FLOAT_DTYPES, f"model[{key!r}] has dtype {t.dtype}, not a float type")
    _check_optimizer_state(state["optimizer"])
    sched = state["scheduler"]
    _want(isinstance(sched, dict) and all(isinstance(k, str) for k in sched), "scheduler is not a dict")
    _check_rng(state["rng"])
    metrics = state.get("metrics", [])
    _check_rows(metrics, "metrics")
    _want(len(metrics) == epoch, f"metrics has {len(metrics)} rows for {epoch} epochs")
    for i, row in enumerate(metrics):
        _want(row.get("epoch") == i + 1, f"metrics[{i}] epoch={row.get('epoch')!r} is not {i + 1}")
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "params"):
            _want(_is_num(row.get(key)), f"metrics[{i}][{key!r}]={row.get(key)!r} is not a number")
        _want(isinstance(row.get("layers", {}), dict), f"metrics[{i}]['layers'] is not a dict")
    pruner = state.get("pruner", {})
    _want(isinstance(pruner, dict), "pruner is not a dict")
    for key in ("history", "events"):
        _check_rows(pruner.get(key, []), f"pruner[{key!r}]")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint (no code runs: ``weights_only``); every problem is a one-line
    :class:`CheckpointError` naming the file and the field."""
    try:
        size = path.stat().st_size
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} does not exist") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint ({_short(exc)})") from exc
    try:
        _check_state(state, size)
    except _BadFieldError as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid rmtprune training checkpoint: {exc}") from None
    except RecursionError:  # pragma: no cover - the walk above has no recursion; belt and braces
        raise CheckpointError(f"{str(path)!r} is nested too deeply to be a checkpoint") from None
    return state


def load_checkpoint(out: str | os.PathLike[str], log: LogFn | None = None) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint of the run in directory ``out``, and its path.

    If ``checkpoint.pt`` is damaged (a truncated write, a full disk, a bad copy) it is moved aside to
    ``checkpoint.corrupt.pt`` and ``checkpoint.prev.pt`` is used, saying so through ``log``.
    Raises :class:`CheckpointError` naming both files when neither can be used.
    """
    out = Path(out).expanduser()
    latest, prev = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    if not latest.exists() and not prev.exists():
        raise CheckpointError(
            f"no checkpoint to resume in {str(out)!r} (looked for {CHECKPOINT}, {PREVIOUS_CHECKPOINT})"
        )
    problems = []
    try:
        return _read_checkpoint(latest), latest
    except CheckpointError as exc:
        problems.append(str(exc))
    try:
        state = _read_checkpoint(prev)
    except CheckpointError as exc:
        problems.append(str(exc))
        raise CheckpointError("cannot resume: " + "; ".join(problems)) from None
    if latest.exists():
        os.replace(latest, out / _CORRUPT)
        problems[0] += f" (moved to {_CORRUPT})"
    if log is not None:
        log(
            f"warning: {problems[0]}; resuming from the previous checkpoint {str(prev)!r} "
            f"(epoch {state['epoch']})"
        )
    return state, prev


# -- output files ------------------------------------------------------------------------------


def _write_outputs(out: Path, write: Callable[[], Any]) -> None:
    """Run ``write``; turn a failed write (full disk, permissions) into one clear error."""
    try:
        write()
    except OSError as exc:
        kept = out / CHECKPOINT
        note = f"; the last complete checkpoint {str(kept)!r} is kept" if kept.exists() else ""
        raise RmtpruneError(f"could not write to {str(out)!r}: {exc.strerror or exc}{note}") from exc


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k != "layers"}
    for layer, stats in row.get("layers", {}).items():
        for key, value in stats.items():
            flat[f"{key}[{layer}]"] = value
    return flat


def _csv_text(rows: list[dict[str, Any]]) -> str:
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _write_tables(out: Path, metrics: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=_json_default) + "\n")
    atomic_write_text(out / "metrics.csv", _csv_text([_flatten(r) for r in metrics]))
    rows = [{k: v for k, v in d.items() if not isinstance(v, (dict, list))} for d in decisions]
    atomic_write_text(out / "decisions.json", json.dumps(rows, indent=1, default=_json_default) + "\n")
    atomic_write_text(out / "decisions.csv", _csv_text(rows))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _write_plots(out: Path, metrics: list[dict[str, Any]]) -> list[Path]:
    """accuracy.png, params.png and ranks.png (rank per layer) against the epoch, written atomically.

    Drawn on the Agg canvas directly (no ``pyplot``), so a caller's matplotlib set-up is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .plotting import PNG_METADATA

    epochs = [r["epoch"] for r in metrics]
    written = []

    def new() -> tuple[Any, Any]:
        fig = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    def save(fig: Any, name: str) -> None:
        with atomic_path(out / name, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png", metadata=PNG_METADATA)
        written.append(out / name)

    fig, ax = new()
    ax.plot(epochs, [100 * r["train_acc"] for r in metrics], "o-", label="train")
    ax.plot(epochs, [100 * r["test_acc"] for r in metrics], "s-", label="test")
    for r in metrics:
        if r.get("pruned"):
            ax.axvline(r["epoch"], color="grey", lw=0.6, ls=":")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (dotted: pruning epochs)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "accuracy.png")

    fig, ax = new()
    ax.plot(epochs, [r["params"] for r in metrics], "o-")
    ax.set(xlabel="epoch", ylabel="parameters", title="Parameter count")
    ax.grid(alpha=0.3)
    save(fig, "params.png")

    fig, ax = new()
    layers: list[str] = []
    for r in metrics:
        layers.extend(name for name in r.get("layers", {}) if name not in layers)
    for name in layers:
        ys = [r.get("layers", {}).get(name, {}).get("rank") for r in metrics]
        ax.plot(epochs, [float("nan") if y is None else y for y in ys], "o-", label=name)
    ax.set(xlabel="epoch", ylabel="rank", title="Rank per layer")
    if layers:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    save(fig, "ranks.png")
    return written


# -- building the model: sizes checked on the meta device first ---------------------------------


def _meta_model(cfg: TrainConfig, input_shape: Any, num_classes: int) -> nn.Module:
    """``cfg.model`` built on the meta device: shapes only, no memory, no random numbers drawn."""
    from .models import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg.model, input_shape, num_classes)
    except (RuntimeError, OverflowError, MemoryError) as exc:
        raise RmtpruneError(f"model={cfg.model!r} cannot be built: {_short(exc)}") from None


def _memory_bytes(device: str) -> int | None:
    """Total memory of the device (RAM for the CPU), or None when unknown."""
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
        if dev.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def _check_model_size(cfg: TrainConfig, model: nn.Module) -> int:
    """Refuse a model whose training state (weights, gradients, optimizer moments) cannot fit the
    device's memory, before a byte of it is allocated; return its parameter count."""
    n = sum(p.numel() for p in model.parameters())
    copies = 4 if cfg.optimizer == "adamw" else 3
    need = n * 4 * copies
    have = _memory_bytes(cfg.device)
    if have is not None and need > have:
        raise RmtpruneError(
            f"model={cfg.model!r} has {n:,} parameters: training it needs about {need / 2**30:,.1f} GiB "
            f"(weights, gradients, optimizer state), more than the {have / 2**30:,.1f} GiB of device "
            f"{cfg.device!r}; choose a smaller model"
        )
    return n


def _resumed_model(
    cfg: TrainConfig, state: dict[str, Any], path: Path, input_shape: Any, num_classes: int
) -> tuple[nn.Module, int]:
    """The checkpoint's (pruned) model, checked against ``cfg.model`` on the meta device first.

    Every recorded factored layer must name a layer of the model with the recorded matrix shape
    and a rank within ``min(m, n)``, and every tensor of the checkpoint must have exactly the
    shape of the model's; only then is memory allocated, and only for the pruned model. Returns
    the model and the parameter count of the model as first built (before any cut).
    """
    meta = _meta_model(cfg, input_shape, num_classes)
    initial = sum(p.numel() for p in meta.parameters())

    where = f"{str(path)!r} does not fit model {cfg.model!r} on {cfg.dataset}"
    try:
        restructure(meta, state["architecture"])
    except (CheckpointError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{where}: {_short(exc) if not isinstance(exc, RmtpruneError) else exc}"
        ) from None
    expected = meta.state_dict()
    got = state["model"]
    for key, t in expected.items():
        if key not in got:
            raise CheckpointError(
                f"{where}: tensor {key!r} ({tuple(t.shape)}) is missing from the checkpoint"
            )
        if tuple(got[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} is {tuple(got[key].shape)} in the checkpoint, "
                f"{tuple(t.shape)} in the model"
            )
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: the checkpoint has tensor {extra[0]!r}, which the model has not")
    saved = {k for k, _ in meta.named_parameters()} | {k for k, _ in meta.named_buffers()}
    if saved != set(expected):  # a non-persistent buffer the state dict would not fill: build for real
        from .models import build_model

        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg.model, input_shape, num_classes)
        restructure(model, state["architecture"])
    else:
        model = meta.to_empty(device="cpu")
    try:
        model.load_state_dict(got)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: {_short(exc)}") from None
    return model.to(cfg.device), initial


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: str) -> None:
    """The saved optimizer state has the groups of ``optimizer`` and per-parameter tensors of the
    parameters' shapes (torch would broadcast a wrong-shaped momentum silently or fail mid-epoch)."""
    fresh = optimizer.state_dict()
    groups = saved["param_groups"]
    if len(groups) != len(fresh["param_groups"]):
        raise CheckpointError(
            f"{where}: {len(groups)} optimizer parameter group(s), the model has {len(fresh['param_groups'])}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, (g, f) in enumerate(zip(groups, fresh["param_groups"], strict=True)):
        if g["params"] != f["params"]:
            raise CheckpointError(
                f"{where}: optimizer group {i} lists parameters {g['params'][:8]}, "
                f"the model {f['params'][:8]}"
            )
    for key, entry in saved["state"].items():
        if not 0 <= key < len(params):
            raise CheckpointError(
                f"{where}: optimizer state names parameter {key}, the model has {len(params)}"
            )
        shape = tuple(params[key].shape)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{where}: optimizer state {name!r} of parameter {key} is {tuple(value.shape)}, "
                    f"the parameter {shape}"
                )
            if isinstance(value, torch.Tensor) and not value.ndim == 0 and value.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{where}: optimizer state {name!r} of parameter {key} has dtype {value.dtype}"
                )


def _check_scheduler_fits(scheduler: Any, saved: dict[str, Any], where: str) -> None:
    """The saved scheduler state sets only the attributes a fresh one has, with values of the same kind
    (``load_state_dict`` copies every key into the scheduler's ``__dict__``)."""
    fresh = scheduler.state_dict()
    for key, value in saved.items():
        if key not in fresh:
            raise CheckpointError(f"{where}: scheduler state has unknown field {key!r}")
        ref = fresh[key]
        if isinstance(ref, list):
            ok = (
                isinstance(value, list)
                and len(value) == len(ref)
                and all(
                    (v is None and r is None) or (_is_num(v) and _is_num(r) and math.isfinite(v))
                    for v, r in zip(value, ref, strict=True)
                )
            )
        elif isinstance(ref, bool):
            ok = isinstance(value, bool)
        elif _is_num(ref):
            ok = _is_num(value) and math.isfinite(value) and (not _is_int(ref) or _is_int(value))
        else:
            ok = type(value) is type(ref)
        if not ok:
            raise CheckpointError(
                f"{where}: scheduler state {key}={value!r} does not fit ({type(ref).__name__} expected)"
            )


# -- the run -----------------------------------------------------------------------------------


def _resolve_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    base = config.to_dict() if config is not None else TrainConfig().to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise TypeError(
            f"train() got unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(base))}"
        )
    base.update(overrides)
    return TrainConfig.from_dict(base)


def _resume_config(
    stored: TrainConfig, config: TrainConfig | None, overrides: dict[str, Any], done: int
) -> TrainConfig:
    """The stored config, with the few changes a resume allows (more epochs, another device)."""
    asked = (config.to_dict() if config is not None else stored.to_dict()) | overrides
    merged = stored.to_dict()
    for key, value in asked.items():
        if key not in merged:
            raise TypeError(f"train() got unknown option {key!r}")
        if value == merged[key]:
            continue
        if key not in _RESUME_MAY_CHANGE:
            raise RmtpruneError(
                f"{key}={value!r} differs from the run being resumed ({key}={merged[key]!r}); a resumed run "
                f"continues its stored configuration (only {', '.join(_RESUME_MAY_CHANGE)} may change)"
            )
        merged[key] = value
    cfg = TrainConfig.from_dict(merged)
    if cfg.epochs != stored.epochs and cfg.lr_schedule == "cosine":
        raise RmtpruneError(
            f"epochs={cfg.epochs} differs from the run being resumed (epochs={stored.epochs}) and its cosine "
            "learning-rate schedule is fixed to that length"
        )
    if cfg.epochs < done:
        raise RmtpruneError(
            f"epochs={cfg.epochs} is fewer than the {done} epochs the checkpoint already holds"
        )
    return cfg


def writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create directory ``path`` if needed and prove it writable with a real write, or raise.

    Raises :class:`RmtpruneError` with the path and the system's reason (``os.access`` is not
    enough: it says yes to root on a read-only file system).
    """
    out_dir = Path(path).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RmtpruneError(
            f"cannot create output directory {str(out_dir)!r}: {exc.strerror or exc}"
        ) from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RmtpruneError(
            f"output directory {str(out_dir)!r} is not writable: {exc.strerror or exc}"
        ) from exc
    return out_dir


def _remove_empty_run(out_dir: Path, created: bool) -> None:
    """After a fresh run failed before its first checkpoint: remove the directory it created, if
    nothing is in it (a directory that was there before is left alone)."""
    if created:
        with contextlib.suppress(OSError):
            out_dir.rmdir()


#: The files a run writes in its output directory (besides the checkpoints).
RUN_FILES = (
    "config.json",
    "metrics.csv",
    "metrics.json",
    "decisions.csv",
    "decisions.json",
    "accuracy.png",
    "params.png",
    "ranks.png",
    "model.safetensors",
    "model.json",
)


def _check_fresh_out(out: str | os.PathLike[str], force: bool) -> None:
    """A fresh run never writes over files already in ``out`` (another run's, or the user's)
    unless ``force``; checked before any work, so nothing is built, trained or written."""
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise RmtpruneError(f"output directory {str(out_dir)!r} exists and is not a directory")
    if not out_dir.is_dir():
        return
    if (out_dir / CHECKPOINT).exists() or (out_dir / PREVIOUS_CHECKPOINT).exists():
        raise RmtpruneError(
            f"output directory {str(out_dir)!r} already holds a run ({CHECKPOINT}); pass resume=True "
            "(--resume) to continue it, or choose another output directory"
        )
    clash = [n for n in RUN_FILES if (out_dir / n).exists()]
    if clash and not force:
        raise RmtpruneError(
            f"output directory {str(out_dir)!r} already has {', '.join(clash[:3])}"
            + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
            + " that this run would overwrite; choose another directory, or pass force=True (--force)"
        )


def _prepare_out(out: str | os.PathLike[str], resume: bool, force: bool = False) -> Path:
    if not resume:
        _check_fresh_out(out, force)
    return writable_dir(out)


def _check_names(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` listing the valid names for an unknown dataset or model family."""
    from .data import DATASETS
    from .models import parse_spec

    key = cfg.dataset.strip().lower().replace("_", "-")
    if key not in DATASETS and key.replace("-", "") not in ("fashion", "fmnist", "fashionmnist"):
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    parse_spec(cfg.model)
    _check_device(cfg.device)


def _check_device(device: str) -> None:
    """Raise ``ValueError`` for a device string torch does not know, one that holds no data
    (``meta``) or a device that is not there, before anything is built or written."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({_short(exc)})") from None
    if dev.type == "meta":
        raise ValueError(
            f"device={device!r} holds no data (shapes only), so nothing can be trained on it; "
            "use device='cpu' or a GPU"
        )
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(
            f"device={device!r} is not supported for training; use one of {', '.join(_DEVICE_TYPES)}"
        )
    available = {
        "cuda": lambda: torch.cuda.is_available(),
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if dev.type in available and not available[dev.type]():
        raise ValueError(
            f"device={device!r} asked for but {dev.type.upper()} is not available; use device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} asked for but there are only {torch.cuda.device_count()} CUDA device(s)"
        )


def _load_data(cfg: TrainConfig, data_dir: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    from .data import load_dataset

    train_ds = load_dataset(cfg.dataset, "train", data_dir=data_dir)
    test_ds = load_dataset(cfg.dataset, "test", data_dir=data_dir)
    for name, ds in (("train_subset", train_ds), ("test_subset", test_ds)):
        n = getattr(cfg, name)
        if n is not None:
            if n > len(ds):
                raise ValueError(
                    f"{name}={n} is larger than the {len(ds)} samples of {cfg.dataset} {ds.split}"
                )
            if ds is train_ds:
                train_ds = ds.subset(n)
            else:
                test_ds = ds.subset(n)
    return train_ds, test_ds


def _format_epoch(row: dict[str, Any], epochs: int) -> str:
    line = (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} "
        f"acc {100 * row['test_acc']:.2f}%  "
        f"params {row['params']:,}  ({row['seconds_train']:.1f} s"
    )
    if row["pruned"]:
        line += f", pruned f={row['f']:.3f} in {row['seconds_prune']:.2f} s"
        if row.get("test_acc_before_prune") is not None:
            line += f", test acc before the cut {100 * row['test_acc_before_prune']:.2f}%"
    return line + ")"


def train(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    log: LogFn | None = None,
    progress_bar: bool | None = False,
    batch_callback: Callable[[int, int], None] | None = None,
    force: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Train a model on a dataset, pruning it with :class:`RMTPruner` on the way; return the result.

    Parameters
    ----------
    config : a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``train(epochs=3)``).
    out : output directory (created): ``config.json``, ``metrics.csv``/``.json`` (one row per
        epoch: losses, accuracies, parameter count, per-layer rank, sigma2, n_spikes, n_bulk, ks),
        ``decisions.csv``/``.json`` (one row per layer per cut), ``accuracy.png``, ``params.png``,
        ``ranks.png``, ``model.safetensors`` (+ manifest, for :func:`rmtprune.load`) and a checkpoint
        after every epoch (``checkpoint.pt``, the one before kept as ``checkpoint.prev.pt``). Every
        file is written atomically. ``None``: nothing is written and ``resume`` is impossible.
    resume : continue the run in ``out`` from its last complete checkpoint: the pruned architecture,
        weights, optimizer and scheduler state and every random number generator are restored, so
        the run ends with the same metrics as one that was never interrupted. The stored
        configuration is used; only ``epochs``, ``device`` and ``track_spectra`` may change.
    data_dir : where the dataset files are (see :func:`rmtprune.data.load_dataset`); a resumed run
        uses the one it was started with unless given another.
    log : called with one line per epoch and per pruning decision (``print`` for a console).
    progress_bar : a progress bar over the batches (``None``: only on a terminal).
    batch_callback : called as ``batch_callback(epoch, batch_index)`` before every batch (tests use
        it to interrupt a run; a ``KeyboardInterrupt`` there leaves the last checkpoint valid).
    force : a fresh run into a directory that already has files of the names it writes
        (:data:`RUN_FILES`: another run's, or yours) overwrites them; without it that is refused
        before any work.

    Returns
    -------
    TrainResult
    """
    t_run = time.perf_counter()
    state = None
    if not resume:
        cfg = _resolve_config(config, overrides)
        _check_names(cfg)  # before anything is written
        if out is not None:
            _check_fresh_out(out, force)
    out_dir = None
    created = False
    if resume:
        if out is None:
            raise ValueError("resume=True needs out= (the directory of the run to continue)")
        out_dir = _prepare_out(out, resume=True)
        state, ckpt_path = load_checkpoint(out_dir, log)
        stored = TrainConfig.from_dict(state["config"])  # checked by load_checkpoint
        cfg = _resume_config(stored, config, overrides, int(state["epoch"]))
        _check_device(cfg.device)
        if data_dir is None:
            data_dir = state.get("data_dir")

    from .data import FastLoader, seed_everything
    from .models import build_model

    loader_gen = seed_everything(cfg.seed)
    train_ds, test_ds = _load_data(cfg, data_dir)
    if state is not None:
        # Checked against the spec on the meta device before anything is allocated; the random
        # number generators are restored below, so skipping the dense build changes nothing.
        model, initial_params = _resumed_model(
            cfg, state, ckpt_path, train_ds.input_shape, train_ds.num_classes
        )
    else:
        _check_model_size(cfg, _meta_model(cfg, train_ds.input_shape, train_ds.num_classes))
        model = build_model(cfg.model, train_ds.input_shape, train_ds.num_classes).to(cfg.device)
        initial_params = sum(p.numel() for p in model.parameters())
    if out is not None and out_dir is None:  # a fresh run: data and model are fine, now the directory
        created = not Path(out).expanduser().exists()
        out_dir = _prepare_out(out, resume=False, force=force)
    compression = _compression_config(cfg)
    pruner = _make_pruner(cfg, compression, log)
    metrics: list[dict[str, Any]] = []
    done = 0
    optimizer = _make_optimizer(cfg, model)
    scheduler = _make_scheduler(cfg, optimizer)
    if state is not None:
        where = f"{str(ckpt_path)!r} has an optimizer or scheduler state that does not fit"
        _check_optimizer_fits(optimizer, state["optimizer"], where)
        _check_scheduler_fits(scheduler, state["scheduler"], where)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], loader_gen)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"{str(ckpt_path)!r} has an optimizer or RNG state that does not fit: {_short(exc)}"
            ) from exc
        if pruner is not None:
            pruner.load_state_dict(state.get("pruner", {}))
        metrics = [dict(r) for r in state.get("metrics", [])]
        done = int(state["epoch"])
        if log is not None:
            left = "nothing left to train" if done >= cfg.epochs else f"{cfg.epochs - done} epoch(s) to go"
            log(f"resuming {str(out_dir)!r} after epoch {done} of {cfg.epochs} from {ckpt_path.name}: {left}")
    elif pruner is not None and pruner.should_prune(0):
        pruner.prune(model, 0, optimizer)

    # A fresh run writes config.json with its first checkpoint, so a run that fails before
    # completing an epoch (divergence, Ctrl-C, a bad option found late) leaves nothing behind.
    config_written = False
    if out_dir is not None and state is not None:
        atomic_write_text(out_dir / "config.json", cfg.to_json() + "\n")
        config_written = True
    loader = FastLoader(train_ds, cfg.batch_size, shuffle=True, generator=loader_gen, device=cfg.device)
    test_ds = test_ds.to(cfg.device)
    timings = {"train": 0.0, "prune": 0.0, "eval": 0.0, "spectra": 0.0, "io": 0.0}
    epoch = done
    try:
        for epoch in range(done + 1, cfg.epochs + 1):
            row = _run_epoch(
                cfg,
                model,
                optimizer,
                scheduler,
                loader,
                test_ds,
                pruner,
                epoch,
                progress_bar,
                batch_callback,
                compression,
            )
            for key in timings:
                if key != "io":
                    timings[key] += row[f"seconds_{key}"]
            metrics.append(row)
            if log is not None:
                log(_format_epoch(row, cfg.epochs))
            if out_dir is not None:
                t0 = time.perf_counter()
                _save_checkpoint(
                    out_dir,
                    {
                        "format": _FORMAT,
                        "version": _VERSION,
                        "epoch": epoch,
                        "config": cfg.to_dict(),
                        "data_dir": None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
                        "architecture": factored_layers(model),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(loader_gen),
                        "metrics": metrics,
                        "pruner": pruner.state_dict() if pruner is not None else {},
                    },
                )
                if not config_written:
                    atomic_write_text(out_dir / "config.json", cfg.to_json() + "\n")
                    config_written = True
                _write_outputs(
                    out_dir, lambda: _write_tables(out_dir, metrics, pruner.history_ if pruner else [])
                )
                timings["io"] += time.perf_counter() - t0
    except BaseException as exc:
        if out_dir is not None and state is None and not config_written:
            _remove_empty_run(out_dir, created)
        if isinstance(exc, KeyboardInterrupt) and log is not None and out_dir is not None:
            where = (
                f"the last complete checkpoint is {str(out_dir / CHECKPOINT)!r} (epoch {epoch - 1})"
                if epoch - 1 > 0
                else "no epoch was completed"
            )
            log(f"interrupted during epoch {epoch}; {where}")
        raise

    if out_dir is not None:
        t0 = time.perf_counter()
        if epoch == done:
            # Nothing left to train: a run killed between its last checkpoint and its tables
            # gets them written from the checkpoint now.
            _write_outputs(
                out_dir, lambda: _write_tables(out_dir, metrics, pruner.history_ if pruner else [])
            )
        _write_outputs(out_dir, lambda: _write_plots(out_dir, metrics))
        _write_outputs(out_dir, lambda: _save_model(model, out_dir / "model.safetensors", cfg, train_ds))
        timings["io"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_run
    return TrainResult(
        model=model,
        config=cfg,
        metrics=metrics,
        decisions=pruner.history_ if pruner is not None else [],
        timings=timings,
        out=out_dir,
        resumed_from=done if state is not None else None,
        initial_params=initial_params,
    )


def _run_epoch(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Any,
    test_ds: Any,
    pruner: RMTPruner | None,
    epoch: int,
    progress_bar: bool | None,
    batch_callback: Callable[[int, int], None] | None,
    compression: Any = None,
) -> dict[str, Any]:
    """One epoch: train, step the schedule, cut if due, evaluate, fit spectra; return its metrics row."""
    t0 = time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])
    model.train()
    loss_sum, correct, n = 0.0, 0, 0
    regularise = cfg.l1 > 0 or cfg.l2 > 0
    steps = len(loader)
    for i, (x, y) in enumerate(
        progress(loader, total=steps, desc=f"epoch {epoch}/{cfg.epochs}", enable=progress_bar)
    ):
        if batch_callback is not None:
            batch_callback(epoch, i)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        total = loss + regularization(model, cfg.l1, cfg.l2) if regularise else loss
        value = float(total.detach())
        if not math.isfinite(value):
            # Before the step: the weights stay as they were, and no checkpoint of this epoch is written.
            raise DivergedError(
                f"training diverged in epoch {epoch}, step {i + 1} of {steps}: the loss is {value}; "
                f"lower the learning rate (--lr, now {cfg.lr:g}); nothing of epoch {epoch} was saved"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer_step(optimizer, f"training diverged in epoch {epoch}, step {i + 1} of {steps}", cfg.lr)
        with torch.no_grad():
            loss_sum += float(loss) * int(y.numel())
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
    scheduler.step()
    t_train = time.perf_counter() - t0

    pruned = pruner is not None and pruner.should_prune(epoch)
    t_eval = t_prune = 0.0
    acc_before = None
    layers: dict[str, dict[str, Any]] = {}
    if pruned:
        if cfg.eval_before_prune:
            t0 = time.perf_counter()
            _, acc_before = evaluate(model, test_ds, cfg.device)
            t_eval += time.perf_counter() - t0
        t0 = time.perf_counter()
        pruner.prune(model, epoch, optimizer)
        t_prune = time.perf_counter() - t0
        layers = {r["layer"]: _layer_columns(r) for r in pruner.history_ if r["epoch"] == epoch}
    t0 = time.perf_counter()
    test_loss, test_acc = evaluate(model, test_ds, cfg.device)
    t_eval += time.perf_counter() - t0
    t0 = time.perf_counter()
    if not pruned:
        layers = _layer_stats(model, compression, fits=cfg.track_spectra)
    t_spectra = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": loss_sum / max(n, 1),
        "train_acc": correct / max(n, 1),
        "test_loss": test_loss,
        "test_acc": test_acc,
        "params": sum(p.numel() for p in model.parameters()),
        "pruned": pruned,
        "f": pruner.fraction(epoch) if pruned else None,
        "test_acc_before_prune": acc_before,
        "seconds_train": t_train,
        "seconds_prune": t_prune,
        "seconds_eval": t_eval,
        "seconds_spectra": t_spectra,
        "layers": layers,
    }


# -- the parts that depend on the low-rank layers ---------------------------------------------


def _save_model(model: nn.Module, path: Path, cfg: TrainConfig, data: Any) -> None:
    """The final model as safetensors + manifest; ``rmtprune.load(path)`` rebuilds it from the spec."""
    from .io import save

    save(
        model,
        path,
        factory=cfg.model,
        factory_args={"input_shape": list(data.input_shape), "num_classes": int(data.num_classes)},
    )


def _report_rows(report: Any) -> list[dict[str, Any]]:
    """One flat dict per layer of a compression report (:class:`rmtprune.Plan`)."""
    rows = []
    for lp in report:
        fit = lp.fit or {}
        rows.append(
            {
                "layer": lp.name,
                "action": lp.action,
                "rank_before": lp.rank_before,
                "rank_after": lp.rank,
                "n_spikes": fit.get("n_spikes"),
                "n_bulk": fit.get("n_bulk"),
                "sigma2": fit.get("sigma2"),
                "ks": fit.get("ks"),
                "params_before": lp.params_before,
                "params_after": lp.params_after,
                "reason": lp.reason,
            }
        )
    return rows


def _layer_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The per-layer metrics columns from a decision row (the rank is the one after the cut)."""
    return {
        "rank": row.get("rank_after"),
        "sigma2": row.get("sigma2"),
        "n_spikes": row.get("n_spikes"),
        "n_bulk": row.get("n_bulk"),
        "ks": row.get("ks"),
    }


def _layer_stats(model: nn.Module, compression: Any, fits: bool = True) -> dict[str, dict[str, Any]]:
    """Per prunable layer: current rank and, with ``fits``, the BEMA fit (sigma2, n_spikes, n_bulk, ks)."""
    from .surgery import handler_for, plan

    if fits:
        report = plan(model, compression)
        return {
            row["layer"]: {**_layer_columns(row), "rank": row["rank_before"]}
            for row in _report_rows(report)
            if row["action"] != "skip"
        }
    out = {}
    for name, mod in model.named_modules():
        h = handler_for(mod)
        if h is not None and not h.unsupported(mod) and not any(name.startswith(k + ".") for k in out):
            out[name] = {
                "rank": h.current_rank(mod),
                "sigma2": None,
                "n_spikes": None,
                "n_bulk": None,
                "ks": None,
            }
    return out
