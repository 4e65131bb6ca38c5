"""Mixed precision in training (``TrainConfig.amp``): the forward in bfloat16/float16, never a cut.

bfloat16 autocast runs on the CPU, so the whole path is tested here; float16 (with its gradient
scaler) needs CUDA and is refused on the CPU; the ``gpu`` test runs it where there is one.
"""

from __future__ import annotations

import pytest
import torch

import rmtprune
from rmtprune.cli import main
from test_device import _no_half, linalg_dtypes  # noqa: F401 - the fixture is used by name

NO_CUDA = not torch.cuda.is_available()
RUN = dict(dataset="digits", model="mlp:64", epochs=2, batch_size=64, lr=0.05, seed=1, prune_every=1)


def test_bf16_autocast_trains_and_cuts_in_float64(linalg_dtypes):  # noqa: F811
    res = rmtprune.train(amp="bf16", compression={"keep_bulk": 0.3}, **RUN)
    ref = rmtprune.train(compression={"keep_bulk": 0.3}, **RUN)
    _no_half(linalg_dtypes)  # every SVD / eigen step of the cuts and fits: float32 or float64
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # weights stay float32
    assert [r["pruned"] for r in res.metrics] == [True, True]
    # the forward really ran in bfloat16 (the loss differs) and trained as well (within 2 points)
    assert res.metrics[0]["train_loss"] != ref.metrics[0]["train_loss"]
    assert abs(res.final["test_acc"] - ref.final["test_acc"]) < 0.02


def test_amp_is_checked_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        rmtprune.train(amp="fp16", **RUN)
    with pytest.raises(ValueError, match="amp"):
        rmtprune.train(amp="fp8", **RUN)
    assert main(["train", "--out", str(tmp_path / "r"), "--dataset", "digits", "--amp", "fp16"]) == 2
    assert "amp='fp16' needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_amp_is_part_of_what_was_trained(tmp_path):
    out = tmp_path / "run"
    rmtprune.train(out=out, amp="bf16", **{**RUN, "epochs": 1})
    with pytest.raises(rmtprune.errors.RmtpruneError, match="amp='off' differs from the run being resumed"):
        rmtprune.train(out=out, resume=True, epochs=2, amp="off")
    res = rmtprune.train(out=out, resume=True, epochs=2)
    assert res.config.amp == "bf16" and len(res.metrics) == 2


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_training_with_amp_end_to_end(tmp_path, amp, linalg_dtypes):  # noqa: F811
    out = tmp_path / amp
    assert main(["train", "--out", str(out), "--device", "cuda", "--amp", amp, "--no-progress",
                 *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in RUN.items()), [])]) == 0  # fmt: skip
    _no_half(linalg_dtypes)
    model = rmtprune.load(out / "model.safetensors")
    assert rmtprune.is_compressed(model)
