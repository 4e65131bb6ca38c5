"""Accuracy-stability tracking (rmtprune.training.stability) and its wiring into the trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rmtprune.errors import CheckpointError
from rmtprune.finetune import evaluate
from rmtprune.training import CHECKPOINT, TrainConfig, train
from rmtprune.training.stability import (
    Counts,
    StabilityTracker,
    compare,
    correctness,
    event,
    interleave,
    summarize,
)
from rmtprune.zoo.data import Dataset, batches

SMALL = dict(
    dataset="digits",
    model="mlp:48",
    epochs=3,
    lr=0.05,
    batch_size=64,
    seed=5,
    prune_every=2,
    compression={"keep_bulk": 0.2, "min_rank": 1},
    eval_before_prune=True,
    track_spectra=False,
)


def _bits(s: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in s])


def test_flips_fixes_and_events_by_hand():
    c = compare(_bits("1100"), _bits("1010"), loss_sum=3.0, prev_loss_sum=4.0)
    assert (c.n, c.correct, c.prev_correct, c.flips, c.fixes) == (4, 2, 2, 1, 1)
    worse = compare(_bits("1110"), _bits("1000"), loss_sum=1.0, prev_loss_sum=2.0)
    assert (worse.flips, worse.fixes) == (2, 0)
    # the training loss fell (3 < 4) while the split's accuracy fell (2 flips > 0 fixes): an event
    assert event(c, worse) is True
    assert event(c, c) is False  # accuracy unchanged (1 flip, 1 fix) is no event
    rising = compare(_bits("1"), _bits("1"), loss_sum=5.0, prev_loss_sum=4.0)
    assert event(rising, worse) is False  # the loss rose: no event whatever the accuracy did
    first = compare(None, _bits("101"), loss_sum=1.0)
    assert not first.measured and event(first, first) is None
    with pytest.raises(ValueError, match="3 examples, this one 2"):
        compare(_bits("101"), _bits("10"), 1.0)


def test_counts_add_and_survive_a_tensor_round_trip():
    a = compare(_bits("1100"), _bits("1010"), 3.0, 4.0)
    b = compare(_bits("01"), _bits("00"), 1.5, 1.0)
    s = a + b
    assert (s.n, s.correct, s.flips, s.fixes, s.loss_sum, s.prev_loss_sum) == (6, 2, 2, 1, 4.5, 5.0)
    assert Counts.from_tensor(s.to_tensor()) == s
    nan = Counts.from_tensor((a + compare(None, _bits("1"), 1.0)).to_tensor())
    assert math.isnan(nan.flips) and nan.n == 5


def _toy(n: int = 300, seed: int = 0) -> tuple[Dataset, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 3, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    return Dataset("toy", "train", x, y, 4, (1, 2, 3)), model


def test_correctness_gives_the_numbers_of_evaluate_bit_for_bit():
    ds, model = _toy(2500)
    bits, loss_sum = correctness(model, ds)
    ref = evaluate(model, lambda: batches(ds, 1024), reduction="sum")
    assert bits.dtype == torch.bool and bits.numel() == 2500
    assert int(bits.sum()) / 2500 == ref["accuracy"] and loss_sum / 2500 == ref["loss"]
    assert model.training  # the mode is restored


def test_shard_counts_sum_to_the_whole_split():
    """Two shards (rank 0 and 1 of 2) whose counts are summed give the counts of one process."""
    train_ds, model = _toy(301, seed=1)
    val_ds, _ = _toy(77, seed=2)
    kw = dict(train_examples=200, seed=9)
    whole = StabilityTracker(train_ds, val_ds, **kw)
    shards = [StabilityTracker(train_ds, val_ds, shard=(r, 2), **kw) for r in (0, 1)]
    assert sum(len(s.data["train"]) for s in shards) == len(whole.data["train"]) == 200
    got = []
    for step in range(3):
        with torch.no_grad():
            model[1].weight.add_(0.3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(step)))
        ref = whole.measure(model, whole.prev["epoch"])
        whole._advance("epoch", ref)
        parts = [s.measure(model, s.prev["epoch"]) for s in shards]
        for s, m in zip(shards, parts, strict=True):
            s._advance("epoch", m)
        for split in ("train", "val"):
            a, b, r = parts[0].counts[split], parts[1].counts[split], ref.counts[split]
            total = a + b
            for f in ("n", "correct", "prev_correct", "flips", "fixes"):
                x, y = getattr(total, f), getattr(r, f)
                assert x == y or (math.isnan(x) and math.isnan(y)), (step, split, f)
            assert total.loss_sum == pytest.approx(r.loss_sum, rel=1e-6)
            got.append(event(parts[0].counts["train"] + parts[1].counts["train"], total))
            assert got[-1] == event(ref.counts["train"], r)
    assert got[:2] == [None, None] and all(e is not None for e in got[2:])
    # a sharded run's checkpoint holds the whole split's vectors; each shard takes its own back
    full = interleave([sh.state_dict()["epoch"]["train"] for sh in shards])
    assert torch.equal(full, whole.state_dict()["epoch"]["train"])
    again = StabilityTracker(train_ds, val_ds, shard=(1, 2), **kw)
    again.load_state_dict({"epoch": {"train": full}})
    assert torch.equal(again.prev["epoch"]["train"], shards[1].prev["epoch"]["train"])


def test_tracker_checks_its_arguments_and_its_state():
    ds, _ = _toy(10)
    for kw, match in (({"shard": (2, 2)}, "shard"), ({"every": -1}, "every")):
        with pytest.raises(ValueError, match=match):
            StabilityTracker(ds, **kw)
    t = StabilityTracker(ds)
    with pytest.raises(ValueError, match="has 3 values"):
        t.load_state_dict({"epoch": {"train": torch.ones(3, dtype=torch.uint8)}})
    with pytest.raises(ValueError, match="0/1"):
        t.load_state_dict({"epoch": {"train": torch.full((10,), 7, dtype=torch.uint8)}})
    with pytest.raises(ValueError, match="finite number"):
        t.load_state_dict({"step": {"train_loss_sum": math.nan}})
    with pytest.raises(TypeError, match="stability_every"):
        TrainConfig(stability_every=1.5)


def test_summarize_splits_cut_epochs_other_epochs_and_the_cuts():
    rows = [
        {"epoch": 1, "pruned": False, "flips_train": None, "flips_val": None},
        {"epoch": 2, "pruned": True, "flips_train": 10, "fixes_train": 2, "event_train": True}
        | {"flips_val": 4, "fixes_val": 1, "event_val": False}
        | {"cut_flips_train": 6, "cut_fixes_train": 1, "cut_event_train": False}
        | {"cut_flips_val": 2, "cut_fixes_val": 0, "cut_event_val": False},
        {"epoch": 3, "pruned": False, "flips_train": 2, "fixes_train": 5, "event_train": False}
        | {"flips_val": 0, "fixes_val": 3, "event_val": False},
        {"epoch": 4, "pruned": False, "flips_train": 4, "fixes_train": 1, "event_train": True}
        | {"flips_val": 2, "fixes_val": 0, "event_val": True},
    ]
    s = summarize(rows)
    assert s["all"] == {
        "count": 3,
        "events_train": 2,
        "flips_train": 16 / 3,
        "fixes_train": 8 / 3,
        "events_val": 1,
        "flips_val": 2.0,
        "fixes_val": 4 / 3,
    }
    cut, other = s["cut_epochs"], s["other_epochs"]
    assert (cut["count"], cut["events_train"], cut["flips_train"]) == (1, 1, 10)
    assert (other["count"], other["events_val"], other["flips_train"]) == (2, 1, 3)
    assert (s["cuts"]["count"], s["cuts"]["flips_train"], s["cuts"]["flips_val"]) == (1, 6, 2)


def test_tracking_changes_nothing_that_is_trained_and_fills_the_columns():
    on = train(**SMALL, stability_every=7)
    off = train(**SMALL, track_stability=False)
    for a, b in zip(on.metrics, off.metrics, strict=True):
        for key in (
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "test_acc",
            "val_acc_before_prune",
            "params",
        ):
            assert a[key] == b[key], key
        assert "flips_train" not in b
    first, cut, last = on.metrics
    assert first["flips_train"] is None and first["event_val"] is None and first["train_eval_acc"] > 0
    assert cut["pruned"] and cut["cut_flips_train"] is not None and cut["cut_fixes_val"] is not None
    assert last["cut_flips_train"] is None and isinstance(last["event_train"], bool)
    assert all(r["step_measures"] >= 1 for r in on.metrics)
    assert len(on.model.state_dict()) == len(off.model.state_dict())


def test_resume_continues_the_stability_chains(tmp_path):
    full = train(out=tmp_path / "full", **SMALL)

    def kill(epoch: int, batch: int) -> None:
        if epoch == 3 and batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "cut", batch_callback=kill, **SMALL)
    state = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert state["stability"]["epoch"]["train"].dtype == torch.uint8
    resumed = train(out=tmp_path / "cut", resume=True)
    keep = [k for k in full.metrics[-1] if not k.startswith("seconds_")]
    assert [{k: r[k] for k in keep} for r in resumed.metrics] == [
        {k: r[k] for k in keep} for r in full.metrics
    ]
    assert resumed.metrics[-1]["flips_train"] is not None  # the last epoch compared with the stored one
    assert (tmp_path / "full" / "stability.png").is_file()
    state["stability"]["epoch"]["val"] = torch.ones(5, dtype=torch.uint8)
    torch.save(state, tmp_path / "cut" / CHECKPOINT)
    with pytest.raises(CheckpointError, match="stability"):
        train(out=tmp_path / "cut", resume=True, epochs=4)


def test_the_run_summary_prints_the_stability_counts():
    from types import SimpleNamespace

    from rmtprune.commands.train import summary

    base = {"test_acc": 0.9, "test_loss": 0.3, "params": 10, "layers": {}}
    rows = [
        {"epoch": 1, "pruned": False, **base, "flips_train": None, "flips_val": None},
        {"epoch": 2, "pruned": True, **base, "flips_train": 7, "fixes_train": 1, "event_train": True}
        | {"flips_val": 3, "fixes_val": 2, "event_val": False, "cut_flips_train": 5, "cut_fixes_train": 0}
        | {"cut_event_train": False, "cut_flips_val": 1, "cut_fixes_val": 0, "cut_event_val": False},
    ]
    text = summary(SimpleNamespace(metrics=rows, timings={}, initial_params=10))
    lines = {line.split("  ")[0]: line.split() for line in text.splitlines()}
    assert lines["all epochs"][2:] == ["1", "1", "0", "7.0", "3.0"]
    assert lines["the cuts"][2:] == ["1", "0", "0", "5.0", "1.0"]
    off = summary(SimpleNamespace(metrics=[{**rows[0], "flips_train": None}], timings={}, initial_params=10))
    assert "stability" not in off
