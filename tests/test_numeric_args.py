"""Absurd numbers on the command line: one line on stderr, exit status 2, no traceback, nothing written.

``rmtprune train`` and ``rmtprune sparsify`` with learning rates that are infinite, NaN, negative,
beyond float32 or large enough to diverge, seeds beyond torch's generator, ``--device meta``, absurd
epoch counts, a zero batch size and a model too large for any machine. A diverging run names the
epoch and step and suggests a smaller ``--lr``; a diverged epoch never overwrites the last good
checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rmtprune.cli import main
from rmtprune.errors import RmtpruneError
from rmtprune.finetune import DivergedError
from rmtprune.training import CHECKPOINT, PREVIOUS_CHECKPOINT, train

TINY = [
    "--model",
    "mlp:16",
    "--epochs",
    "2",
    "--train-subset",
    "200",
    "--test-subset",
    "50",
    "--batch-size",
    "50",
    "--threads",
    "1",
    "--quiet",
    "--no-progress",
]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; assert exit status 2 and a single ``rmtprune: error:`` line; return the message."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmtprune: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "args,words",
    [
        (["--lr", "inf"], "lr=inf must be a finite number"),
        (["--lr", "nan"], "lr=nan must be a finite number"),
        (["--lr", "-1"], "lr=-1.0 must be a finite number >= 0"),
        (["--lr", "0"], "lr=0.0 must be > 0"),
        (["--lr", "1e308"], "lr=1e+308 must be <= 3.4e+38 (the largest float32)"),
        (["--momentum", "1e308"], "momentum=1e+308 must be <= 3.4e+38"),
        (["--seed", "-1"], "seed=-1 must be >= 0"),
        (["--seed", "99999999999999999999"], "seed=99999999999999999999 must be <= 9223372036854775807"),
        (["--epochs", "1000000000"], "epochs=1000000000 must be <= 1000000"),
        (["--epochs", "0"], "epochs=0 must be >= 1"),
        (["--batch-size", "0"], "batch_size=0 must be >= 1"),
        (["--device", "meta"], "device='meta' holds no data"),
        (["--device", "xla"], "device='xla' is not supported for training"),
        (["--device", "cuda:99"], "device='cuda:99' asked for but"),
        (["--device", "banana"], "device='banana' is not a torch device"),
        (["--model", "mlp:40000000,40000000"], "more than the"),
        (["--threads", "0"], "--threads=0 must be >= 1"),
        (["--threads", "100000"], "--threads=100000 must be <= "),
    ],
)
def test_train_refuses_absurd_numbers(capsys, tmp_path, args, words):
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["train", "--out", str(out), *TINY, *args])
    assert words in line
    assert not out.exists()


@pytest.mark.parametrize("args", [["--seed", "1e20"], ["--epochs", "1e9"], ["--batch-size", "1.5"]])
def test_train_non_integers_are_argparse_errors(capsys, tmp_path, args):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(out), *TINY, *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"argument {args[0]}: invalid int value: '{args[1]}'" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("lr", ["1e30", "1e38"])
def test_train_divergence_is_one_line_and_writes_nothing(capsys, tmp_path, lr):
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["train", "--out", str(out), *TINY, "--lr", lr])
    assert "training diverged in epoch 1, step " in line and "lower the learning rate (--lr, now" in line
    assert not out.exists()


def test_train_divergence_in_an_existing_directory_leaves_it_as_it_was(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["train", "--out", str(out), *TINY, "--lr", "1e30"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_diverged_epoch_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(
        model="mlp:16", train_subset=200, test_subset=50, batch_size=50, prune=False, track_spectra=False
    )
    train(out=out, epochs=1, **kw)
    good = (out / CHECKPOINT).read_bytes()
    names = sorted(p.name for p in out.iterdir())

    # The loss turns NaN at the third batch of epoch 2 (as when the weights blow up).
    blown = []
    real = torch.nn.functional.cross_entropy

    def loss(logits, y, *args, **kwargs):
        value = real(logits, y, *args, **kwargs)
        return value * math.nan if blown else value

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss)

    def callback(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 2):
            blown.append(True)

    with pytest.raises(DivergedError, match=r"training diverged in epoch 2, step 3 of 4: the loss is nan"):
        train(out=out, resume=True, epochs=3, batch_callback=callback)
    assert (out / CHECKPOINT).read_bytes() == good
    assert not (out / PREVIOUS_CHECKPOINT).exists()
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary file, no epoch-2 table


def test_diverged_error_is_a_user_error():
    assert issubclass(DivergedError, RmtpruneError) and issubclass(DivergedError, FloatingPointError)


SPARSIFY = ["--model", "mlp:32", "--dataset", "mnist", "--train-subset", "200", "--cycle-steps", "3"]


@pytest.mark.parametrize(
    "lr,words",
    [
        ("inf", "lr=inf must be in (0, inf)"),
        ("nan", "lr=nan must be in (0, inf)"),
        ("-1", "lr=-1.0 must be in (0, inf)"),
        ("1e308", "lr=1e+308 must be <= 3.4e+38, the largest float32 of the weights"),
        ("1e30", "fine-tuning diverged at step "),
    ],
)
def test_sparsify_refuses_absurd_learning_rates(capsys, tmp_path, lr, words):
    out = tmp_path / "out.safetensors"
    line = _one_line_error(
        capsys,
        [
            "sparsify",
            *SPARSIFY,
            "--finetune-epochs",
            "0.05",
            "--quiet",
            "--no-progress",
            "--lr",
            lr,
            str(out),
        ],
    )
    assert words in line
    assert list(Path(tmp_path).iterdir()) == []
