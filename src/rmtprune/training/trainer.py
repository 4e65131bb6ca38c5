"""The complete trainer: :func:`train` opens a run, then loops over epochs (train, cut, evaluate, save).

A run's state between epochs is one :class:`_Run` (config, model, optimizer, scheduler, data,
pruner, output directory, metrics, timings); :func:`train` is the loop over epochs calling
:func:`_run_epoch` and :func:`_save_epoch`, and :func:`.opening._open` / :func:`_restore` set the
run up, fresh or resumed from its last checkpoint, in an order that keeps resumes bit for bit.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write_text
from .._progress import progress
from ..errors import CheckpointError
from ..finetune import DivergedError, evaluate, optimizer_step, regularizer
from ..io import factored_layers
from . import distributed
from .config import TrainConfig, TrainResult
from .opening import _open, _Run
from .pruner import LogFn, RMTPruner, _layer_columns
from .resume import (
    _check_optimizer_fits,
    _check_scheduler_fits,
)
from .run_files import (
    _FORMAT,
    _VERSION,
    CHECKPOINT,
    _remove_empty_run,
    _rng_state,
    _save_checkpoint,
    _set_rng_state,
    _write_outputs,
    _write_tables,
)
from .setup import (
    _make_optimizer,
    _make_scaler,
    _make_scheduler,
    _short,
    autocast,
)
from .stability import format_columns, tracker_for

__all__ = ["train"]


def _restore(run: _Run) -> None:
    """Pruner, optimizer and schedule of the run; a resumed run's states loaded from its checkpoint."""
    cfg, state = run.cfg, run.state
    if cfg.prune:
        run.pruner = RMTPruner(
            every=cfg.prune_every,
            start=cfg.prune_start,
            keep_bulk=cfg.compression.keep_bulk,
            decay_T=cfg.decay_T,
            config=cfg.compression,
            log=run.log,
        )
    run.optimizer = _make_optimizer(cfg, run.model)
    run.scheduler = _make_scheduler(cfg, run.optimizer)
    run.stability = tracker_for(
        cfg, run.train_ds, run.val_ds, shard=(run.rank, run.world), reduce=distributed.reduce_counts
    )
    run.scaler = _make_scaler(cfg)
    if state is not None:
        path = run.ckpt_path
        where = f"{str(path)!r} has an optimizer or scheduler state that does not fit"
        _check_optimizer_fits(run.optimizer, state["optimizer"], where)
        _check_scheduler_fits(run.scheduler, state["scheduler"], where)
        try:
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], run.loader_gen)
            if run.stability is not None:
                run.stability.load_state_dict(state.get("stability", {}))
            if run.scaler is not None and state.get("scaler"):
                run.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"{str(path)!r} has an optimizer or RNG state that does not fit: {_short(exc)}"
            ) from exc
        if run.pruner is not None:
            run.pruner.load_state_dict(state.get("pruner", {}))
        run.metrics = [dict(r) for r in state.get("metrics", [])]
        run.done = int(state["epoch"])
        if run.log is not None:
            done, epochs = run.done, cfg.epochs
            left = "nothing left to train" if done >= epochs else f"{epochs - done} epoch(s) to go"
            run.log(f"resuming {str(run.out_dir)!r} after epoch {done} of {epochs} from {path.name}: {left}")
    elif run.pruner is not None and run.pruner.should_prune(0):
        run.pruner.prune(run.model, 0, run.optimizer)
    # A fresh run writes config.json with its first checkpoint, so a run that fails before
    # completing an epoch (divergence, Ctrl-C, a bad option found late) leaves nothing behind.
    if run.out_dir is not None and state is not None:
        atomic_write_text(run.out_dir / "config.json", cfg.to_json() + "\n")
        run.config_written = True
    from ..zoo.data import FastLoader, ShardedLoader

    if run.world > 1:
        run.ddp = distributed.wrap(run.model)
        run.loader = ShardedLoader(
            run.train_ds, cfg.batch_size, run.rank, run.world, shuffle=True, generator=run.loader_gen,
            device=cfg.device,
        )  # fmt: skip
    else:
        run.loader = FastLoader(
            run.train_ds, cfg.batch_size, shuffle=True, generator=run.loader_gen, device=cfg.device
        )
    run.test_ds = run.test_ds.to(cfg.device)
    if run.val_ds is not None:
        run.val_ds = run.val_ds.to(cfg.device)


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
    dist_timeout: float | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a model on a dataset, pruning it with :class:`RMTPruner` on the way; return the result.

    Parameters
    ----------
    config : a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``train(epochs=3)``);
        ``compression={...}`` replaces some fields of its compression config.
    out : output directory (created): ``config.json``, ``metrics.csv``/``.json`` (one row per
        epoch: losses, accuracies, parameter count, per-layer rank, sigma2, n_spikes, n_bulk, ks),
        ``decisions.csv``/``.json`` (one row per layer per cut), ``accuracy.png``, ``params.png``,
        ``ranks.png``, ``model.safetensors`` (+ manifest, for :func:`rmtprune.load`) and a checkpoint
        after every epoch (``checkpoint.pt``, the one before kept as ``checkpoint.prev.pt``). Every
        file is written atomically. ``None``: nothing is written and ``resume`` is impossible.
    resume : continue the run in ``out`` from its last complete checkpoint: the pruned architecture,
        weights, optimizer and scheduler state and every random number generator are restored, so
        the run ends with the same metrics as one that was never interrupted. The stored
        configuration is used; only ``epochs``, ``device``, ``track_spectra`` and
        ``eval_before_prune`` may change.
    data_dir : where the dataset files are (see :func:`rmtprune.data.load_dataset`); a resumed run
        uses the one it was started with unless given another.
    log : called with one line per epoch and per pruning decision (``print`` for a console).
    progress_bar : a progress bar over the batches (``None``: only on a terminal).
    batch_callback : called as ``batch_callback(epoch, batch_index)`` before every batch (tests use
        it to interrupt a run; a ``KeyboardInterrupt`` there leaves the last checkpoint valid).
    force : a fresh run into a directory that already has files of the names it writes
        (:data:`RUN_FILES`: another run's, or yours) overwrites them; without it that is refused
        before any work.
    dist_timeout : seconds every collective waits for the other ranks (default
        :data:`~rmtprune.training.distributed.DEFAULT_TIMEOUT_S`). Used when the process was started
        as one rank of several (``torchrun``, ``rmtprune train --nproc N``: ``WORLD_SIZE`` > 1 in the
        environment): the run then trains a DDP model on this rank's share of every global batch
        (``batch_size`` is the global batch), reduces the metrics over the ranks and cuts with rank
        0's decisions; rank 0 alone logs and writes. See docs/distributed.md.

    Returns
    -------
    TrainResult
    """
    t_run = time.perf_counter()
    device = overrides.get("device") or (config.device if isinstance(config, TrainConfig) else "cpu")
    joined = distributed.init_from_env(str(device), dist_timeout or distributed.DEFAULT_TIMEOUT_S)
    try:
        return _train(
            config, overrides, out, resume, force, data_dir, log, progress_bar, batch_callback, t_run
        )
    finally:
        if joined:
            distributed.leave()


def _train(
    config: TrainConfig | None,
    overrides: dict[str, Any],
    out: str | os.PathLike[str] | None,
    resume: bool,
    force: bool,
    data_dir: str | os.PathLike[str] | None,
    log: LogFn | None,
    progress_bar: bool | None,
    batch_callback: Callable[[int, int], None] | None,
    t_run: float,
) -> TrainResult:
    """:func:`train` after joining the process group (if any)."""
    rank, world = distributed.world()
    if rank != 0:  # rank 0 speaks for the run
        log, progress_bar = None, False
    run = _open(config, overrides, out, resume, force, data_dir, log, rank)
    run.rank, run.world = rank, world
    run.progress_bar, run.batch_callback = progress_bar, batch_callback
    epoch, started = run.done, False
    try:
        _restore(run)  # inside: a fresh run that fails here (or Ctrl-C) leaves no empty --out behind
        epoch, started = run.done, True
        for epoch in range(run.done + 1, run.cfg.epochs + 1):
            row = _run_epoch(run, epoch)
            for key in run.timings:
                if key != "io":
                    run.timings[key] += row[f"seconds_{key}"]
            run.metrics.append(row)
            if log is not None:
                log(_format_epoch(row, run.cfg.epochs))
            _save_epoch(run, epoch)
    except BaseException as exc:
        _interrupted(run, epoch, exc)
        if run.world > 1 and distributed.lost_rank(exc):
            raise distributed.lost(exc, f"epoch {epoch}" if started else "setting up the run") from exc
        raise
    _finish(run, nothing_trained=epoch == run.done)
    run.timings["total"] = time.perf_counter() - t_run
    return TrainResult(
        model=run.model,
        config=run.cfg,
        metrics=run.metrics,
        decisions=run.decisions,
        timings=run.timings,
        out=run.out_dir,
        resumed_from=run.done if run.state is not None else None,
        initial_params=run.initial_params,
    )


def _save_epoch(run: _Run, epoch: int) -> None:
    """The checkpoint of ``epoch``, ``config.json`` with the first one, and the tables so far."""
    out_dir = run.out_dir
    if out_dir is None:
        return
    stability = run.stability.state_dict() if run.stability is not None else {}
    if run.world > 1:  # the whole splits' vectors, from every rank's shard (a collective)
        stability = distributed.gather_stability(stability)
    if run.rank != 0:
        return
    t0 = time.perf_counter()
    data_dir = None if run.data_dir is None else str(Path(run.data_dir).expanduser().resolve())
    _save_checkpoint(
        out_dir,
        {
            "format": _FORMAT,
            "version": _VERSION,
            "epoch": epoch,
            "config": run.cfg.to_dict(),
            "data_dir": data_dir,
            "architecture": factored_layers(run.model),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": _rng_state(run.loader_gen),
            "metrics": run.metrics,
            "pruner": run.pruner.state_dict() if run.pruner is not None else {},
            "stability": stability,
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
        },
    )
    if not run.config_written:
        atomic_write_text(out_dir / "config.json", run.cfg.to_json() + "\n")
        run.config_written = True
    _write_outputs(out_dir, lambda: _write_tables(out_dir, run.metrics, run.decisions))
    run.timings["io"] += time.perf_counter() - t0


def _interrupted(run: _Run, epoch: int, exc: BaseException) -> None:
    """A fresh run that failed before its first checkpoint leaves no directory; Ctrl-C says where it is."""
    out_dir = run.out_dir if run.rank == 0 else None
    if out_dir is not None and run.state is None and not run.config_written:
        _remove_empty_run(out_dir, run.created)
    if isinstance(exc, KeyboardInterrupt) and run.log is not None and out_dir is not None:
        where = (
            f"the last complete checkpoint is {str(out_dir / CHECKPOINT)!r} (epoch {epoch - 1})"
            if epoch - 1 > 0
            else "no epoch was completed"
        )
        run.log(f"interrupted during epoch {epoch}; {where}")


def _finish(run: _Run, nothing_trained: bool) -> None:
    """Plots and the final model (and, for a run killed before its tables, the tables): rank 0's job."""
    out_dir = run.out_dir if run.rank == 0 else None
    if out_dir is None:
        return
    from .. import plotting

    t0 = time.perf_counter()
    if nothing_trained:
        # Nothing left to train: a run killed between its last checkpoint and its tables
        # gets them written from the checkpoint now.
        _write_outputs(out_dir, lambda: _write_tables(out_dir, run.metrics, run.decisions))
    if plotting.have_matplotlib():
        _write_outputs(out_dir, lambda: plotting.plot_training(out_dir, run.metrics))
    elif run.log is not None:
        run.log("plots skipped: " + plotting.MISSING_MATPLOTLIB)
    _write_outputs(
        out_dir, lambda: _save_model(run.model, out_dir / "model.safetensors", run.cfg, run.train_ds)
    )
    run.timings["io"] += time.perf_counter() - t0


def _train_steps(run: _Run, epoch: int) -> tuple[float, int, int]:
    """One pass over the training data; returns the summed loss, the correct count and the count."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    net = run.ddp if run.ddp is not None else model  # DDP all-reduces the gradients of the backward
    model.train()
    loss_sum, correct, n = 0.0, 0, 0
    regularise = cfg.l1 > 0 or cfg.l2 > 0
    steps = len(run.loader)
    batches = progress(run.loader, total=steps, desc=f"epoch {epoch}/{cfg.epochs}", enable=run.progress_bar)
    kill = distributed.should_die(run.rank, epoch)
    for i, batch in enumerate(batches):
        x, y = batch[0], batch[1]
        if run.batch_callback is not None:
            run.batch_callback(epoch, i)
        if kill and i == 1:
            distributed.kill_self()
        with autocast(cfg):
            logits = net(x)
            if run.world > 1:  # this rank's rows; scaled so DDP's mean over ranks is the batch mean
                summed = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                loss = summed * batch[2]
            else:
                loss = nn.functional.cross_entropy(logits.float(), y)
        total = loss + regularizer(model, cfg.l1, cfg.l2, weights="all") if regularise else loss
        value = float(total.detach())
        where = f"training diverged in epoch {epoch}, step {i + 1} of {steps}"
        if not math.isfinite(value):
            # Before the step: the weights stay as they were, and no checkpoint of this epoch is written.
            raise DivergedError(
                f"{where}: the loss is {value}; "
                f"lower the learning rate (--lr, now {cfg.lr:g}); nothing of epoch {epoch} was saved"
            )
        optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:  # amp="fp16": scaled loss, steps with inf gradients skipped
            run.scaler.scale(total).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
        else:
            total.backward()
            optimizer_step(optimizer, where, cfg.lr)
        if run.stability is not None:
            run.stability.step(model, (epoch - 1) * steps + i + 1)
        if run.world > 1 and batch[2] == 0:  # a placeholder row (this rank's share was empty)
            continue
        with torch.no_grad():
            loss_sum += float(summed) if run.world > 1 else float(loss) * int(y.numel())
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
    if run.world > 1:
        loss_sum, correct, n = distributed.all_reduce_sums([loss_sum, correct, n])
    return loss_sum, int(correct), int(n)


def _test(run: _Run, split: str = "test") -> tuple[float | None, float | None]:
    """Mean cross-entropy and accuracy on the ``test`` or ``val`` split (summed per batch, as always);
    ``(None, None)`` for ``val`` when the run has none."""
    from ..zoo.data import batches

    ds = run.test_ds if split == "test" else run.val_ds
    if ds is None:
        return None, None
    if run.world > 1:  # this rank's fixed share (rows rank::world), the sums reduced over the ranks
        if split not in run.shards:
            run.shards[split] = ds.subset(slice(run.rank, None, run.world))
        part = run.shards[split]
        res = evaluate(run.model, lambda: batches(part, 1024), reduction="sum") if len(part) else None
        sums = [res["loss"] * res["n"], res["accuracy"] * res["n"], res["n"]] if res else [0.0, 0.0, 0.0]
        loss_sum, correct, n = distributed.all_reduce_sums(sums)
        return loss_sum / n, correct / n
    res = evaluate(run.model, lambda: batches(ds, 1024), reduction="sum")
    return res["loss"], res["accuracy"]


def _run_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One epoch: train, step the schedule, cut if due, evaluate, fit spectra; return its metrics row."""
    cfg, pruner = run.cfg, run.pruner
    t0 = time.perf_counter()
    lr = float(run.optimizer.param_groups[0]["lr"])
    loss_sum, correct, n = _train_steps(run, epoch)
    run.scheduler.step()
    track = run.stability
    t_stab = track.seconds if track is not None else 0.0  # the step measurements
    t_train = time.perf_counter() - t0 - t_stab

    pruned = pruner is not None and pruner.should_prune(epoch)
    t_eval = t_prune = 0.0
    acc_before = val_before = before = None
    layers: dict[str, dict[str, Any]] = {}
    if pruned:
        if cfg.eval_before_prune:
            t0 = time.perf_counter()
            _, acc_before = _test(run)
            if track is None:
                _, val_before = _test(run, "val")
            else:  # the val accuracy before the cut is that of the stability measurement
                before = track.measure(run.model)
                val_before = before.counts["val"].accuracy if "val" in before.counts else None
            t_eval += time.perf_counter() - t0
        t0 = time.perf_counter()
        pruner.prune(run.model, epoch, run.optimizer)
        if run.ddp is not None:  # the old wrapper's reducer knows only the old parameters
            run.ddp = distributed.rewrap(run.model, run.ddp)
        t_prune = time.perf_counter() - t0
        layers = {r["layer"]: _layer_columns(r) for r in pruner.history_ if r["epoch"] == epoch}
    t0 = time.perf_counter()
    stab, val_loss, val_acc = _measure_stability(run, before)
    t_stab += time.perf_counter() - t0
    t0 = time.perf_counter()
    test_loss, test_acc = _test(run)
    t_eval += time.perf_counter() - t0
    t0 = time.perf_counter()
    if not pruned:
        layers = _layer_stats(run.model, cfg.compression, fits=cfg.track_spectra)
    t_spectra = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": loss_sum / max(n, 1),
        "train_acc": correct / max(n, 1),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "params": sum(p.numel() for p in run.model.parameters()),
        "pruned": pruned,
        "f": pruner.fraction(epoch) if pruned else None,
        "test_acc_before_prune": acc_before,
        "val_acc_before_prune": val_before,
        "seconds_train": t_train,
        "seconds_prune": t_prune,
        "seconds_eval": t_eval,
        "seconds_spectra": t_spectra,
        "seconds_stability": t_stab,
        **stab,
        "layers": layers,
    }


def _measure_stability(run: _Run, before: Any) -> tuple[dict[str, Any], float | None, float | None]:
    """The epoch's stability columns (:mod:`.stability`; none when it is off) and the val loss and
    accuracy: from the same fixed evaluation of the val split (the numbers of :func:`_test`)."""
    if run.stability is None:
        return {}, *_test(run, "val")
    cols, m = run.stability.epoch_columns(run.model, before)
    run.stability.seconds = 0.0
    val = m.counts.get("val")
    return cols, (val.loss if val is not None else None), (val.accuracy if val is not None else None)


def _format_epoch(row: dict[str, Any], epochs: int) -> str:
    line = (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_acc']:.2f}%  "
        + (f"val acc {100 * row['val_acc']:.2f}%  " if row.get("val_acc") is not None else "")
        + f"test loss {row['test_loss']:.4f} "
        f"acc {100 * row['test_acc']:.2f}%  "
        f"params {row['params']:,}  ({row['seconds_train']:.1f} s"
    )
    if row["pruned"]:
        line += f", pruned f={row['f']:.3f} in {row['seconds_prune']:.2f} s"
        if row.get("test_acc_before_prune") is not None:
            line += f", test acc before the cut {100 * row['test_acc_before_prune']:.2f}%"
    return line + ")" + format_columns(row)


def _save_model(model: nn.Module, path: Path, cfg: TrainConfig, data: Any) -> None:
    """The final model as safetensors + manifest; ``rmtprune.load(path)`` rebuilds it from the spec."""
    from ..io import save

    save(
        model,
        path,
        factory=cfg.model,
        factory_args={"input_shape": list(data.input_shape), "num_classes": int(data.num_classes)},
    )


def _layer_stats(model: nn.Module, compression: Any, fits: bool = True) -> dict[str, dict[str, Any]]:
    """Per prunable layer: current rank and, with ``fits``, the BEMA fit (sigma2, n_spikes, n_bulk, ks).

    The fits are those of the analyze stage (:func:`rmtprune.analysis.analyze`, the same fits a
    plan with ``compression`` would decide from); layers it skips are left out.
    """
    if fits:
        from ..analysis import analyze

        out = {}
        for la in analyze(model, compression, metrics=False):
            if la.verdict != "skip":
                fit = la.fit.to_dict() if la.fit is not None else {}
                out[la.name] = {"rank": la.rank, **{k: fit.get(k) for k in _FIT_COLUMNS}}
        return out
    from ..layers import handler_for

    out = {}
    for name, mod in model.named_modules():
        h = handler_for(mod)
        if h is not None and not h.unsupported(mod) and not any(name.startswith(k + ".") for k in out):
            out[name] = {"rank": h.current_rank(mod), **dict.fromkeys(_FIT_COLUMNS)}
    return out


#: The fit columns of a layer in the metrics (after its rank).
_FIT_COLUMNS = ("sigma2", "n_spikes", "n_bulk", "ks")
