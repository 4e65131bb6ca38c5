"""``rmtprune train``: train a model on a dataset, pruning it to its RMT rank every few epochs."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import Any

#: CLI flag -> TrainConfig field, for the options that map one to one.
_FLAGS: dict[str, tuple[str, type, str | None]] = {
    # flag: (field, type, metavar)
    "--dataset": ("dataset", str, "NAME"),
    "--model": ("model", str, "SPEC"),
    "--epochs": ("epochs", int, "N"),
    "--optimizer": ("optimizer", str, None),
    "--lr": ("lr", float, "LR"),
    "--momentum": ("momentum", float, "M"),
    "--weight-decay": ("weight_decay", float, "WD"),
    "--lr-schedule": ("lr_schedule", str, None),
    "--lr-step": ("lr_step", int, "N"),
    "--lr-gamma": ("lr_gamma", float, "G"),
    "--l1": ("l1", float, "MU1"),
    "--l2": ("l2", float, "MU2"),
    "--batch-size": ("batch_size", int, "N"),
    "--seed": ("seed", int, "N"),
    "--prune-every": ("prune_every", int, "N"),
    "--prune-start": ("prune_start", int, "EPOCH"),
    "--ks-max": ("ks_max", float, "KS"),
    "--min-rank": ("min_rank", int, "K"),
    "--train-subset": ("train_subset", int, "N"),
    "--test-subset": ("test_subset", int, "N"),
    "--device": ("device", str, "DEV"),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` and its options."""
    from ..training import LR_SCHEDULES, OPTIMIZERS, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}
    p = subparsers.add_parser(
        "train",
        help="train a model, pruning it to its RMT rank during training",
        description=(
            "Train a model on a dataset and prune its layers every few epochs to "
            "n_spikes + floor(f * n_bulk) singular triplets (Marchenko-Pastur bulk fit). Writes per-epoch "
            "metrics (CSV, JSON), the pruning decisions, plots, the final model and a checkpoint after "
            "every epoch to --out; --resume continues an interrupted run exactly."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--force",
        action="store_true",
        help="a fresh run may overwrite files of the names it writes already in --out (refused otherwise)",
    )
    p.add_argument("--data-dir", metavar="DIR", default=None, help="directory holding the dataset files")
    choices = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES}
    for flag, (name, typ, metavar) in _FLAGS.items():
        p.add_argument(
            flag,
            dest=name,
            type=typ,
            metavar=metavar,
            choices=choices.get(name),
            default=argparse.SUPPRESS,
            help=helps[name] + ("" if defaults[name] is None else f" (default: {defaults[name]})"),
        )
    f = p.add_mutually_exclusive_group()
    f.add_argument(
        "--keep-bulk",
        dest="keep_bulk",
        type=float,
        metavar="F",
        default=argparse.SUPPRESS,
        help=f"constant fraction f of the bulk kept at each cut (default: {defaults['keep_bulk']})",
    )
    f.add_argument(
        "--decay-T",
        dest="decay_T",
        type=float,
        metavar="T",
        default=argparse.SUPPRESS,
        help="linear decay f(epoch) = max(0, 1 - epoch / T) instead of a constant f",
    )
    p.add_argument(
        "--exclude",
        dest="exclude",
        action="append",
        metavar="PATTERN",
        default=argparse.SUPPRESS,
        help="layer name pattern never pruned (repeatable)",
    )
    p.add_argument(
        "--no-prune",
        dest="prune",
        action="store_false",
        default=argparse.SUPPRESS,
        help="train without pruning (the baseline)",
    )
    p.add_argument(
        "--eval-before-prune",
        dest="eval_before_prune",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also measure test accuracy just before each cut (one more evaluation per cut)",
    )
    p.add_argument(
        "--no-track-spectra",
        dest="track_spectra",
        action="store_false",
        default=argparse.SUPPRESS,
        help="do not fit the layers' spectra on epochs without a cut (faster on big models)",
    )
    p.add_argument(
        "--prune-output",
        dest="keep_output_rank",
        action="store_false",
        default=argparse.SUPPRESS,
        help="let the output (logits) layer be cut below its full rank too (by default it is not)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice); resume is bit-identical with the same N",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(_names=tuple(defaults))
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in args._names if hasattr(args, name)}


def _table(rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(result: Any) -> str:
    """The final table of a run: accuracy and parameters, per-layer ranks, time spent pruning."""
    m = result.metrics
    if not m:
        return "no epoch was run"
    first, last = m[0], m[-1]
    t = result.timings
    run = sum(t.get(k, 0.0) for k in ("train", "prune", "eval", "spectra", "io"))
    rows = [
        ["", "epoch", "test acc", "test loss", "params"],
        ["built", "0", "-", "-", f"{result.initial_params:,}"],
        [
            "first",
            str(first["epoch"]),
            f"{100 * first['test_acc']:.2f}%",
            f"{first['test_loss']:.4f}",
            f"{first['params']:,}",
        ],
        [
            "last",
            str(last["epoch"]),
            f"{100 * last['test_acc']:.2f}%",
            f"{last['test_loss']:.4f}",
            f"{last['params']:,}",
        ],
    ]
    out = [_table(rows, right={1, 2, 3, 4})]
    layers = last.get("layers", {})
    if layers:
        lrows = [["layer", "rank", "n_spikes", "n_bulk", "sigma2", "ks"]]
        for name, s in layers.items():
            lrows.append(
                [
                    name,
                    "-" if s.get("rank") is None else str(s["rank"]),
                    "-" if s.get("n_spikes") is None else str(s["n_spikes"]),
                    "-" if s.get("n_bulk") is None else str(s["n_bulk"]),
                    "-" if s.get("sigma2") is None else f"{s['sigma2']:.3g}",
                    "-" if s.get("ks") is None else f"{s['ks']:.3f}",
                ]
            )
        out.append(_table(lrows, right={1, 2, 3, 4, 5}))
    cuts = sum(1 for r in m if r.get("pruned"))
    if run > 0:
        train_s = t.get("train", 0.0)
        rel = f"{100 * t.get('prune', 0) / train_s:.1f}% of the training time, " if train_s > 0 else ""
        out.append(
            f"time: train {train_s:.1f} s, pruning {t.get('prune', 0):.2f} s over {cuts} cut(s) "
            f"({rel}{100 * t.get('prune', 0) / run:.1f}% of the run), evaluation {t.get('eval', 0):.1f} s, "
            f"spectra {t.get('spectra', 0):.1f} s, files {t.get('io', 0):.1f} s"
        )
    return "\n\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Run ``rmtprune train``."""
    from ..training import train

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} must be >= 1")
        # torch accepts any count, then crashes (segmentation fault) building a huge thread pool.
        cap = 4 * (os.cpu_count() or 1)
        if args.threads > cap:
            raise ValueError(
                f"--threads={args.threads} must be <= {cap} (4 x the {os.cpu_count()} CPUs here)"
            )
        import torch

        torch.set_num_threads(args.threads)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    progress_bar = False if args.no_progress else None
    try:
        result = train(
            out=args.out,
            resume=args.resume,
            force=args.force,
            data_dir=args.data_dir,
            log=log,
            progress_bar=progress_bar,
            **_overrides(args),
        )
    except KeyboardInterrupt:
        from pathlib import Path

        from ..training import CHECKPOINT

        if (Path(args.out).expanduser() / CHECKPOINT).exists():
            print(
                f"rmtprune: interrupted; the last complete checkpoint in {args.out!r} is intact. "
                f"Continue with: rmtprune train --out {shlex.quote(args.out)} --resume",
                file=sys.stderr,
            )
        else:
            print(
                "rmtprune: interrupted before the first epoch was completed; nothing was saved",
                file=sys.stderr,
            )
        return 130
    print()
    print(summary(result))
    print(f"\nwrote {result.out}/ (metrics.csv, metrics.json, decisions.csv, plots, model, checkpoint)")
    return 0
