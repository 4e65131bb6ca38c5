"""SIGKILL during ``rmtprune train`` checkpointing: the checkpoint is always a complete one.

A subprocess trains a tiny MLP on a small MNIST subset and is killed with SIGKILL at seeded
points: inside the checkpoint write (after a random fraction of its bytes), with the new file
complete but not renamed, between the rotation of ``checkpoint.prev.pt`` and the rename of
``checkpoint.pt``, just after both renames, and at a random moment of the run (no hook). The
points inside the write use the test hook ``_RMTPRUNE_TEST_KILL=EPOCH:STAGE[:FRACTION]`` of
:mod:`rmtprune.training`, which makes the process SIGKILL itself there. After every kill
``checkpoint.pt`` is either the complete old file or the complete new one; ``--resume`` then ends
with exactly the metrics of an uninterrupted run, and no temporary file survives the next run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmtprune.cli import main
from rmtprune.training import _KILL_ENV, _KILL_STAGES, CHECKPOINT, PREVIOUS_CHECKPOINT, _read_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

EPOCHS = 6
ARGS = [
    "--dataset",
    "mnist",
    "--model",
    "mlp:32",
    "--epochs",
    str(EPOCHS),
    "--train-subset",
    "600",
    "--test-subset",
    "100",
    "--batch-size",
    "100",
    "--lr",
    "0.05",
    "--prune-every",
    "2",
    "--seed",
    "1",
    "--threads",
    "1",
    "--quiet",
    "--no-progress",
]
COMPARED = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "params", "lr", "pruned", "layers")
CODE = "import sys; from rmtprune.cli import main; sys.exit(main(sys.argv[1:]))"


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*.rmtprune-*.tmp"))


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _epoch_of(path: Path) -> int | None:
    """The epoch of a checkpoint that loads and passes every check, None when absent; raises otherwise."""
    if not path.exists():
        return None
    return int(_read_checkpoint(path)["epoch"])


def _spawn(out: Path, resume: bool, kill: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(_KILL_ENV, None)
    if kill is not None:
        env[_KILL_ENV] = kill
    argv = ["train", "--out", str(out), *ARGS] + (["--resume"] if resume else [])
    return subprocess.Popen(
        [sys.executable, "-c", CODE, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _metrics(out: Path) -> list[dict]:
    rows = json.loads((out / "metrics.json").read_text())
    return [{k: r[k] for k in COMPARED} for r in rows]


def test_sigkill_while_checkpointing_never_loses_a_complete_checkpoint(tmp_path):
    rng = random.Random(20240610)
    ref = tmp_path / "ref"  # the uninterrupted run, on the other core while the killed ones run
    ref_proc = _spawn(ref, resume=False, kill=None)

    out = tmp_path / "run"
    done = 0  # epochs in the checkpoint so far
    kills = []
    # Two kills at hooked points of the checkpoint write, then one at a random moment.
    for kind in ("hook", "hook", "time"):
        if done >= EPOCHS - 1:
            break
        old = (out / CHECKPOINT).read_bytes() if (out / CHECKPOINT).exists() else None
        resume = old is not None
        if kind == "hook":
            epoch = rng.randint(done + 1, min(done + 2, EPOCHS))
            # The first kill lands inside the write (a torn temporary file), the second later.
            stage = "write" if not kills else rng.choice(_KILL_STAGES[1:])
            spec = f"{epoch}:{stage}:{rng.uniform(0.02, 0.98):.3f}"
            proc = _spawn(out, resume, spec)
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == -signal.SIGKILL, err.decode()
        else:
            spec = "random moment"
            proc = _spawn(out, resume, None)
            t0 = time.monotonic()
            inode = os.stat(out / CHECKPOINT).st_ino if old is not None else None
            while _inode(out / CHECKPOINT) in (None, inode):  # wait for the next save, then a random delay
                assert proc.poll() is None and time.monotonic() - t0 < 180, "run ended before its first save"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)  # reaped: its pid is gone, so its temporary folders count as stale
        kills.append(spec)

        latest = _epoch_of(out / CHECKPOINT)  # loads and validates, or the test fails here
        prev = _epoch_of(out / PREVIOUS_CHECKPOINT)
        if kind == "hook" and stage != "saved":  # killed before the rename: the complete old file
            assert latest == (epoch - 1 or None), spec
            if epoch == done + 1:  # the file the run started from, byte for byte
                assert (out / CHECKPOINT).read_bytes() == old if old is not None else latest is None, spec
            assert _temps(out), f"{spec}: the kill did not land inside the write"
        elif kind == "hook":  # killed just after the rename: the complete new file
            assert latest == epoch, spec
        else:
            assert latest is not None and latest >= done, spec
        if prev is not None:
            assert latest is not None and prev == latest - 1 or prev == latest, spec
        done = latest or 0

    assert len(kills) == 3, kills
    # Continue to the end; the result is exactly the uninterrupted run's.
    argv = ["train", "--out", str(out), *ARGS] + (["--resume"] if done else [])
    assert main(argv) == 0, kills
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err.decode()
    want = _metrics(ref)
    assert len(want) == EPOCHS
    assert _metrics(out) == want, kills
    assert _temps(out) == [], kills  # every killed writer's leftovers were removed by the next run
    assert _epoch_of(out / CHECKPOINT) == EPOCHS and _epoch_of(out / PREVIOUS_CHECKPOINT) == EPOCHS - 1
