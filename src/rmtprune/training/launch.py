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
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

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


class _StopSignalError(Exception):
    """SIGTERM or SIGHUP reached the launcher: pass it on to the ranks and stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise _StopSignalError(signum)


def _die_with_parent(launcher: int) -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the rank gets SIGTERM if the launcher dies (even by SIGKILL), so no rank is orphaned;
    a launcher already gone before the request took effect ends the rank at once."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:
        os._exit(1)


def launch(argv: list[str], nproc: int, timeout_s: float) -> int:
    """Run ``rmtprune train <argv>`` as ``nproc`` ranks; return the exit status of the whole run.

    ``argv`` are the arguments of ``train`` without ``--nproc``; ``timeout_s`` is the collective
    timeout the ranks use (``--dist-timeout``), which bounds how long a surviving rank can wait.
    Rank 0's output is shown as it comes; another rank's error output is shown only when that rank
    failed first (otherwise it repeats rank 0's line). SIGINT, SIGTERM and SIGHUP are passed on.
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
    errs: list[Any] = []
    handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for rank in range(nproc):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            err = None if rank == 0 else tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
            errs.append(err)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "rmtprune", "train", *argv],
                    env=env,
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=functools.partial(_die_with_parent, os.getpid())
                    if sys.platform.startswith("linux")
                    else None,
                )
            )
        return _watch(procs, timeout_s, errs)
    except (KeyboardInterrupt, _StopSignalError) as exc:
        sig = exc.signum if isinstance(exc, _StopSignalError) else signal.SIGINT
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
        _wait_all(procs, _GRACE_S)
        name = signal.Signals(sig).name
        print(f"rmtprune: {name}: every rank was stopped", file=sys.stderr)
        return 130 if sig == signal.SIGINT else 128 + int(sig)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for err in errs:
            if err is not None:
                err.close()


def _wait_all(procs: list[subprocess.Popen[bytes]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))


def _show(err: Any) -> None:
    """A rank's captured error output, on the launcher's."""
    if err is None:
        return
    err.seek(0)
    sys.stderr.write(err.read().decode(errors="replace"))
    sys.stderr.flush()


def _watch(procs: list[subprocess.Popen[bytes]], timeout_s: float, errs: list[Any]) -> int:
    """Wait for every rank; after the first failure, give the others ``timeout_s`` + grace, then stop them."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            break
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)
    # A rank other than 0 first when several failed in the same poll: rank 0's output is always
    # shown, another rank's only when it is named here.
    first = next((r for r in failed if r != 0), failed[0])
    first_code = procs[first].returncode
    _wait_all(procs, timeout_s + _GRACE_S)
    stopped = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in stopped:
        procs[r].kill()
        procs[r].wait()
    _show(errs[first])
    if first_code == 130 or first_code == -signal.SIGINT:
        return 130
    if all(p.returncode == 2 for p in procs):  # bad input every rank found alike: rank 0 said it
        return 2
    tail = ""
    if stopped:
        waited = timeout_s + _GRACE_S
        tail = f"; rank(s) {', '.join(map(str, stopped))} did not stop within {waited:g} s and were killed"
    print(
        f"rmtprune: error: rank {first} of {len(procs)} {_status(first_code)}; the run stopped{tail}",
        file=sys.stderr,
    )
    return 1
