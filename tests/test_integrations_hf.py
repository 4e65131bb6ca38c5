"""rmtprune.integrations.hf: the RMTPruningCallback with the real transformers.Trainer.

A 256-unit MLP on digits is trained 2 epochs by a ``Trainer`` (subclassed only to feed it the
FastLoader batches of ``rmtprune.train`` and to compute the cross-entropy) with the callback, and
by ``rmtprune.train`` with the same seed, data order, SGD with momentum 0.9 and constant LR
(gradient clipping off, as in rmtprune.train): the per-epoch training loss and accuracy agree
to 1e-9 (the tolerance only absorbs summation noise) and both end with ``fc1`` factored to the
same rank. The Trainer's own optimizer has two groups (weight decay / none on biases), so the
resume test also checks that the bias moved into a factor stays in the no-decay group.
"""

from __future__ import annotations

import json
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

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'rmtprune[hf]')"
)
from rmtprune.integrations.hf import (  # noqa: E402
    MODEL_FILE,
    STATE_FILE,
    RMTPruningCallback,
    load_checkpoint,
)

SPEC, BATCH, LR, KEEP = "mlp:256", 32, 0.05, 0.2
TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")


class DictBatches:
    """The FastLoader's batches as the dicts a Trainer expects (``labels`` named as usual)."""

    def __init__(self, loader: FastLoader) -> None:
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield {"input": x, "labels": y}


class FastTrainer(transformers.Trainer):
    """A Trainer fed rmtprune.train's batches, with its cross-entropy; sums per epoch in ``rows``."""

    def __init__(self, *args: Any, batches: DictBatches, **kwargs: Any) -> None:
        self._batches = batches
        self.sums: dict[int, list[float]] = {}
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self) -> Any:
        return self._batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["input"])
        y = inputs["labels"]
        loss = F.cross_entropy(logits, y)
        s = self.sums.setdefault(math.floor(self.state.epoch or 0.0), [0.0, 0, 0])
        s[0] += float(loss.detach()) * int(y.numel())
        s[1] += int((logits.argmax(1) == y).sum())
        s[2] += int(y.numel())
        return (loss, logits) if return_outputs else loss

    @property
    def rows(self) -> list[tuple[float, float]]:
        return [(s[0] / s[2], s[1] / s[2]) for _, s in sorted(self.sums.items())]


def _trainer(tmp_path: Any, cb: Any, epochs: int, skip: int = 0, save: bool = False) -> FastTrainer:
    gen = seed_everything(0)
    ds = load_dataset("digits", "train", val_size=0)
    model = build_model(SPEC, ds.input_shape, ds.num_classes)
    for _ in range(skip):
        torch.randperm(len(ds), generator=gen)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_strategy="epoch",
        save_strategy="epoch" if save else "no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    batches = DictBatches(FastLoader(ds, BATCH, shuffle=True, generator=gen))
    return FastTrainer(model=model, args=args, callbacks=[cb], batches=batches)


@pytest.fixture(scope="module")
def reference() -> Any:
    torch.set_num_threads(1)
    return rmtprune.train(
        dataset="digits",
        model=SPEC,
        epochs=2,
        batch_size=BATCH,
        lr=LR,
        prune_every=1,
        val_size=0,
        track_spectra=False,
        track_stability=False,
        compression={"keep_bulk": KEEP},
    )


def _check_same_run(rows: list[tuple[float, float]], model: Any, reference: Any) -> None:
    ours = [(m["train_loss"], m["train_acc"]) for m in reference.metrics]
    assert len(rows) == len(ours)
    for (loss, acc), (ref_loss, ref_acc) in zip(rows, ours, strict=True):
        assert math.isclose(loss, ref_loss, rel_tol=TOL) and math.isclose(acc, ref_acc, rel_tol=TOL)
    assert factored_layers(model) == factored_layers(reference.model)
    assert factored_layers(model)["fc1"]["rank"] < 64


def test_trainer_matches_rmtprune_train(reference: Any, tmp_path: Any) -> None:
    cb = RMTPruningCallback(every=1, keep_bulk=KEEP)
    trainer = _trainer(tmp_path, cb, 2)
    trainer.train()
    _check_same_run(trainer.rows, trainer.model, reference)
    keys = ("epoch", "layer", "action", "rank_before", "rank_after")
    assert [{k: r[k] for k in keys} for r in cb.history_] == [
        {k: r[k] for k in keys} for r in reference.decisions
    ]
    # The ranks are in the log history, one entry per epoch.
    logged = [e for e in trainer.state.log_history if "rmtprune/rank/fc1" in e]
    assert [e["epoch"] for e in logged] == [1.0, 2.0]
    assert logged[-1]["rmtprune/rank/fc1"] == factored_layers(trainer.model)["fc1"]["rank"]
    # The trainer's optimizer trains exactly the model's parameters.
    opt = trainer.optimizer.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in trainer.model.parameters()
    }


def test_checkpoint_resumes(reference: Any, tmp_path: Any) -> None:
    first = _trainer(tmp_path, RMTPruningCallback(every=1, keep_bulk=KEEP, save_model=True), 1, save=True)
    first.train()
    ckpt = tmp_path / "checkpoint-45"
    stored = json.loads((ckpt / STATE_FILE).read_text())
    assert stored["architecture"] == factored_layers(first.model)
    # The bias moved into fc1's second factor stays out of weight decay, like every bias.
    opt = first.optimizer.optimizer
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(first.model.fc1.second.bias) in no_decay and id(first.model.fc1.second.weight) not in no_decay

    cb = RMTPruningCallback(every=1, keep_bulk=KEEP)
    resumed = _trainer(tmp_path, cb, 2, skip=1)
    assert cb.prepare_resume(resumed, True) == str(ckpt)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert len(cb.history_) == len(reference.decisions)
    ((loss, acc),) = resumed.rows  # epoch 2 only: epoch 1 was trained before the checkpoint
    assert math.isclose(loss, reference.metrics[1]["train_loss"], rel_tol=TOL)
    assert math.isclose(acc, reference.metrics[1]["train_acc"], rel_tol=TOL)

    # Outside the Trainer: the checkpoint directory, and rmtprune.load of the rmtprune copy.
    ds = load_dataset("digits", "test")
    fresh = load_checkpoint(ckpt, build_model(SPEC, ds.input_shape, ds.num_classes))
    copy = rmtprune.load(ckpt / MODEL_FILE, build_model(SPEC, ds.input_shape, ds.num_classes))
    first.model.eval()
    with torch.no_grad():
        want = first.model(ds.x[:64])
        assert torch.equal(fresh(ds.x[:64]), want) and torch.equal(copy(ds.x[:64]), want)


def test_attach_logs_through_trainer_log(tmp_path: Any) -> None:
    trainer = _trainer(tmp_path, RMTPruningCallback(every=5), 1)
    cb = RMTPruningCallback(every=1, keep_bulk=KEEP).attach(trainer)
    seen: list[dict[str, float]] = []

    class Spy(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    trainer.add_callback(Spy())
    trainer.train()
    assert cb.history_ and any("rmtprune/rank/fc1" in logs and logs["rmtprune/f"] == KEEP for logs in seen)


def test_more_than_one_process_is_refused() -> None:
    from rmtprune.integrations.hf import _check_single_process

    class Args:
        deepspeed = None
        fsdp = ""
        world_size = 2
        parallel_mode = "ParallelMode.DISTRIBUTED"
        n_gpu = 1

    with pytest.raises(RmtpruneError) as info:
        _check_single_process(Args())
    assert "world_size=2" in str(info.value) and "\n" not in str(info.value)
    Args.world_size, Args.fsdp = 1, "full_shard"
    with pytest.raises(RmtpruneError, match="FSDP"):
        _check_single_process(Args())


def test_transformers_model_checkpoints_and_resumes(tmp_path: Any) -> None:
    """A cut transformers model: the Trainer's checkpoints are written (rmtprune's save_pretrained
    guard is replaced for the Trainer), from_pretrained of one still refuses, and it resumes."""
    from rmtprune.integrations.hf import LOAD_HINT

    def bert() -> Any:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96
        )
        return transformers.BertForSequenceClassification(cfg)

    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "labels": int(ids[i, 0] % 2)} for i in range(32)]

    def trainer(epochs: int, cb: Any) -> Any:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            num_train_epochs=epochs,
            per_device_train_batch_size=16,
            save_strategy="epoch",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        return transformers.Trainer(model=bert(), args=args, train_dataset=data, callbacks=[cb])

    first = trainer(1, RMTPruningCallback(every=1, keep_bulk=0.2))
    first.train()
    ckpt = tmp_path / "checkpoint-2"
    assert factored_layers(first.model)
    assert json.loads((ckpt / "config.json").read_text())["transformers_weights"] == LOAD_HINT
    with pytest.raises(ValueError):
        transformers.BertForSequenceClassification.from_pretrained(str(ckpt))

    cb = RMTPruningCallback(every=1, keep_bulk=0.2)
    resumed = trainer(2, cb)
    resumed.train(resume_from_checkpoint=cb.prepare_resume(resumed, ckpt))
    assert {r["epoch"] for r in cb.history_} == {1, 2}
    model = load_checkpoint(tmp_path / "checkpoint-4", bert()).eval()
    with torch.no_grad():
        assert torch.equal(model(ids[:4]).logits, resumed.model.eval()(ids[:4]).logits)


def test_rebuild_optimizer_keeps_the_moved_bias_in_its_group() -> None:
    """rebuild_optimizer puts fc1.second.bias in the bias group, each group in model order (as an
    optimizer built from the model by name rules), after a cut and after a re-factoring to a stored
    architecture (zero factors, the checkpoint not loaded yet; the bias is copied in both)."""
    from rmtprune.config import CompressionConfig
    from rmtprune.integrations import refactor
    from rmtprune.training import rebuild_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(32, 24))
    model.add_module("fc2", torch.nn.Linear(24, 3))

    def by_rule() -> list[list[str]]:
        names = {id(p): n for n, p in model.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]

    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=0.1)
    old = dict(model.named_parameters())
    rmtprune.compress(model, config=CompressionConfig(rule="fixed", rank=4, include=["fc1"]))
    rebuild_optimizer(opt, model, old)
    grouped = [
        ["fc1.first.weight", "fc1.second.weight", "fc2.weight"],
        ["fc1.second.bias", "fc2.bias"],
    ]
    assert by_rule() == grouped
    arch = factored_layers(model)

    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(32, 24))
    model.add_module("fc2", torch.nn.Linear(24, 3))
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=0.1)
    old = dict(model.named_parameters())
    refactor(model, arch)
    rebuild_optimizer(opt, model, old)
    assert by_rule() == grouped

    # refactor: a layer that does not fit leaves the model as it was.
    fresh = torch.nn.Sequential()
    fresh.add_module("fc1", torch.nn.Linear(32, 24))
    fresh.add_module("fc2", torch.nn.Linear(24, 3))
    bad = {**arch, "fc2": {**arch["fc1"], "matrix_shape": [99, 99]}}
    with pytest.raises(rmtprune.errors.CheckpointError, match="fc2"):
        refactor(fresh, bad)
    assert not factored_layers(fresh)
    assert factored_layers(refactor(fresh, arch)) == arch
