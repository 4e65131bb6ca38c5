"""The files of a training run: rotating checkpoints, the metrics and decision tables, the output directory.

A checkpoint (format ``"rmtprune-train-checkpoint"``, the only "checkpoint" in rmtprune) is
written after every epoch, atomically, the one it replaces kept as ``checkpoint.prev.pt``; it holds
the config, the pruned architecture, weights, optimizer and scheduler state, every random number
generator and the metrics so far. Reading one back and checking it is :mod:`.resume`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path, atomic_write_text
from .._format import json_default
from ..errors import RmtpruneError

__all__ = ["CHECKPOINT", "PREVIOUS_CHECKPOINT", "RUN_FILES", "writable_dir"]

#: File names in the output directory: the latest complete checkpoint and the one before it.
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
_CORRUPT = "checkpoint.corrupt.pt"
_FORMAT = "rmtprune-train-checkpoint"
_VERSION = 1


def _rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
        "loader": loader_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any], loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    loader_gen.set_state(state["loader"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints -------------------------------------------------------------------------------

#: Tests only: ``EPOCH:STAGE[:FRACTION]`` makes the process SIGKILL itself while it writes the
#: checkpoint of epoch EPOCH, at STAGE: ``write`` (after FRACTION of the bytes, default 0.5),
#: ``written`` (temporary file complete, nothing renamed), ``rotated`` (``checkpoint.prev.pt``
#: replaced, ``checkpoint.pt`` not yet) or ``saved`` (both renamed, tables not yet written).
_KILL_ENV = "_RMTPRUNE_TEST_KILL"
_KILL_STAGES = ("write", "written", "rotated", "saved")


def _kill_point(epoch: int) -> tuple[str, float] | None:
    """The (stage, fraction) at which the test hook kills this epoch's checkpoint write, if any."""
    spec = os.environ.get(_KILL_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if int(parts[0]) != epoch or parts[1] not in _KILL_STAGES:
            return None
        return parts[1], float(parts[2]) if len(parts) > 2 else 0.5
    except (IndexError, ValueError):
        return None


def _kill_here(point: tuple[str, float] | None, stage: str) -> None:
    if point is not None and point[0] == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_state(path: Path, state: dict[str, Any], point: tuple[str, float] | None) -> None:
    with open(path, "wb") as fh:
        if point is not None and point[0] == "write":
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            fh.write(data[: int(len(data) * min(max(point[1], 0.0), 1.0))])
            fh.flush()
            os.fsync(fh.fileno())
            _kill_here(point, "write")
        torch.save(state, fh)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a second name of ``src`` (a hard link), or a copy where links are not allowed."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write ``out/checkpoint.pt`` atomically; the one it replaces becomes ``checkpoint.prev.pt``.

    Order: the new checkpoint is written and fsynced under a temporary name; then the current one
    is linked to a temporary name and renamed over ``checkpoint.prev.pt``; then the new one is
    renamed over ``checkpoint.pt``. At every instant ``checkpoint.pt`` is a complete checkpoint
    (the old one, then the new one) and ``checkpoint.prev.pt`` a complete earlier one, so a crash,
    SIGKILL or Ctrl-C anywhere loses at most the epoch being saved. Temporary folders of a killed
    writer are removed by the next write (see :mod:`rmtprune._atomic`).
    """
    latest, prev = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    point = _kill_point(int(state["epoch"]))
    try:
        with atomic_path(latest) as tmp:
            _write_state(tmp, state, point)
            _kill_here(point, "written")
            if latest.exists():
                with atomic_path(prev) as tmp_prev:
                    _link_or_copy(latest, tmp_prev)
            _kill_here(point, "rotated")
        _kill_here(point, "saved")
    except (OSError, RuntimeError) as exc:
        kept = latest if latest.exists() else prev
        note = f"; the last complete checkpoint {str(kept)!r} is kept" if kept.exists() else ""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RmtpruneError(f"could not write checkpoint {str(latest)!r}: {reason}{note}") from exc
    return latest


# -- output files ------------------------------------------------------------------------------


def _write_outputs(out: Path, write: Callable[[], Any]) -> None:
    """Run ``write``; turn a failed write (full disk, permissions) into one clear error."""
    try:
        write()
    except OSError as exc:
        kept = out / CHECKPOINT
        note = f"; the last complete checkpoint {str(kept)!r} is kept" if kept.exists() else ""
        raise RmtpruneError(f"could not write to {str(out)!r}: {exc.strerror or exc}{note}") from exc


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k != "layers"}
    for layer, stats in row.get("layers", {}).items():
        for key, value in stats.items():
            flat[f"{key}[{layer}]"] = value
    return flat


def _csv_text(rows: list[dict[str, Any]]) -> str:
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _write_tables(out: Path, metrics: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=json_default) + "\n")
    atomic_write_text(out / "metrics.csv", _csv_text([_flatten(r) for r in metrics]))
    rows = [{k: v for k, v in d.items() if not isinstance(v, (dict, list))} for d in decisions]
    atomic_write_text(out / "decisions.json", json.dumps(rows, indent=1, default=json_default) + "\n")
    atomic_write_text(out / "decisions.csv", _csv_text(rows))


def writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create directory ``path`` if needed and prove it writable with a real write, or raise.

    Raises :class:`RmtpruneError` with the path and the system's reason (``os.access`` is not
    enough: it says yes to root on a read-only file system).
    """
    out_dir = Path(path).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RmtpruneError(
            f"cannot create output directory {str(out_dir)!r}: {exc.strerror or exc}"
        ) from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RmtpruneError(
            f"output directory {str(out_dir)!r} is not writable: {exc.strerror or exc}"
        ) from exc
    return out_dir


def _remove_empty_run(out_dir: Path, created: bool) -> None:
    """After a fresh run failed before its first checkpoint: remove the directory it created, if
    nothing is in it (a directory that was there before is left alone)."""
    if created:
        with contextlib.suppress(OSError):
            out_dir.rmdir()


#: The files a run writes in its output directory (besides the checkpoints).
RUN_FILES = (
    "config.json",
    "metrics.csv",
    "metrics.json",
    "decisions.csv",
    "decisions.json",
    "accuracy.png",
    "params.png",
    "ranks.png",
    "stability.png",
    "model.safetensors",
    "model.json",
)


def _check_fresh_out(out: str | os.PathLike[str], force: bool) -> None:
    """A fresh run never writes over files already in ``out`` (another run's, or the user's)
    unless ``force``; checked before any work, so nothing is built, trained or written."""
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise RmtpruneError(f"output directory {str(out_dir)!r} exists and is not a directory")
    if not out_dir.is_dir():
        return
    if (out_dir / CHECKPOINT).exists() or (out_dir / PREVIOUS_CHECKPOINT).exists():
        raise RmtpruneError(
            f"output directory {str(out_dir)!r} already holds a run ({CHECKPOINT}); pass resume=True "
            "(--resume) to continue it, or choose another output directory"
        )
    clash = [n for n in RUN_FILES if (out_dir / n).exists()]
    if clash and not force:
        raise RmtpruneError(
            f"output directory {str(out_dir)!r} already has {', '.join(clash[:3])}"
            + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
            + " that this run would overwrite; choose another directory, or pass force=True (--force)"
        )


def _prepare_out(out: str | os.PathLike[str], resume: bool, force: bool = False) -> Path:
    if not resume:
        _check_fresh_out(out, force)
    return writable_dir(out)
