"""Red-team regressions for issue 16's data-parallel launcher (``rmtprune train --nproc N``).

Each test checks one safety promise of docs/distributed.md in this process, without starting
ranks: ``rmtprune.training.launch.launch`` is replaced by a recorder, so a launch that should
have been refused shows up as a recorded call. Each test was a strict xfail until its bug was fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

RUN = [
    "--dataset", "digits", "--model", "mlp:16", "--epochs", "1", "--batch-size", "64", "--train-subset",
    "64", "--no-track-stability", "--no-track-spectra", "--no-progress", "--quiet", "--threads", "1",
]  # fmt: skip


@pytest.fixture
def launched(monkeypatch):
    """The argument lists ``launch`` was called with (it starts nothing and returns 0)."""
    import rmtprune.training.launch as launch_mod

    calls: list[list[str]] = []

    def fake(argv, nproc, timeout_s):
        calls.append(list(argv))
        return 0

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch_mod, "launch", fake)
    return calls


def test_rank_argv_drops_nproc_in_every_spelling():
    from rmtprune.commands.train import _rank_argv

    assert _rank_argv(["train", "--nproc", "2", "--out", "x"]) == ["--out", "x"]
    assert _rank_argv(["train", "--nproc=2", "--out", "x"]) == ["--out", "x"]


def test_rank_argv_drops_an_abbreviated_nproc():
    from rmtprune.commands.train import _rank_argv

    assert _rank_argv(["train", "--npro", "2", "--out", "x"]) == ["--out", "x"]


def test_a_bad_threads_value_is_refused_before_the_ranks_start(tmp_path, launched, capsys):
    from rmtprune.cli import main

    rc = main(["train", "--out", str(tmp_path / "run"), "--nproc", "2", *RUN, "--threads", "999"])
    assert (rc, launched) == (2, [])
    assert "--threads=999 must be <=" in capsys.readouterr().err


def test_an_out_that_cannot_be_created_is_refused_before_the_ranks_start(tmp_path, launched):
    from rmtprune.cli import main

    (tmp_path / "afile").write_text("user data\n")
    rc = main(["train", "--out", str(tmp_path / "afile" / "run"), "--nproc", "2", *RUN])
    assert (rc, launched) == (2, [])
    assert (tmp_path / "afile").read_text() == "user data\n"


def test_a_refused_resume_option_is_refused_before_the_ranks_start(tmp_path, launched, capsys):
    from rmtprune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *RUN]) == 0  # a real one-process run to resume
    capsys.readouterr()
    rc = main(["train", "--out", str(out), "--resume", "--nproc", "2", "--lr", "0.3", "--threads", "1"])
    assert (rc, launched) == (2, [])
    assert "lr=0.3 differs from the run being resumed" in capsys.readouterr().err


def test_a_rank_other_than_0_creates_nothing(tmp_path, monkeypatch):
    from rmtprune.training import distributed, trainer

    class StopError(Exception):
        pass

    def stop(run):
        raise StopError

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setattr(trainer, "_restore", stop)  # stop after _open: no process group needed
    out = tmp_path / "run"
    overrides = {"dataset": "digits", "model": "mlp:16", "epochs": 1, "train_subset": 64}
    with pytest.raises(StopError):
        trainer._train(None, overrides, out, False, False, None, None, False, None, 0.0)
    assert not Path(out).exists()


_FAKE_RANK = """#!/bin/sh
echo $$ >> "{pids}"
exec sleep 60
"""

_LAUNCHER = """
import sys
sys.executable = sys.argv[1]  # each rank is the fake one: it records its pid and sleeps
from rmtprune.training.launch import launch
sys.exit(launch([], 2, 5.0))
"""


def test_sigterm_to_the_launcher_stops_every_rank(tmp_path):
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    fake = tmp_path / "fake_rank"
    fake.write_text(_FAKE_RANK.format(pids=pids))
    fake.chmod(0o755)
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(fake)])
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ranks = [int(v) for v in pids.read_text().split()] if pids.exists() else []
            if len(ranks) == 2:
                break
            time.sleep(0.05)
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        time.sleep(0.5)
        alive = []
        for pid in ranks:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        assert alive == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_failure_while_setting_up_the_run_leaves_no_directory(tmp_path, monkeypatch):
    import rmtprune
    from rmtprune.training import trainer

    real = trainer._restore

    def restore_then_interrupt(run):
        real(run)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_restore", restore_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        rmtprune.train(
            out=out, dataset="digits", model="mlp:16", epochs=1, train_subset=64, track_stability=False
        )
    assert not out.exists()


def test_train_leaves_a_process_group_it_did_not_create(monkeypatch):
    import socket

    import torch.distributed as dist

    import rmtprune

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, where the user's script joined first
        rmtprune.train(dataset="digits", model="mlp:16", epochs=1, train_subset=64, track_stability=False)
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--model", "mlp:abc", "bad token 'abc'"), ("--val-size", "100000", "val_size=100000 must be")],
)
def test_a_bad_model_or_split_is_refused_before_the_ranks_start(
    tmp_path, launched, capsys, option, value, message
):
    from rmtprune.cli import main

    rc = main(["train", "--out", str(tmp_path / "run"), "--nproc", "2", *RUN, option, value])
    assert (rc, launched) == (2, [])
    assert message in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_by_rank_0_after_the_preflight(tmp_path, launched):
    import os

    import rmtprune
    from rmtprune.cli import main
    from rmtprune.training import CHECKPOINT
    from rmtprune.training.resume import load_checkpoint

    out = tmp_path / "run"
    rmtprune.train(
        out=out, dataset="digits", model="mlp:16", epochs=2, train_subset=64, track_stability=False
    )
    latest = out / CHECKPOINT
    os.truncate(latest, latest.stat().st_size // 2)
    assert main(["train", "--out", str(out), "--resume", "--nproc", "2", "--threads", "1", "--quiet"]) == 0
    assert len(launched) == 1
    said: list[str] = []
    load_checkpoint(out, said.append)  # what rank 0 does next, and says through its log
    assert "not a readable checkpoint" in said[0]
