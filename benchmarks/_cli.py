"""Command line of the experiment scripts ``benchmarks/exp_*.py``: the common flags, their quick-mode
defaults, the seeds, the exact command for the results file, and progress lines."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / "bench-cache"
QUICK_OUT = ROOT / "runs" / "bench-quick"
SHARED_DATA = ROOT.parent / "shared" / "data"


def add_common_args(parser: argparse.ArgumentParser, *, seeds: int, epochs: int, name: str) -> None:
    """``--seeds --epochs --quick --out --cache --refresh --threads --data-dir``."""
    parser.add_argument(
        "--seeds",
        default=str(seeds),
        help=f"number of seeds n (runs seeds 0..n-1), or a comma list such as 3,4 or 2, (default {seeds})",
    )
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 seeds, 2 epochs, 6000 training images"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results markdown (default benchmarks/results/{name}.md; with --quick runs/bench-quick/)",
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help="cache of trained models")
    parser.add_argument("--refresh", action="store_true", help="retrain even if a cached run exists")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/")


def setup(args: argparse.Namespace, name: str) -> None:
    """Apply the common flags: threads, data folder, quick-mode defaults, output path."""
    torch.set_num_threads(args.threads)
    if args.data_dir is None and not os.environ.get("RMTPRUNE_DATA") and SHARED_DATA.is_dir():
        args.data_dir = str(SHARED_DATA)
    if args.quick:
        if args.seeds == args._seeds_default:
            args.seeds = "2"
        if args.epochs == args._epochs_default:
            args.epochs = 2
    if args.out is None:
        args.out = (QUICK_OUT if args.quick else RESULTS) / f"{name}.md"
    args.out = Path(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.seed_list = parse_seeds(args.seeds)
    args.command = command_line()
    args.t0 = time.perf_counter()


def parser_for(doc: str, *, seeds: int, epochs: int, name: str) -> argparse.ArgumentParser:
    """An argument parser with the common flags and their defaults remembered (for ``--quick``)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    add_common_args(parser, seeds=seeds, epochs=epochs, name=name)
    parser.set_defaults(_seeds_default=str(seeds), _epochs_default=epochs)
    return parser


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> ``[0..4]``; ``"0,3,7"`` -> ``[0, 3, 7]``."""
    text = str(text).strip()
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    n = int(text)
    if n < 1:
        raise SystemExit(f"--seeds={text} must be >= 1")
    return list(range(n))


def command_line() -> str:
    """The exact command that ran this script, relative to the repository root when possible."""
    argv = list(sys.argv)
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    return "python " + " ".join(shlex.quote(a) for a in argv)


def log(msg: str) -> None:
    """Print a progress line immediately (the runs are long)."""
    print(msg, flush=True)
