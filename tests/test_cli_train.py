"""Tests of the ``rmtprune train`` and ``rmtprune demo`` commands (tiny runs on the bundled digits)."""

from __future__ import annotations

import json

import pytest
import torch

import rmtprune.training.trainer as trainer
from rmtprune.cli import main
from rmtprune.training import CHECKPOINT, load_checkpoint
from rmtprune.zoo.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(out, *extra: str) -> list[str]:
    return [
        "train",
        "--out",
        str(out),
        "--dataset",
        "digits",
        "--model",
        "mlp:48",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--seed",
        "1",
        "--no-progress",
        *extra,
    ]


def test_train_prints_epochs_and_a_final_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                out,
                "--prune-every",
                "1",
                "--keep-bulk",
                "0.3",
                "--l1",
                "1e-6",
                "--l2",
                "1e-6",
                "--eval-before-prune",
            )
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "epoch   1/2" in text and "epoch   2/2" in text
    assert "first" in text and "last" in text and "pruning" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics] == [1, 2]
    assert all(r["pruned"] and r["test_acc_before_prune"] is not None for r in metrics)
    assert "test acc before the cut" in text and "% of the training time" in text
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["prune_every"], cfg["compression"]["keep_bulk"], cfg["l1"]) == (1, 0.3, 1e-6)
    assert (out / "decisions.csv").is_file() and (out / "ranks.png").is_file()


def test_decay_and_keep_bulk_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_args(tmp_path / "run", "--keep-bulk", "0.3", "--decay-T", "100"))
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'; valid datasets: mnist, fashion-mnist, digits"),
        (["--model", "lstm:4"], "unknown model family 'lstm'"),
        (["--keep-bulk", "1.5"], "keep_bulk=1.5 must be in [0, 1]"),
        (["--resume"], "no checkpoint to resume"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, extra, message):
    assert main(_args(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmtprune: error: ") and message in err
    assert "Traceback" not in err


def test_unwritable_output_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_args(tmp_path / "file" / "run")) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = trainer._run_epoch

    def interrupt_in_epoch_2(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(run, epoch)

    monkeypatch.setattr(trainer, "_run_epoch", interrupt_in_epoch_2)
    assert main(_args(out, "--no-prune")) == 130
    captured = capsys.readouterr()
    assert "--resume" in captured.err and "interrupted during epoch 2" in captured.out
    assert load_checkpoint(out)[0]["epoch"] == 1
    monkeypatch.undo()

    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [1, 2]
    assert (out / CHECKPOINT).is_file()


def test_resume_with_a_changed_option_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--no-prune", "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.9"]) == 2
    assert "lr=0.9 differs from the run being resumed (lr=0.05)" in capsys.readouterr().err


# -- demo ---------------------------------------------------------------------------------------


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    """No MNIST anywhere and no way to download it (a refused local port), so the demo falls back."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("RMTPRUNE_DATA", str(empty))
    monkeypatch.setenv("RMTPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RMTPRUNE_MIRRORS", "http://127.0.0.1:9/")
    return empty


def test_demo_falls_back_to_digits_and_prints_a_before_after_table(tmp_path, capsys, monkeypatch, no_mnist):
    import rmtprune
    from rmtprune.commands import demo

    monkeypatch.setattr(demo, "DEMO_EPOCHS", {"mnist": 1, "digits": 3})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "falling back to scikit-learn's bundled 8x8 digits" in text
    for word in ("test accuracy", "parameters", "latency (batch 256, median)", "faster"):
        assert word in text
    ft = "+ fine-tune (5 ep)"
    for label in ("dense ", f"dense {ft}", "compressed (the cut)", f"compressed {ft}"):
        assert label in text
    assert "change, no fine-tune" in text and "change, both fine-tuned" in text
    assert "compressed + fine-tune vs dense + the same fine-tune:" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits"
    assert summary["after"]["params"] < summary["before"]["params"]
    assert summary["before"]["test_acc"] > 0.8
    # The dense control got the same fine-tune; the headline is measured against it.
    assert summary["dense_finetuned"]["params"] == summary["before"]["params"]
    assert summary["dense_finetuned"]["epochs"] == summary["finetuned"]["epochs"] == 5
    assert summary["dense_finetuned_acc"] == summary["dense_finetuned"]["test_acc"]
    assert summary["delta_pt_vs_dense_finetuned"] == pytest.approx(
        100 * (summary["finetuned"]["test_acc"] - summary["dense_finetuned_acc"])
    )
    assert summary["finetune"]["split"] == "train"
    assert summary["data"]["train_size"] == len(load_dataset("digits", "train"))
    assert "dense + fine-tune (5 ep)" in (out / "summary.md").read_text()
    assert (out / "esd_fc1.png").stat().st_size > 10_000
    model = rmtprune.load(out / "model.safetensors")  # rebuilt from the recorded spec
    assert sum(p.numel() for p in model.parameters()) == summary["after"]["params"]


def test_demo_gives_the_dense_model_the_identical_fine_tune(tmp_path, capsys, monkeypatch, no_mnist):
    from rmtprune.commands import demo

    monkeypatch.setattr(demo, "DEMO_EPOCHS", {"mnist": 1, "digits": 1})
    monkeypatch.setattr(demo, "DEMO_FINETUNE", {"mnist": 1, "digits": 1})
    calls = []
    real = demo.finetune

    def spy(model, data, epochs, lr, seed, *args, **kwargs):
        calls.append((sum(p.numel() for p in model.parameters()), data, epochs, lr, seed, args, kwargs))
        return real(model, data, epochs, lr, seed, *args, **kwargs)

    monkeypatch.setattr(demo, "finetune", spy)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress", "--seed", "3"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert len(calls) == 2
    (n_comp, *recipe_comp), (n_dense, *recipe_dense) = calls
    assert recipe_comp[0] is recipe_dense[0]  # the very same dataset object
    assert recipe_comp == recipe_dense == [recipe_comp[0], 1, demo.DEMO_FINETUNE_LR, 3, (), {}]
    assert recipe_comp[0].split == "train"
    assert (n_comp, n_dense) == (summary["after"]["params"], summary["before"]["params"])


def test_demo_fine_tune_batch_order_depends_on_the_seed_only():
    """Equal seeds give equal batches (the global generator does not matter), so the dense control
    and the compressed model are fine-tuned on the same data in the same order."""
    from rmtprune.commands import demo

    data = load_dataset("digits", "train")
    weights = []
    for global_seed in (1, 2):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        torch.nn.init.zeros_(model[1].weight)
        torch.nn.init.zeros_(model[1].bias)
        torch.manual_seed(global_seed)
        demo.finetune(model, data, 1, 0.01, seed=5)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert weights[0].abs().sum() > 0


def test_demo_unwritable_output(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file" / "demo")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_ctrl_c_in_the_first_epoch_leaves_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_run_epoch", interrupt)
    assert main(_args(out, "--no-prune")) == 130
    err = capsys.readouterr().err
    assert "before the first epoch was completed; nothing was saved" in err and "--resume" not in err
    assert not out.exists()


def test_resume_of_a_crafted_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    d: dict = {"format": "rmtprune-train-checkpoint", "version": 1}
    d["config"] = d  # self-referential
    torch.save(d, out / CHECKPOINT)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contains itself" in err and "Traceback" not in err


def test_train_takes_every_compression_option(tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--epochs", "1", "--prune-every", "1", "--rule", "energy", "--energy", "0.5", "--alpha", "0.2"]
    extra += ["--exclude", "head", "--prune-output", "--svd-dtype", "float32"]
    assert main(_args(out, *extra)) == 0
    comp = json.loads((out / "config.json").read_text())["compression"]
    assert (comp["rule"], comp["energy"], comp["alpha"], comp["exclude"]) == ("energy", 0.5, 0.2, ["head"])
    assert (comp["protect_last"], comp["svd_dtype"], comp["keep_bulk"]) == (False, "float32", 0.45)
    decisions = json.loads((out / "decisions.json").read_text())
    assert {d["layer"]: d["action"] for d in decisions}["head"] == "skip"
    capsys.readouterr()
    # --ratio alone means the fixed rule, as in rmtprune compress; a resume may not change it.
    assert main(["train", "--out", str(out), "--resume", "--ratio", "0.5"]) == 2
    assert "rule='fixed' differs from the run being resumed (rule='energy')" in capsys.readouterr().err


def test_train_help_lists_the_compression_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    flags = ("--rule", "--keep-bulk", "--alpha", "--beta", "--ks-max", "--min-rank", "--energy", "--ratio")
    flags += ("--rank", "--sigma", "--svd-dtype", "--include", "--exclude", "--cut-last, --prune-output")
    assert all(flag in text for flag in flags)
