"""``rmtprune train --nproc N``: run one training in ``N`` processes on this machine, like ``torchrun``.

Each rank is ``python -m rmtprune train ...`` with the arguments it was given (without
``--nproc``) and the environment ``torchrun`` would set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``); :func:`rmtprune.train`
joins the process group from it. Rank 0 prints and writes; the other ranks are quiet.

The launcher watches its ranks: when one exits with an error or is killed, the others are given
the collective timeout (plus a few seconds) to fail on their own with their one-line error, then
stopped; the launcher names the first rank that failed and exits 1. Ctrl-C is passed on to every
rank (exit 130), and rank 0 leaves its last complete checkpoint for ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["launch", "free_port", "RANK_ENV"]

#: The environment variables of a rank (set by ``torchrun`` or by :func:`launch`).
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: Seconds the launcher waits, beyond the collective timeout, for the other ranks to stop on their own.
_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous of the ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def launch(argv: list[str], nproc: int, timeout_s: float) -> int:
    """Run ``rmtprune train <argv>`` as ``nproc`` ranks; return the exit status of the whole run.

    ``argv`` are the arguments of ``train`` without ``--nproc``; ``timeout_s`` is the collective
    timeout the ranks use (``--dist-timeout``), which bounds how long a surviving rank can wait.
    """
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(nproc):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "rmtprune", "train", *argv],
                    env=env,
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                )
            )
        return _watch(procs, timeout_s)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        _wait_all(procs, _GRACE_S)
        print("rmtprune: interrupted; every rank was stopped", file=sys.stderr)
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_all(procs: list[subprocess.Popen[bytes]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))


def _watch(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> int:
    """Wait for every rank; after the first failure, give the others ``timeout_s`` + grace, then stop them."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            break
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)
    first = failed[0]
    first_code = procs[first].returncode
    _wait_all(procs, timeout_s + _GRACE_S)
    stopped = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in stopped:
        procs[r].kill()
        procs[r].wait()
    if first_code == 130 or first_code == -signal.SIGINT:
        return 130
    tail = ""
    if stopped:
        waited = timeout_s + _GRACE_S
        tail = f"; rank(s) {', '.join(map(str, stopped))} did not stop within {waited:g} s and were killed"
    print(
        f"rmtprune: error: rank {first} of {len(procs)} {_status(first_code)}; the run stopped{tail}",
        file=sys.stderr,
    )
    return 1
