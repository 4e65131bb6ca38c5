"""Experiment 2: Fashion-MNIST MLP, dense vs L1+L2 only vs MP pruning only vs MP pruning + L1+L2.

Four arms, every seed, the same optimiser, learning-rate schedule, batch size and epochs:

- **dense**: no regularisation, no pruning;
- **L1+L2**: ``mu1 * sum|w| + mu2 * sum w**2`` on the weights (METHOD.md section 7);
- **MP pruning**: :class:`rmtprune.RMTPruner` through :func:`rmtprune.train` (cut every layer whose
  bulk fits MP to ``n_spikes + floor(keep_bulk * n_bulk)`` at the scheduled epochs);
- **MP pruning + L1+L2**: both.

Every run tracks the per-layer BEMA fit after every epoch (sigma2, n_spikes, n_bulk, KS), which
experiment 4 (``exp_theorems.py``) reads from the cached runs.

Run: ``python benchmarks/exp_fashion_mlp.py [--seeds 3] [--epochs 6] [--width 500,500] [--quick]``;
writes ``benchmarks/results/exp_fashion_mlp.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _cache import sgd_config, train_cached
from _cli import parser_for, setup
from _measure import layer_rank, n_params, test_metrics
from _report import dump_json, md_table, stability_pointer, write_report
from _stats import ci, fmt_int, pm

from rmtprune.training import TrainConfig
from rmtprune.zoo.data import load_dataset

NAME = "exp_fashion_mlp"
ARMS = ("dense", "l1l2", "mp", "mp+l1l2", "fullrank")
ARM_LABEL = {
    "fullrank": "control: every hidden layer factored at full rank at the first cut (nothing removed)",
    "dense": "dense (no pruning, no L1/L2)",
    "l1l2": "L1+L2 only",
    "mp": "MP pruning only",
    "mp+l1l2": "MP pruning + L1+L2",
}


def add_args(parser: Any) -> None:
    """The flags that define the runs (shared with exp_theorems.py, which reuses the cache)."""
    parser.add_argument("--width", default="500,500", help="hidden widths (default 500,500)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--mu", type=float, default=5e-6, help="L1 and L2 coefficient each (default 5e-6)")
    parser.add_argument("--prune-every", type=int, default=2, help="epochs between cuts (default 2)")
    parser.add_argument("--prune-start", type=int, default=1, help="first cut after this epoch (default 1)")
    parser.add_argument(
        "--keep-bulk",
        type=float,
        default=0.45,
        help="constant bulk fraction kept, with --decay-T 0 (default 0.45)",
    )
    parser.add_argument(
        "--decay-T",
        type=float,
        default=None,
        help="linear decay f(e) = max(0, 1 - e/T) of the bulk kept (default T = epochs; 0: constant)",
    )


def config(args: Any, arm: str, seed: int) -> TrainConfig:
    """The training config of ``arm`` for ``seed``."""
    reg = arm in ("l1l2", "mp+l1l2")
    prune = arm in ("mp", "mp+l1l2", "fullrank")
    compression: dict[str, Any] = {"keep_bulk": args.keep_bulk}
    if arm == "fullrank":  # the re-parametrisation control (issue 14): the cut, nothing removed
        hidden = [f"fc{i + 1}" for i in range(len(args.width.split(",")))]
        compression = {"rule": "fixed", "ratio": 1.0, "factor_only_if_smaller": False, "include": hidden}
    cfg = sgd_config(
        args,
        "fashion-mnist",
        f"mlp:{args.width}",
        seed,
        l1=args.mu if reg else 0.0,
        l2=args.mu if reg else 0.0,
        prune=prune,
        prune_every=args.prune_every,
        prune_start=args.prune_start,
        compression=compression,
        decay_T=decay_T(args),
        track_spectra=True,
    )
    return TrainConfig(**cfg)


def decay_T(args: Any) -> float | None:  # noqa: N802 - the papers' T
    """T of the linear decay (None: constant keep_bulk)."""
    if args.decay_T is None:
        return float(args.epochs)
    return float(args.decay_T) if args.decay_T > 0 else None


def schedule_text(args: Any) -> str:
    T = decay_T(args)
    cuts = list(range(args.prune_start, args.epochs + 1, args.prune_every))
    if T is None:
        return (
            f"`RMTPruner(every={args.prune_every}, start={args.prune_start}, keep_bulk={args.keep_bulk:g})`"
        )
    fs = ", ".join(f"f({e})={max(0.0, 1 - e / T):.2f}" for e in cuts)
    return f"`RMTPruner(every={args.prune_every}, start={args.prune_start}, decay_T={T:g})` ({fs})"


def runs(args: Any, arms: tuple[str, ...] = ARMS) -> dict[str, list[dict[str, Any]]]:
    """Train (or load from the cache) every arm x seed."""
    out: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for seed in args.seed_list:
        for arm in arms:
            run = train_cached(
                config(args, arm, seed), args, f"fashion-mlp-{arm}", prefix=f"[{arm} s{seed}] "
            )
            run["seed"] = seed
            out[arm].append(run)
    return out


def control_section(per_run: list[dict[str, Any]]) -> str:
    """Paired differences (pp, mean, SE, 95% t CI over seeds) of the measured runs (``per_run``):
    each arm against dense and against the full-rank control."""
    acc = {(r["arm"], r["seed"]): r["acc"] for r in per_run}
    seeds = sorted({s for _, s in acc})
    lines = ["## Against dense and against the re-parametrisation control (paired by seed)", ""]
    for arm in ARMS:
        for ref in ("dense", "fullrank"):
            if arm in (ref, "dense"):
                continue
            d = [100 * (acc[(arm, s)] - acc[(ref, s)]) for s in seeds if (arm, s) in acc and (ref, s) in acc]
            if len(d) < 2:
                continue
            mean, se, lo, hi = ci(d, 0.95)
            lines.append(f"- {arm} - {ref}: {mean:+.2f} pp (SE {se:.2f}; 95% CI [{lo:+.2f}, {hi:+.2f}])")
    return "\n".join(lines)


def layer_names(model: Any) -> list[str]:
    return [n for n in ("fc1", "fc2", "fc3", "fc4", "fc5", "head") if hasattr(model, n)]


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, seeds=3, epochs=6, name=NAME)
    add_args(parser)
    args = parser.parse_args(argv)
    setup(args, NAME)
    test = load_dataset("fashion-mnist", "test", data_dir=args.data_dir)
    all_runs = runs(args)

    dense_acc: dict[int, float] = {}  # filled by the dense arm, the first of ARMS
    rows, per_run = [], []
    for arm in ARMS:
        accs, deltas, params, ranks, times = [], [], [], [], []
        for r in all_runs[arm]:
            model = r["model"].eval()
            loss, acc = test_metrics(model, test)
            if arm == "dense":
                dense_acc[r["seed"]] = acc
            accs.append(acc)
            deltas.append(acc - dense_acc[r["seed"]])
            params.append(n_params(model))
            names = layer_names(model)
            rk = {n: layer_rank(model, n) for n in names}
            ranks.append("/".join("d" if v is None else str(v) for v in rk.values()))
            times.append(r["timings"]["total"])
            per_run.append(
                {
                    "arm": arm,
                    "seed": r["seed"],
                    "acc": acc,
                    "loss": loss,
                    "params": params[-1],
                    "ranks": rk,
                    "timings": r["timings"],
                    "test_acc_per_epoch": [m["test_acc"] for m in r["metrics"]],
                }
            )
        dense_params = per_run[0]["params"]
        rows.append(
            [
                ARM_LABEL[arm],
                pm(accs, 100),
                pm(deltas, 100),
                fmt_int(np.mean(params)),
                f"{100 * (1 - np.mean(params) / dense_params):.1f}%",
                ", ".join(ranks),
                f"{np.mean(times):.0f}",
            ]
        )
    dump_json(args.out.with_suffix(".json"), per_run)
    widths = [int(w) for w in args.width.split(",")]
    arch = "[784, " + ", ".join(map(str, widths)) + ", 10]"
    epoch_rows = []
    for arm in ARMS:
        curves = np.array([[m["test_acc"] for m in r["metrics"]] for r in all_runs[arm]]) * 100
        epoch_rows.append([ARM_LABEL[arm], *[f"{v:.2f}" for v in curves.mean(0)]])
    cuts = ", ".join(str(e) for e in range(args.prune_start, args.epochs + 1, args.prune_every))
    sections = [
        "## Setup\n\n"
        f"MLP {arch} (ReLU, no activation on the logits) on Fashion-MNIST, trained on the `train` split "
        "(55,000 images: the training file minus the fixed 5,000-image validation split)"
        f"{' (QUICK: first 6000 images)' if args.quick else ''}, accuracy on the untouched 10k test split "
        "(read once per reported number; every setting was fixed before this run). "
        "Control (issue 14): the MP arms' first cut re-parametrises each hidden layer as two factors and "
        "rebuilds the optimizer; the `fullrank` arm does exactly that at the same epoch and removes nothing, "
        "so MP pruning's gain over it is what removing the bulk adds. "
        f"Every arm: SGD (momentum 0.9), lr {args.lr:g}, cosine schedule over {args.epochs} epochs, batch "
        "128, "
        "no weight decay. "
        f"L1+L2 arms: mu1 = mu2 = {args.mu:g} on every weight matrix (biases not penalised). "
        f"MP arms: {schedule_text(args)}; each cut keeps n_spikes + floor(f * n_bulk) triplets "
        f"(cuts after epochs {cuts}; BEMA alpha 0.25, beta 0.1, KS gate 0.1; the 10-wide logits layer is "
        "never cut). Width: the issue suggests [784, 3000, 3000, 10]. On this shared machine one training "
        "epoch of [784, 1000, 1000, 10] with L1+L2 took ~85 s (measured when this experiment was first "
        f"launched, with other jobs running), so 4 arms x {len(args.seed_list)} seeds of it would not fit in "
        f"the time available; this runs {arch} instead.",
        "## Results (mean +- std over seeds)\n\n"
        + md_table(
            [
                "arm",
                "test acc (%)",
                "delta vs dense (pp, paired)",
                "params as stored",
                "params removed",
                "ranks per seed (fc1/fc2/.../head; d = dense)",
                "run time s",
            ],
            rows,
        ),
        "## Test accuracy per epoch (mean over seeds, %)\n\n"
        + md_table(["arm", *[f"ep {i + 1}" for i in range(args.epochs)]], epoch_rows),
        control_section(per_run),
        "Anchor: the 2025 paper reports 90.5% for [784, 3000x4, 500, 10] with MP pruning + L1/L2 after "
        "long training (its baseline without either: 71.6%, a weak baseline). The runs here are far shorter "
        "and narrower; see the deltas against our own dense baseline trained identically.",
        stability_pointer(),
    ]
    write_report(args, f"Experiment 2: Fashion-MNIST MLP {arch}", sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
