"""Shared helpers of the experiment scripts ``benchmarks/exp_*.py`` (not part of the library).

Command-line flags common to every experiment, cached training runs (a trained model is stored
under ``runs/bench-cache/`` keyed by a hash of its full :class:`rmtprune.TrainConfig`, so a rerun or
another experiment reuses it), mean +- std formatting, markdown tables, figures on the Agg canvas,
and the results file, written atomically with the date, the machine and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtprune._atomic import atomic_path, atomic_write_text
from rmtprune.training import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / "bench-cache"
QUICK_OUT = ROOT / "runs" / "bench-quick"
SHARED_DATA = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------- command line


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


def machine() -> str:
    """Short description of the machine, e.g. ``2 CPU cores, no GPU``."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}"


def log(msg: str) -> None:
    """Print a progress line immediately (the runs are long)."""
    print(msg, flush=True)


# ----------------------------------------------------------------------------- cached training


#: The TrainConfig fields that change what is trained: the cache key. Fields added to TrainConfig
#: later (bookkeeping such as ``eval_before_prune``) do not invalidate cached runs.
KEY_FIELDS = (
    "dataset", "model", "epochs", "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "lr_step",
    "lr_gamma", "l1", "l2", "batch_size", "seed", "prune", "prune_every", "prune_start", "keep_bulk",
    "decay_T", "ks_max", "min_rank", "keep_output_rank", "exclude", "train_subset", "test_subset",
)  # fmt: skip
_KEY_DEFAULTS = {"keep_output_rank": True}


def _key(cfg: TrainConfig | dict[str, Any]) -> str:
    d = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    sub = {k: d.get(k, _KEY_DEFAULTS.get(k)) for k in KEY_FIELDS}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def _find_cached(cache: Path, tag: str, key: str) -> Path | None:
    """The cached run of ``key``: ``<tag>-<key>.pt``, or an older file of the tag whose config matches."""
    path = cache / f"{tag}-{key}.pt"
    if path.is_file():
        return path
    for other in sorted(cache.glob(f"{tag}-*.pt")):
        try:
            run = torch.load(other, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a damaged cache file is simply not used
            continue
        if _key(run["config"]) == key:
            os.replace(other, path)
            return path
    return None


def train_cached(cfg: TrainConfig, args: argparse.Namespace, tag: str, prefix: str = "") -> dict[str, Any]:
    """Train ``cfg`` (or load the cached run of the same config): model, metrics, timings, decisions.

    The returned dict also has ``wall`` (seconds of the run when it was trained) and ``cached``.
    """
    key = _key(cfg)
    path = Path(args.cache) / f"{tag}-{key}.pt"
    found = None if args.refresh else _find_cached(Path(args.cache), tag, key)
    if found is not None:
        run = torch.load(found, map_location="cpu", weights_only=False)
        run["cached"] = True
        log(f"{prefix}cached: {found.name} (test acc {100 * run['metrics'][-1]['test_acc']:.2f}%)")
        return run
    t0 = time.perf_counter()
    result = train(cfg, data_dir=args.data_dir, log=lambda s: log(f"{prefix}{s}"))
    run = {
        "config": cfg.to_dict(),
        "model": result.model,
        "metrics": result.metrics,
        "timings": dict(result.timings),
        "decisions": result.decisions,
        "wall": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(run, tmp)
    run["cached"] = False
    return run


def clone(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode."""
    return copy.deepcopy(model).eval()


def test_metrics(model: nn.Module, data: Any) -> tuple[float, float]:
    """(loss, accuracy) on ``data`` (the full test split)."""
    return evaluate(model, data)


def n_params(model: nn.Module) -> int:
    """Parameters as stored (a factored layer counts its two factors)."""
    return sum(p.numel() for p in model.parameters())


def module_params(model: nn.Module, name: str) -> int:
    """Parameters of the sub-module ``name`` as stored."""
    return sum(p.numel() for p in model.get_submodule(name).parameters())


def layer_rank(model: nn.Module, name: str) -> int | None:
    """Rank of a factored layer, or None when ``name`` is dense."""
    mod = model.get_submodule(name)
    rank = getattr(mod, "rank", None)
    return int(rank) if isinstance(rank, int) else None


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean +- std"`` of ``values * scale``."""
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} +- {s:.{digits}f}"


def fmt_int(v: float) -> str:
    """Thousands separators."""
    return f"{round(v):,}"


# ----------------------------------------------------------------------------- output


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def write_report(args: argparse.Namespace, title: str, sections: Sequence[str]) -> Path:
    """Write the results markdown atomically: title, date, machine, command, wall time, sections."""
    wall = time.perf_counter() - args.t0
    head = [
        f"# {title}",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()} (shared with other jobs; torch threads: {args.threads}), "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `{args.command}`",
        f"- wall time of this invocation: {wall / 60:.1f} min (cached runs are reused; see the per-run "
        "training times in the tables)",
        f"- seeds: {', '.join(map(str, args.seed_list))}; epochs: {args.epochs}"
        + ("; QUICK smoke run (subset of the training data), not a result" if args.quick else ""),
        "",
    ]
    text = "\n".join(head) + "\n" + "\n\n".join(s.strip("\n") for s in sections) + "\n"
    atomic_write_text(args.out, text)
    log(f"wrote {args.out}")
    return args.out


def png_path(args: argparse.Namespace, suffix: str) -> Path:
    """``<out stem>_<suffix>.png`` beside the results markdown."""
    return args.out.with_name(f"{args.out.stem}_{suffix}.png")


def new_figure(width: float = 6.4, height: float = 4.2, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure on the Agg canvas (no pyplot) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes if (ncols > 1 or nrows > 1) else axes[0, 0]


def save_figure(fig: Any, path: Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    log(f"wrote {path}")
    return path


def dump_json(path: Path, data: Any) -> None:
    """Raw numbers beside the markdown, for later plots (atomic)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (int, float)) or hasattr(obj, "__float__"):
            return float(obj)
        return repr(obj)

    atomic_write_text(path, json.dumps(data, indent=1, default=default) + "\n")
