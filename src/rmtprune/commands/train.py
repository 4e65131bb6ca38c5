"""``rmtprune train``: train a model on a dataset, pruning it to its RMT rank every few epochs."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from ._options import add_compression_flags, add_flags, compression_overrides, given

#: CLI flag -> (TrainConfig field, type, metavar), for the options that map one to one. The
#: compression options (--rule, --keep-bulk, --ks-max, --min-rank, --exclude, ...) come from
#: :func:`._options.add_compression_flags` and set ``TrainConfig.compression``.
_FLAGS: dict[str, tuple[str, type, str | None]] = {
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
    "--decay-T": ("decay_T", float, "T"),
    "--train-subset": ("train_subset", int, "N"),
    "--test-subset": ("test_subset", int, "N"),
    "--val-size": ("val_size", int, "N"),
    "--stability-every": ("stability_every", int, "STEPS"),
    "--stability-train-examples": ("stability_train_examples", int, "N"),
    "--device": ("device", str, "DEV"),
    "--amp": ("amp", str, None),
}

#: The on/off TrainConfig options: flag -> (field, action, help).
_SWITCHES: dict[str, tuple[str, str, str]] = {
    "--no-prune": ("prune", "store_false", "train without pruning (the baseline)"),
    "--eval-before-prune": (
        "eval_before_prune",
        "store_true",
        "also measure test accuracy just before each cut (one more evaluation per cut)",
    ),
    "--no-track-spectra": (
        "track_spectra",
        "store_false",
        "do not fit the layers' spectra on epochs without a cut (faster on big models)",
    ),
    "--no-track-stability": (
        "track_stability",
        "store_false",
        "do not count accuracy-stability events and flips (saves one evaluation pass per epoch)",
    ),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` and its options (the run's, then every compression option of a cut)."""
    from ..training import LR_SCHEDULES, OPTIMIZERS, TrainConfig
    from ..training.config import AMP_MODES, default_compression

    p = subparsers.add_parser(
        "train",
        help="train a model, pruning it to its RMT rank during training",
        description=(
            "Train a model on a dataset and prune its layers every few epochs to "
            "n_spikes + floor(f * n_bulk) singular triplets (Marchenko-Pastur bulk fit). Writes per-epoch "
            "metrics (CSV, JSON), the pruning decisions, plots, the final model and a checkpoint after "
            "every epoch to --out; --resume continues an interrupted run exactly. The compression "
            "options are those of rmtprune compress; --keep-bulk is the constant f of every cut."
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
    f = p.add_mutually_exclusive_group()  # a constant f, or its linear decay
    add_flags(
        p,
        TrainConfig,
        _FLAGS,
        choices={"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "amp": AMP_MODES},
        where={"decay_T": f},
    )
    for flag, (name, action, text) in _SWITCHES.items():
        p.add_argument(flag, dest=name, action=action, default=argparse.SUPPRESS, help=text)
    add_compression_flags(
        p,
        defaults=default_compression().to_dict(),
        where={"keep_bulk": f},
        aliases={"--cut-last": ["--prune-output"]},
        include_help="layer name patterns pruned (repeatable; default: every supported layer)",
        exclude_help="layer name pattern never pruned (repeatable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice); resume is bit-identical with the same N",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes of this machine with DDP (gloo on the CPU, nccl on CUDA); --batch-size "
        "is the global batch; under torchrun leave it out (see docs/distributed.md)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a collective waits for the other ranks before the run stops with an error "
        "(default 300)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    names = [name for name, _, _ in _FLAGS.values()] + [name for name, _, _ in _SWITCHES.values()]
    p.set_defaults(_names=tuple(names))
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line; the compression ones nested (a partial dict)."""
    out = given(args, args._names)
    compression = compression_overrides(args)
    if compression:
        out["compression"] = compression
    return out


def _table(rows: list[list[str]], right: set[int] | None = None) -> str:
    from .._format import table

    return table(rows[0], rows[1:], right=right or ())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def summary(result: Any) -> str:
    """The final table of a run: accuracy and parameters, per-layer ranks, time spent pruning."""
    m = result.metrics
    if not m:
        return "no epoch was run"
    first, last = m[0], m[-1]
    t = result.timings
    run = sum(t.get(k, 0.0) for k in ("train", "prune", "eval", "spectra", "stability", "io"))
    rows = [
        ["", "epoch", "val acc", "test acc", "test loss", "params"],
        ["built", "0", "-", "-", "-", f"{result.initial_params:,}"],
        [
            "first",
            str(first["epoch"]),
            _pct(first.get("val_acc")),
            f"{100 * first['test_acc']:.2f}%",
            f"{first['test_loss']:.4f}",
            f"{first['params']:,}",
        ],
        [
            "last",
            str(last["epoch"]),
            _pct(last.get("val_acc")),
            f"{100 * last['test_acc']:.2f}%",
            f"{last['test_loss']:.4f}",
            f"{last['params']:,}",
        ],
    ]
    out = [_table(rows, right={1, 2, 3, 4, 5})]
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
            f"spectra {t.get('spectra', 0):.1f} s, stability {t.get('stability', 0):.1f} s, "
            f"files {t.get('io', 0):.1f} s"
        )
    stab = _stability_line(m)
    if stab:
        out.append(stab)
    return "\n\n".join(out)


def _stability_line(metrics: list[dict[str, Any]]) -> str:
    """The run's accuracy stability (rmtprune.training.stability.summarize) in a few lines."""
    from ..training.stability import summarize

    s = summarize(metrics)
    if not s["all"]["count"]:
        return ""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    def cnt(x: int | None) -> str:
        return "-" if x is None else str(x)

    rows = [["stability", "measured", "events train", "events val", "flips train", "flips val"]]
    parts = (("all", "all epochs"), ("cut_epochs", "cut epochs"), ("other_epochs", "other epochs"))
    for key, name in (*parts, ("cuts", "the cuts")):
        p = s[key]
        if p["count"] or key != "cuts":
            rows.append(
                [name, str(p["count"]), cnt(p["events_train"]), cnt(p["events_val"])]
                + [num(p["flips_train"]), num(p["flips_val"])]
            )
    note = (
        "events: training loss down and accuracy down since the previous epoch; flips: mean examples "
        "per epoch (per cut) correct before and wrong after (a fixed evaluation; docs/training.md)"
    )
    return _table(rows, right={1, 2, 3, 4, 5}) + "\n" + note


def _rank_argv(argv: list[str]) -> list[str]:
    """The arguments of ``train`` for each rank: ``argv`` without the command name and ``--nproc``."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif i == 0 and a == "train":
            continue
        elif a in _NPROC:  # argparse takes unambiguous prefixes of --nproc too
            skip = True
        elif a.partition("=")[0] not in _NPROC:
            out.append(a)
    return out


#: ``--nproc`` and the prefixes of it argparse accepts (``--n`` and ``--no...`` are other options).
_NPROC = ("--np", "--npr", "--npro", "--nproc")


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: check what can be checked once, then start the ranks (:mod:`..training.launch`)."""
    import torch

    from ..training import launch as launching
    from ..training.distributed import DEFAULT_TIMEOUT_S
    from ..training.opening import preflight

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--nproc starts the ranks itself; under torchrun (WORLD_SIZE is set) leave it out")
    over = _overrides(args)
    preflight(out=args.out, resume=args.resume, force=args.force, data_dir=args.data_dir, **over)
    device = str(over.get("device", ""))
    if device.startswith("cuda"):
        if ":" in device:
            raise ValueError(
                f"--device {device} with --nproc {args.nproc}: give --device cuda, each rank then takes "
                "the GPU of its local rank"
            )
        if torch.cuda.device_count() < args.nproc:
            raise ValueError(
                f"--nproc {args.nproc} on CUDA needs {args.nproc} GPUs; this machine has "
                f"{torch.cuda.device_count()}"
            )
    argv = getattr(args, "_argv", None)
    if argv is None:
        raise ValueError("--nproc needs the command line (call rmtprune.cli.main)")
    return launching.launch(_rank_argv(list(argv)), args.nproc, args.dist_timeout or DEFAULT_TIMEOUT_S)


def run(args: argparse.Namespace) -> int:
    """Run ``rmtprune train``."""
    import math

    from ..training import train

    if args.nproc < 1:
        raise ValueError(f"--nproc={args.nproc} must be >= 1")
    if args.dist_timeout is not None and not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise ValueError(f"--dist-timeout={args.dist_timeout} must be a positive number of seconds")
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
    if args.nproc > 1:
        return _launch(args)
    rank0 = os.environ.get("RANK", "0") in ("", "0")
    log = None if args.quiet or not rank0 else (lambda line: print(line, flush=True))
    progress_bar = False if args.no_progress else None
    try:
        result = train(
            out=args.out,
            resume=args.resume,
            force=args.force,
            data_dir=args.data_dir,
            log=log,
            progress_bar=progress_bar,
            dist_timeout=args.dist_timeout,
            **_overrides(args),
        )
    except KeyboardInterrupt:
        if not rank0:
            return 130
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
    if not rank0:
        return 0
    print()
    print(summary(result))
    print(f"\nwrote {result.out}/ (metrics.csv, metrics.json, decisions.csv, plots, model, checkpoint)")
    return 0
