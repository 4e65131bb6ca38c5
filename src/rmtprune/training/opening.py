"""Opening a run: its configuration, output directory, checkpoint, data and model, all checked.

:func:`preflight` makes every check :func:`rmtprune.train` makes before training without building
or writing anything (``rmtprune train --nproc N`` runs it once before starting the ranks);
:func:`_open` does the same and builds the :class:`_Run` the trainer loops over.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RmtpruneError
from .config import TrainConfig, flat_overrides, flatten, unflatten
from .pruner import LogFn, RMTPruner
from .resume import _resume_config, _resumed_model, load_checkpoint, stored_config
from .run_files import _check_fresh_out, _prepare_out
from .setup import _check_device, _check_model_size, _check_names, _load_data, _meta_model

__all__ = ["preflight"]


#: The parts of a run's time (``TrainResult.timings``; every one but ``io`` is a ``seconds_*`` column).
_TIMINGS = ("train", "prune", "eval", "spectra", "stability", "io")


@dataclass
class _Run:
    """Everything a run carries from one epoch to the next."""

    cfg: TrainConfig
    model: nn.Module
    train_ds: Any
    val_ds: Any  # None when the run has no validation split (val_size=0)
    test_ds: Any
    loader_gen: torch.Generator
    initial_params: int
    out_dir: Path | None = None
    data_dir: str | os.PathLike[str] | None = None
    created: bool = False
    state: dict[str, Any] | None = None  # the checkpoint resumed from
    ckpt_path: Path | None = None  # and its file
    log: LogFn | None = None
    progress_bar: bool | None = False
    batch_callback: Callable[[int, int], None] | None = None
    pruner: RMTPruner | None = None
    stability: Any = None  # a StabilityTracker (None: track_stability off)
    rank: int = 0  # this process's rank and the number of ranks (torch.distributed; 1: none)
    world: int = 1
    ddp: Any = None  # the DistributedDataParallel wrapper the steps train through (world > 1)
    shards: dict[str, Any] = field(default_factory=dict)  # this rank's share of each evaluated split
    scaler: Any = None  # the GradScaler of amp="fp16"
    optimizer: Any = None
    scheduler: Any = None
    loader: Any = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    config_written: bool = False
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_TIMINGS, 0.0))

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return self.pruner.history_ if self.pruner is not None else []


def _resolve_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    base = flatten(config.to_dict() if config is not None else TrainConfig().to_dict())
    flat = flat_overrides(overrides)
    unknown = sorted(set(flat) - set(base))
    if unknown:
        raise TypeError(
            f"train() got unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(base))}"
        )
    base.update(flat)
    return TrainConfig.from_dict(unflatten(base))


def _settle(
    config: TrainConfig | None,
    overrides: dict[str, Any],
    out: str | os.PathLike[str] | None,
    resume: bool,
    force: bool,
    data_dir: str | os.PathLike[str] | None,
    log: LogFn | None,
    write: bool = True,
) -> tuple[TrainConfig, Any, Any, Path | None, Any]:
    """The run's config and, resuming, its checkpoint, every check made; ``(cfg, state, checkpoint
    path, out_dir, data_dir)``. ``write=False`` (a rank other than 0, the launcher's preflight)
    never creates or probes the output directory."""
    state = ckpt_path = out_dir = None
    if not resume:
        cfg = _resolve_config(config, overrides)
        _check_names(cfg)  # before anything is written
        if out is not None:
            _check_fresh_out(out, force)
            if not write:
                _check_creatable(out)
        return cfg, state, ckpt_path, out_dir, data_dir
    if out is None:
        raise ValueError("resume=True needs out= (the directory of the run to continue)")
    out_dir = _prepare_out(out, resume=True) if write else Path(out).expanduser()
    state, ckpt_path = load_checkpoint(out_dir, log, move=write)
    # Checked by load_checkpoint; a config saved before val_size existed resumes with val_size=0
    # (the whole training file it was trained on), not the default 5,000-image hold-out.
    stored, unrecorded = stored_config(state["config"])
    cfg = _resume_config(stored, config, overrides, int(state["epoch"]), unrecorded)
    if unrecorded and log is not None:
        filled = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in unrecorded)
        log(
            f"note: the run's stored configuration has no {', '.join(unrecorded)} (an earlier "
            f"release); resuming with {filled}, as it was trained"
        )
    _check_device(cfg.device)
    if data_dir is None:
        data_dir = state.get("data_dir")
    return cfg, state, ckpt_path, out_dir, data_dir


def _check_creatable(out: str | os.PathLike[str]) -> None:
    """Raise unless directory ``out`` exists or could be created (its nearest existing ancestor is a
    writable directory), without creating anything."""
    path = Path(out).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "not a directory" if not probe.is_dir() else "not writable"
        raise RmtpruneError(f"cannot create output directory {str(path)!r}: {str(probe)!r} is {why}")


def preflight(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    force: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> None:
    """Every check :func:`train` makes before training (options, output directory, checkpoint and
    its stored options, data, model spec and size), without building a model or writing a file:
    ``rmtprune train --nproc N`` runs it once before it starts the ranks."""
    cfg, state, _, _, data_dir = _settle(config, overrides, out, resume, force, data_dir, None, write=False)
    train_ds, _, _ = _load_data(cfg, data_dir)
    if state is None:
        _check_model_size(cfg, _meta_model(cfg, train_ds.input_shape, train_ds.num_classes))


def _open(
    config: TrainConfig | None,
    overrides: dict[str, Any],
    out: str | os.PathLike[str] | None,
    resume: bool,
    force: bool,
    data_dir: str | os.PathLike[str] | None,
    log: LogFn | None,
    rank: int = 0,
) -> _Run:
    """Check the config, the output directory and (resuming) the checkpoint; build data and model.
    Only rank 0 creates (or probes) the output directory."""
    from ..zoo.data import seed_everything
    from ..zoo.models import build_model

    cfg, state, ckpt_path, out_dir, data_dir = _settle(
        config, overrides, out, resume, force, data_dir, log, write=rank == 0
    )
    loader_gen = seed_everything(cfg.seed)
    train_ds, val_ds, test_ds = _load_data(cfg, data_dir)
    if state is not None:
        # Checked against the spec on the meta device before anything is allocated; the random
        # number generators are restored later, so skipping the dense build changes nothing.
        model, initial = _resumed_model(cfg, state, ckpt_path, train_ds.input_shape, train_ds.num_classes)
    else:
        _check_model_size(cfg, _meta_model(cfg, train_ds.input_shape, train_ds.num_classes))
        model = build_model(cfg.model, train_ds.input_shape, train_ds.num_classes).to(cfg.device)
        initial = sum(p.numel() for p in model.parameters())
    run = _Run(
        cfg, model, train_ds, val_ds, test_ds, loader_gen, initial, out_dir, data_dir, state=state, log=log
    )
    run.ckpt_path = ckpt_path
    if out is not None and out_dir is None:  # a fresh run: data and model are fine, now the directory
        run.created = not Path(out).expanduser().exists()
        run.out_dir = _prepare_out(out, resume=False, force=force) if rank == 0 else Path(out).expanduser()
    return run
