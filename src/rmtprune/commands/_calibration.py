"""Calibration data and recovery on the command line: ``--calibration``, ``--calibration-samples``, ...

``--calibration SOURCE`` is a dataset name of the zoo (``mnist``, ``fashion-mnist``, ``digits``: a seeded
random subset of its training split) or a UTF-8 text file, tokenized with the model directory's own
tokenizer into non-overlapping windows of ``--calibration-seq-len`` tokens. Shared by ``compress``
and ``sparsify``; ``--recover-steps`` (compress) distils the compressed model towards the dense one
on the same batches (:func:`rmtprune.finetune.recover`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_calibration_args", "calibration_batches", "DATASET_BATCH"]

#: Images per calibration batch for a dataset source.
DATASET_BATCH = 64
#: Largest calibration text read (bytes): calibration needs a few hundred thousand tokens at most.
MAX_TEXT_BYTES = 64 * 2**20


def add_calibration_args(p: argparse.ArgumentParser, *, recover: bool = False) -> None:
    """Add the calibration options (and the recovery ones when ``recover``) to ``p``."""
    g = p.add_argument_group("calibration data (data-aware mode)")
    g.add_argument(
        "--calibration",
        metavar="SOURCE",
        help="a dataset name (mnist, fashion-mnist or fashion, digits: training split) or a text file",
    )
    g.add_argument(
        "--calibration-samples",
        type=int,
        default=128,
        metavar="N",
        help="images or token windows used for calibration (default 128)",
    )
    g.add_argument(
        "--calibration-seq-len",
        type=int,
        default=256,
        metavar="L",
        help="tokens per window of a calibration text (default 256)",
    )
    g.add_argument(
        "--calibration-seed", type=int, default=0, metavar="S", help="which dataset images (default 0)"
    )
    if recover:
        g.add_argument(
            "--recover-steps",
            type=int,
            default=0,
            metavar="N",
            help="distil the compressed model towards the dense one for N steps on the calibration data",
        )
        g.add_argument("--recover-lr", type=float, default=1e-4, metavar="LR", help="recovery learning rate")


def _check(args: argparse.Namespace) -> None:
    for name, lo in (("calibration_samples", 1), ("calibration_seq_len", 2)):
        v = getattr(args, name)
        if not 1 <= lo <= v <= 10**7:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be an integer in [{lo}, 10000000]")
    steps = getattr(args, "recover_steps", 0)
    if steps < 0 or steps > 10**7:
        raise ValueError(f"--recover-steps={steps} must be an integer in [0, 10000000]")
    if steps and not args.calibration:
        raise ValueError("--recover-steps needs --calibration (the recovery trains on the calibration data)")
    lr = getattr(args, "recover_lr", 1e-4)
    if not (0 < lr < 1):
        raise ValueError(f"--recover-lr={lr} must be in (0, 1)")


def calibration_batches(
    args: argparse.Namespace, model_dir: str | None, data_dir: str | None = None
) -> list[Any] | None:
    """The calibration batches ``--calibration`` names (None without it), checked before any work.

    A text file needs a model directory (its tokenizer); a dataset name needs a model that takes
    that dataset's images. ``ValueError`` naming the source otherwise.
    """
    _check(args)
    src = args.calibration
    if not src:
        return None
    from ..zoo.files import DATASETS, _canonical

    try:
        name = _canonical(src)
    except ValueError:
        name = None
    if name is not None and not Path(src).expanduser().is_file():
        import torch

        from ..zoo import data as zdata

        load_dataset = zdata.load_dataset

        ds = load_dataset(name, split="train", data_dir=data_dir)
        g = torch.Generator().manual_seed(int(args.calibration_seed))
        idx = torch.randperm(len(ds), generator=g)[: args.calibration_samples]
        x = ds.x[idx]
        return [x[i : i + DATASET_BATCH] for i in range(0, x.shape[0], DATASET_BATCH)]
    path = Path(src).expanduser()
    if not path.is_file():
        raise ValueError(f"--calibration {src!r} is neither a dataset ({', '.join(DATASETS)}) nor a file")
    if model_dir is None:
        raise ValueError(
            f"--calibration {src!r}: a text file needs a model directory (its tokenizer); "
            "for --model / MODEL_FILE give a dataset name"
        )
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ValueError(f"--calibration {src!r} is larger than {MAX_TEXT_BYTES // 2**20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--calibration {src!r} is not UTF-8 text") from None
    from ..calibration import token_windows
    from ..hf import load_tokenizer

    tok = load_tokenizer(model_dir)
    try:
        return token_windows(tok, text, args.calibration_samples, args.calibration_seq_len)
    except ValueError as exc:
        raise ValueError(f"--calibration {src!r}: {exc}") from None
