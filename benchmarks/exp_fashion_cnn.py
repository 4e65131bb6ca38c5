"""Experiment 3: Fashion-MNIST CNN, dense vs RMT-pruned (conv layers factored).

A small CNN (``cnn:16,32``: two conv3x3-BN-ReLU-maxpool blocks, a 128-wide hidden layer, the logits)
trained the same way in every arm:

- **dense**: no pruning;
- **pruned during training**: :class:`rmtprune.RMTPruner` through :func:`rmtprune.train`; every layer
  whose bulk fits MP (conv weights read as ``out x (in*kh*kw)``) is factored, a conv into
  ``Conv(in -> k, 3x3)`` then ``Conv(k -> out, 1x1)``;
- **post-training compression** of the dense net with :func:`rmtprune.compress` at a few
  ``keep_bulk``, no fine-tuning.

Run: ``python benchmarks/exp_fashion_cnn.py [--seeds 2] [--epochs 2] [--quick]``; writes
``benchmarks/results/exp_fashion_cnn.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _cache import sgd_config, train_cached
from _cli import log, parser_for, setup
from _measure import clone, n_params, test_metrics
from _report import dump_json, md_table, write_report
from _stats import fmt_int, pm

from rmtprune.config import CompressionConfig
from rmtprune.surgery import compress
from rmtprune.training import TrainConfig
from rmtprune.zoo.data import load_dataset

NAME = "exp_fashion_cnn"
#: (keep_bulk, ks_max) of the post-training arms: the default gate, then a loosened one
POST = ((0.0, 0.1), (0.25, 0.1), (0.5, 0.1), (0.0, 0.3), (0.25, 0.3), (0.5, 0.3))


def config(args: Any, seed: int, prune: bool, ks_max: float = 0.1) -> TrainConfig:
    cfg = sgd_config(
        args,
        "fashion-mnist",
        args.model,
        seed,
        prune=prune,
        prune_every=1,
        prune_start=1,
        compression={"keep_bulk": args.keep_bulk, "ks_max": ks_max},
        track_spectra=False,
    )
    return TrainConfig(**cfg)


def summary(model: Any, test: Any) -> dict[str, Any]:
    from rmtprune.layers import handler_for

    loss, acc = test_metrics(model, test)
    ranks = {}
    for name, mod in model.named_modules():
        h = handler_for(mod)
        if h is not None and not h.unsupported(mod) and not any(name.startswith(k + ".") for k in ranks):
            ranks[name] = ("f" if h.factored else "d") + str(h.current_rank(mod))
    return {"acc": acc, "loss": loss, "params": n_params(model), "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, seeds=2, epochs=2, name=NAME)
    parser.add_argument("--model", default="cnn:16,32", help="model spec (default cnn:16,32)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument(
        "--keep-bulk", type=float, default=0.25, help="bulk kept by the pruned arm (default 0.25)"
    )
    args = parser.parse_args(argv)
    setup(args, NAME)
    test = load_dataset("fashion-mnist", "test", data_dir=args.data_dir)

    recs = []
    for seed in args.seed_list:
        dense = train_cached(config(args, seed, False), args, "fashion-cnn-dense", prefix=f"[dense s{seed}] ")
        dm = dense["model"].eval()
        rec = {"seed": seed, "dense": summary(dm, test), "dense_time": dense["timings"]}
        rec["post"] = {}
        for kb, ks in POST:
            m = clone(dm)
            _, report = compress(m, config=CompressionConfig(keep_bulk=kb, ks_max=ks))
            post = summary(m, test)
            post["plan"] = report.to_markdown()
            rec["post"][kb, ks] = post
            log(f"[s{seed}] post keep_bulk={kb} ks_max={ks}: {100 * post['acc']:.2f}% {post['ranks']}")
        pruned = train_cached(
            config(args, seed, True), args, "fashion-cnn-pruned", prefix=f"[pruned s{seed}] "
        )
        loose = train_cached(
            config(args, seed, True, ks_max=0.3),
            args,
            "fashion-cnn-pruned",
            prefix=f"[pruned-ks0.3 s{seed}] ",
        )
        rec["pruned_loose"] = summary(loose["model"].eval(), test)
        rec["pruned_loose_time"] = loose["timings"]
        rec["pruned"] = summary(pruned["model"].eval(), test)
        rec["pruned_time"] = pruned["timings"]
        rec["decisions"] = pruned["decisions"]
        recs.append(rec)
    dump_json(
        args.out.with_suffix(".json"),
        [
            {**r, "post": {f"keep_bulk={kb},ks_max={ks}": v for (kb, ks), v in r["post"].items()}}
            for r in recs
        ],
    )

    dense_acc = [r["dense"]["acc"] for r in recs]
    dense_params = recs[0]["dense"]["params"]
    rows = []

    def add(label: str, items: list[dict[str, Any]]) -> None:
        rows.append(
            [
                label,
                pm([x["acc"] for x in items], 100),
                pm([x["acc"] - d for x, d in zip(items, dense_acc, strict=True)], 100),
                fmt_int(np.mean([x["params"] for x in items])),
                f"{100 * (1 - np.mean([x['params'] for x in items]) / dense_params):.1f}%",
                "; ".join(" ".join(f"{k}:{v}" for k, v in x["ranks"].items()) for x in items[:1]),
            ]
        )

    add("dense", [r["dense"] for r in recs])
    add(
        f"pruned during training (keep_bulk={args.keep_bulk:g}, cuts after every epoch)",
        [r["pruned"] for r in recs],
    )
    add(
        f"pruned during training (keep_bulk={args.keep_bulk:g}), gate loosened to ks_max=0.3",
        [r["pruned_loose"] for r in recs],
    )
    for kb, ks in POST:
        gate = "default gate ks_max=0.1" if ks == 0.1 else f"gate loosened to ks_max={ks:g}"
        add(
            f"post-training compress keep_bulk={kb:g}, {gate}, no fine-tuning",
            [r["post"][kb, ks] for r in recs],
        )
    drows = [
        [d.get("epoch"), d.get("layer"), d.get("action"), d.get("rank_before"), d.get("rank_after"),
         d.get("n_spikes"), "-" if d.get("ks") is None else f"{d['ks']:.3f}", (d.get("reason") or "")[:70]]
        for d in recs[0]["decisions"]
    ]  # fmt: skip
    times = [
        [r["seed"], f"{r['dense_time']['total']:.0f}", f"{r['pruned_time']['total']:.0f}",
         f"{r['pruned_time']['prune']:.2f}"]
        for r in recs
    ]  # fmt: skip
    sections = [
        "## Setup\n\n"
        f"`{args.model}` on Fashion-MNIST: conv3x3(1->16)-BN-ReLU-pool, conv3x3(16->32)-BN-ReLU-pool, "
        "Linear(1568->128)-ReLU, Linear(128->10) (no activation on the logits); full training set"
        f"{' (QUICK: 6000 images)' if args.quick else ''}, untouched test split. Every arm: SGD momentum "
        "0.9, "
        f"lr {args.lr:g}, cosine over {args.epochs} epochs, batch 128. Pruned arm: `RMTPruner(every=1, "
        "start=1, "
        f"keep_bulk={args.keep_bulk:g})`, i.e. factoring during training, cuts after every epoch "
        "(with a constant f a later cut changes a layer only if its spike count fell). Conv weights are "
        "read as out x (in*3*3): "
        "conv1 is 16 x 9 (p = 9 < 10, too small to fit, never cut), conv2 32 x 144. Ranks below: "
        "f<k> = factored at rank k, d<p> = dense. Small and short on purpose (2 shared CPU cores).",
        "## Results (mean +- std over seeds)\n\n"
        + md_table(
            [
                "arm",
                "test acc (%)",
                "delta vs dense (pp, paired)",
                "params as stored",
                "params removed",
                "ranks (seed 0)",
            ],
            rows,
        ),  # fmt: skip
        f"## Decisions of the pruned arm (seed {recs[0]['seed']})\n\n"
        + md_table(
            ["epoch", "layer", "action", "rank before", "rank after", "n_spikes", "ks", "reason"], drows
        ),
        "## Post-training plan, keep_bulk=0, default gate (seed 0)\n\n" + recs[0]["post"][0.0, 0.1]["plan"],
        "## Post-training plan, keep_bulk=0, gate ks_max=0.3 (seed 0)\n\n"
        + recs[0]["post"][0.0, 0.3]["plan"],
        "## Run times (s)\n\n" + md_table(["seed", "dense total", "pruned total", "of which pruning"], times),
    ]
    write_report(args, f"Experiment 3: Fashion-MNIST CNN {args.model}", sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
