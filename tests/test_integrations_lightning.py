"""rmtprune.integrations.lightning: the RMTPruningCallback with the real lightning / pytorch_lightning.

A 256-unit MLP on digits is trained 2 epochs by Lightning with the callback and by
``rmtprune.train`` with the same seed, data order (the same FastLoader batches), optimizer and
step LR schedule: the per-epoch training loss and accuracy agree to 1e-9 (the same float
operations in the same order; the tolerance only absorbs summation noise) and both end with
``fc1`` factored to the same rank. A checkpoint resumes with ``ckpt_path`` into a fresh dense
module and ends where the uninterrupted run does.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from torch.nn import functional as F

import rmtprune
from rmtprune.errors import RmtpruneError
from rmtprune.io import factored_layers
from rmtprune.zoo.data import FastLoader, load_dataset, seed_everything
from rmtprune.zoo.models import build_model

pl = pytest.importorskip(
    "lightning.pytorch", reason="lightning is not installed (pip install 'rmtprune[lightning]')"
)
from rmtprune.integrations.lightning import (  # noqa: E402
    RMTPruningCallback,
    callback_class,
    load_checkpoint,
    refactor_checkpoint,
)

SPEC, BATCH, LR, KEEP = "mlp:256", 32, 0.05, 0.2
TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")


def _lit_class(package: Any) -> type:
    class Lit(package.LightningModule):
        """The training step of rmtprune.train: cross-entropy, SGD with momentum, step LR per epoch."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.rows: list[tuple[float, float]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def on_train_epoch_start(self) -> None:
            self._sums = [0.0, 0, 0]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            self._sums[0] += float(loss.detach()) * int(y.numel())
            self._sums[1] += int((logits.argmax(1) == y).sum())
            self._sums[2] += int(y.numel())
            return loss

        def on_train_epoch_end(self) -> None:
            s = self._sums
            self.rows.append((s[0] / s[2], s[1] / s[2]))

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    return Lit


def _probe_class(package: Any) -> type:
    class Probe(package.Callback):
        """After the pruning callback: the optimizer each epoch ends with (object, lr, state size)."""

        def __init__(self) -> None:
            self.seen: list[tuple[int, float, int]] = []

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            opt = trainer.optimizers[0]
            self.seen.append((id(opt), opt.param_groups[0]["lr"], len(opt.state)))

    return Probe


def _fit(package: Any, cb: Any, epochs: int, ckpt: str | None = None, skip: int = 0, **trainer_kw: Any):
    """Fit the Lightning module on the FastLoader batches rmtprune.train would draw (seed 0);
    ``skip`` epochs of the data order are drawn first (a resumed run continues the order)."""
    gen = seed_everything(0)
    ds = load_dataset("digits", "train", val_size=0)
    lit = _lit_class(package)(build_model(SPEC, ds.input_shape, ds.num_classes))
    for _ in range(skip):
        torch.randperm(len(ds), generator=gen)
    probe = _probe_class(package)()
    kw: dict[str, Any] = dict(logger=False, enable_checkpointing=False)
    kw.update(trainer_kw)
    trainer = package.Trainer(
        max_epochs=epochs,
        callbacks=[cb, probe],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(lit, train_dataloaders=FastLoader(ds, BATCH, shuffle=True, generator=gen), ckpt_path=ckpt)
    return lit, trainer, probe


@pytest.fixture(scope="module")
def reference() -> Any:
    """rmtprune.train, 2 epochs, the same run as the Lightning one."""
    torch.set_num_threads(1)
    return rmtprune.train(
        dataset="digits",
        model=SPEC,
        epochs=2,
        batch_size=BATCH,
        lr=LR,
        lr_schedule="step",
        lr_step=1,
        lr_gamma=0.5,
        prune_every=1,
        val_size=0,
        track_spectra=False,
        track_stability=False,
        compression={"keep_bulk": KEEP},
    )


def _check_same_run(lit: Any, reference: Any) -> None:
    ours = [(m["train_loss"], m["train_acc"]) for m in reference.metrics]
    assert len(lit.rows) == len(ours)
    for (loss, acc), (ref_loss, ref_acc) in zip(lit.rows, ours, strict=True):
        assert math.isclose(loss, ref_loss, rel_tol=TOL) and math.isclose(acc, ref_acc, rel_tol=TOL)
    arch = {k.removeprefix("net."): v for k, v in factored_layers(lit).items()}
    assert arch == factored_layers(reference.model) and arch["fc1"]["rank"] < 64


def test_lightning_matches_rmtprune_train(reference: Any) -> None:
    cb = RMTPruningCallback(every=1, keep_bulk=KEEP)
    lit, trainer, probe = _fit(pl, cb, 2)
    _check_same_run(lit, reference)
    # The same decisions, and the factored layer is cut again at epoch 2 (as RMTPruner does).
    strip = [{**r, "layer": r["layer"].removeprefix("net.")} for r in cb.history_]
    keys = ("epoch", "layer", "action", "rank_before", "rank_after")
    assert [{k: r[k] for k in keys} for r in strip] == [{k: r[k] for k in keys} for r in reference.decisions]
    assert any(r["epoch"] == 2 and r["layer"] == "fc1" and r["rank_before"] < 64 for r in strip)
    # Logged ranks reach the trainer's metrics; the optimizer was rebuilt in place, state kept.
    rank = factored_layers(lit)["net.fc1"]["rank"]
    assert float(trainer.callback_metrics["rmtprune/rank/net.fc1"]) == rank
    assert float(trainer.callback_metrics["rmtprune/params"]) == sum(p.numel() for p in lit.parameters())
    (id1, lr1, state1), (id2, lr2, _) = probe.seen
    assert id1 == id2 and (lr1, lr2) == (LR / 2, LR / 4) and state1 > 0
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in lit.parameters()
    }


def test_checkpoint_resumes_with_ckpt_path(reference: Any, tmp_path: Any) -> None:
    first, trainer, _ = _fit(
        pl,
        RMTPruningCallback(every=1, keep_bulk=KEEP),
        1,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
        logger=pl.loggers.CSVLogger(str(tmp_path)),
    )
    ckpt = trainer.checkpoint_callback.best_model_path
    stored = torch.load(ckpt, weights_only=True)
    assert stored["rmtprune"]["architecture"] == factored_layers(first)
    # The ranks reached the logger's file.
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "rmtprune/rank/net.fc1" in header.split(",")

    cb = RMTPruningCallback(every=1, keep_bulk=KEEP)
    resumed, _, _ = _fit(pl, cb, 2, ckpt=ckpt, skip=1, default_root_dir=str(tmp_path))
    assert len(cb.history_) == len(reference.decisions)  # the epoch-1 decisions came back with it
    ((loss, acc),) = resumed.rows  # epoch 2 only: epoch 1 was trained before the checkpoint
    assert math.isclose(loss, reference.metrics[1]["train_loss"], rel_tol=TOL)
    assert math.isclose(acc, reference.metrics[1]["train_acc"], rel_tol=TOL)

    # Outside Lightning: the inner network rebuilt from the .ckpt gives the saved model's outputs,
    # and so does load_from_checkpoint of a module whose on_load_checkpoint re-factors it.
    ds = load_dataset("digits", "test")
    net = load_checkpoint(ckpt, build_model(SPEC, ds.input_shape, ds.num_classes), prefix="net.")

    class Reloadable(type(first)):
        def on_load_checkpoint(self, checkpoint: dict) -> None:
            refactor_checkpoint(self, checkpoint)

    lit = Reloadable.load_from_checkpoint(ckpt, net=build_model(SPEC, ds.input_shape, ds.num_classes))
    first.eval()
    with torch.no_grad():
        assert torch.equal(net(ds.x[:64]), first.net(ds.x[:64]))
        assert torch.equal(lit.eval()(ds.x[:64]), first.net(ds.x[:64]))


def test_setup_optimizers_mode_restarts_state_keeps_schedule() -> None:
    cb = RMTPruningCallback(every=1, keep_bulk=KEEP, optimizer="setup_optimizers")
    lit, trainer, probe = _fit(pl, cb, 2)
    (id1, lr1, state1), (id2, lr2, state2) = probe.seen
    # Lightning built new optimizers after each cut: no state, the LR schedule where it was.
    assert id1 != id2 and state1 == 0 and state2 == 0
    assert (lr1, lr2) == (LR / 2, LR / 4)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    assert factored_layers(lit)["net.fc1"]["rank"] < 64


def test_pytorch_lightning(reference: Any) -> None:
    try:
        ptl = importlib.import_module("pytorch_lightning")
    except ImportError:
        pytest.skip("pytorch_lightning is not installed")
    lit, _, _ = _fit(ptl, callback_class("pytorch_lightning")(every=1, keep_bulk=KEEP), 2)
    _check_same_run(lit, reference)
    # A callback of the other package is refused, saying which one to use.
    with pytest.raises(RmtpruneError, match=r"callback_class\('pytorch_lightning'\)"):
        _fit(ptl, RMTPruningCallback(every=1), 1)


def test_unsupported_strategy_is_refused() -> None:
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )
    cb = RMTPruningCallback(every=1)
    with pytest.raises(RmtpruneError) as info:
        cb.setup(trainer, None, "fit")
    msg = str(info.value)
    assert "DDPStrategy" in msg and "\n" not in msg


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="optimizer='adam'"):
        RMTPruningCallback(optimizer="adam")
    with pytest.raises(TypeError):
        RMTPruningCallback(not_a_field=1)
    with pytest.raises(ValueError, match="package="):
        callback_class("keras")
    assert callback_class() is callback_class("lightning.pytorch") is RMTPruningCallback


def test_start_zero_cuts_at_fit_start() -> None:
    cb = RMTPruningCallback(every=1, start=0, keep_bulk=KEEP)
    lit, _, _ = _fit(pl, cb, 1)
    assert sorted({r["epoch"] for r in cb.history_}) == [0, 1]
    assert next(r for r in cb.history_ if r["epoch"] == 0 and r["layer"] == "net.fc1")["action"] == "factor"
