"""Pruning under torch.distributed: 2 gloo processes on the CPU against the one-process run.

The 2-process runs are real ``rmtprune train --nproc 2`` launches (subprocesses, bounded by a
timeout); the one-process reference runs in this process with the same global batch and seed.
Tolerance: the per-epoch ranks must be equal and the losses and accuracies agree to 1e-4 (the
only difference is the order of floating-point sums across the two ranks' gradients).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.errors import DistributedError
from rmtprune.training import distributed
from rmtprune.zoo.data import Dataset, FastLoader, ShardedLoader

RUN = [
    "--dataset", "digits", "--model", "mlp:64", "--epochs", "3", "--batch-size", "64", "--lr", "0.05",
    "--seed", "1", "--prune-every", "1", "--keep-bulk", "0.3", "--eval-before-prune", "--no-progress",
    "--threads", "1",
]  # fmt: skip
TIMEOUT = 240  # seconds for one launch (two processes importing torch on a busy 2-core machine)


def _launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "rmtprune", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=e)


def _metrics(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def _ranks(rows: list[dict]) -> list[dict[str, int]]:
    return [{name: s["rank"] for name, s in r["layers"].items()} for r in rows]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = _launch("--out", str(out), "--nproc", "2", *RUN)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_two_process_run_matches_one_process(two_process_run, tmp_path):
    from rmtprune.cli import main

    one = tmp_path / "one"
    assert main(["train", "--out", str(one), *RUN]) == 0
    a, b = _metrics(one), _metrics(two_process_run)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert _ranks(a) == _ranks(b)
    assert all(r["pruned"] for r in b) and b[0]["layers"]["fc1"]["rank"] < 64  # fc1 of mlp:64 was cut
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "train_acc", "val_acc", "test_loss", "test_acc", "test_acc_before_prune"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-4), (rb["epoch"], key)
    # rank 0 alone wrote the run, and the model it wrote loads and is factored
    model = rmtprune.load(two_process_run / "model.safetensors")
    assert rmtprune.is_compressed(model)


def test_a_killed_rank_stops_the_others_and_the_run_resumes_on_every_rank(two_process_run, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = _launch(
        "--out", str(out), "--nproc", "2", "--dist-timeout", "20", *RUN,
        env={"_RMTPRUNE_TEST_KILL_RANK": "1:2"},  # rank 1 kills itself in epoch 2
    )  # fmt: skip
    assert time.monotonic() - t0 < TIMEOUT
    assert res.returncode == 1
    assert "rank 1 of 2 was killed by SIGKILL; the run stopped" in res.stderr
    assert "did not stop" not in res.stderr  # rank 0 ended by itself (it did not hang) ...
    assert "rank 0 of 2:" in res.stderr  # ... with its own one-line error
    assert "Traceback" not in res.stderr
    assert [r["epoch"] for r in _metrics(out)] == [1]  # epoch 1's checkpoint is intact
    # --resume restores every rank from it: the run ends as the uninterrupted one did
    res = _launch("--out", str(out), "--nproc", "2", "--resume", "--no-progress", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    got, want = _metrics(out), _metrics(two_process_run)
    assert _ranks(got) == _ranks(want)
    for rg, rw in zip(got, want, strict=True):
        for key in ("train_loss", "test_loss", "test_acc", "params", "flips_val", "cut_flips_train"):
            want = rw[key] if rw[key] is None else pytest.approx(rw[key], rel=1e-9, abs=1e-12)
            assert rg[key] == want, (rg["epoch"], key)


def test_bad_launch_arguments_fail_before_any_process_starts(tmp_path, capsys):
    from rmtprune.cli import main

    assert main(["train", "--out", str(tmp_path / "a"), "--nproc", "0", *RUN]) == 2
    assert "--nproc=0 must be >= 1" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "b"), "--nproc", "2", *RUN, "--dataset", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ in-process, one-rank groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of one rank in this process (DDP and FSDP can be built on the CPU)."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 120), nn.ReLU(), nn.Linear(120, 10))


def test_update_rewraps_ddp_and_prune_refuses_the_wrapper(one_rank_group):
    model = nn.parallel.DistributedDataParallel(_net(), find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    pruner = rmtprune.RMTPruner(every=1, keep_bulk=0.2)
    with pytest.raises(TypeError, match=r"pruner.update\(model, epoch, optimizer\)"):
        pruner.prune(model, 1, opt)
    new, opt2 = pruner.update(model, 1, opt)
    assert isinstance(new, nn.parallel.DistributedDataParallel) and new is not model and opt2 is opt
    assert new.find_unused_parameters and rmtprune.is_compressed(new.module)
    # the new wrapper trains the factors: every parameter of the optimizer gets a gradient
    opt.zero_grad()
    nn.functional.cross_entropy(new(x), y).backward()
    assert all(p.grad is not None for g in opt.param_groups for p in g["params"])
    # not an epoch of the schedule: nothing happens, the same wrapper comes back
    assert rmtprune.RMTPruner(every=2).update(new, 1, opt) == (new, opt)


def test_fsdp_is_refused_but_factored_layers_train_under_it(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    pruner = rmtprune.RMTPruner(every=1)
    sharded = fully_shard(_net(), mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match="does not support FSDP-sharded models"):
        pruner.update(sharded, 1, None)
    # a model factored beforehand is ordinary modules: FSDP shards and trains it
    net, _ = rmtprune.compress(_net(), rule="fixed", rank=8, factor_only_if_smaller=False)
    fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    before = nn.functional.cross_entropy(net(x), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(net(x), y)) < float(before.detach())


def test_check_same_and_text_broadcast_on_one_rank(one_rank_group):
    assert distributed.world() == (0, 1)
    assert distributed.broadcast_text("plan") == "plan"
    distributed.check_same("anything", "plans")  # one rank: nothing to compare
    assert distributed.all_reduce_sums([1.0, 2.5]) == [1.0, 2.5]


def test_distributed_error_is_one_line_for_the_cli():
    err = DistributedError("rank 0 of 2: reducing the metrics failed")
    assert isinstance(err, rmtprune.errors.RmtpruneError) and isinstance(err, RuntimeError)


# ------------------------------------------------------------------ the sharded loader


def test_sharded_batches_union_to_the_one_process_batches():
    ds = Dataset("t", "train", torch.arange(23.0).view(23, 1), torch.arange(23), 10, (1, 1, 1))
    ref = [y.tolist() for _, y in FastLoader(ds, 8, shuffle=True, generator=torch.Generator().manual_seed(3))]
    shards = [
        list(ShardedLoader(ds, 8, r, 3, shuffle=True, generator=torch.Generator().manual_seed(3)))
        for r in range(3)
    ]
    for step, want in enumerate(ref):
        got = sorted(v for r in range(3) for v in shards[r][step][1].tolist())
        assert got == sorted(want)
        assert all(shards[r][step][2] == pytest.approx(3 / len(want)) for r in range(3))
    # a last global batch smaller than the world: the empty rank gets one row with weight 0
    tiny = Dataset("t", "train", torch.arange(9.0).view(9, 1), torch.arange(9), 10, (1, 1, 1))
    last = [list(ShardedLoader(tiny, 8, r, 3))[-1] for r in range(3)]
    assert [len(b[1]) for b in last] == [1, 1, 1] and [b[2] for b in last] == [3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rank"):
        ShardedLoader(ds, 8, 3, 3)
