"""Output of the benchmarks: markdown tables, the results file (written atomically with the date, the
machine and the exact command), figures on the Agg canvas and raw JSON numbers."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _cli import log
from _env import git_revision, training_code

from rmtprune._atomic import atomic_path, atomic_write_text


def machine() -> str:
    """Short description of the machine, e.g. ``2 CPU cores, no GPU``."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}"


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
        f"- revision: {git_revision()} (training code {training_code()}, the key of cached trained models)",
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


def stability_pointer() -> str:
    """The section that points to the accuracy-stability runs of this recipe (exp_stability.py, issue 16),
    so a rerun of an experiment script keeps the pointer (its numbers live in exp_stability.md)."""
    return (
        "## Accuracy stability (issue 16; separate runs)\n\n"
        "Not measured by this script: [exp_stability.md](exp_stability.md) "
        "(`python benchmarks/exp_stability.py`, pre-registered) counts, for this recipe's dense and "
        "pruned arms, the instability events (training loss down, accuracy down) and the examples "
        "flipped correct -> wrong per epoch and by each cut."
    )


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
