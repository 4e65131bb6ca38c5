"""Accuracy stability during training (issue 16): does an RMT cut make training less stable?

A pre-registered experiment: the protocol (:func:`protocol`) was committed before any run. MNIST and
Fashion-MNIST, MLP [784, 1000, 10], the training recipe of ``exp_mnist_mlp.py`` (SGD momentum 0.9,
lr 0.05, cosine schedule, batch 128; MNIST 8 epochs with cuts at epochs 1, 4, 7; Fashion-MNIST the
schedule of ``exp_fashion_mlp.py``: 6 epochs, cuts at 1, 3, 5), three arms per seed: dense, pruned
with a constant f = 0.45, pruned with the decay f(e) = max(0, 1 - e/T), T = epochs. Every run
tracks stability (:mod:`rmtprune.training.stability`) with ``eval_before_prune=True``.

Run: ``python benchmarks/exp_stability.py [--seeds 3] [--datasets mnist,fashion-mnist] [--quick]``;
writes ``benchmarks/results/exp_stability.md`` (+ ``.json``); ``--protocol-only`` writes the protocol
alone. Finished runs are kept in ``<out>.partial.json`` and reused by a rerun of the same code.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from _cache import sgd_config
from _cli import log, parser_for, setup
from _env import training_code
from _report import dump_json, md_table, write_report
from _stats import mean_std, pm

from rmtprune._atomic import atomic_write_text
from rmtprune.training import TrainConfig, train
from rmtprune.training.stability import summarize

NAME = "exp_stability"
#: Per dataset: (epochs, prune_every, prune_start) of its experiment script.
RECIPES = {"mnist": (8, 3, 1), "fashion-mnist": (6, 2, 1)}
SOURCE = {"mnist": "exp_mnist_mlp.py", "fashion-mnist": "exp_fashion_mlp.py"}
ARMS = ("dense", "const", "decay")
ARM_LABEL = {
    "dense": "dense (no pruning)",
    "const": "pruned, constant f = 0.45",
    "decay": "pruned, decay f(e) = max(0, 1 - e/T), T = epochs",
}
KEEP_BULK = 0.45
MODEL = "mlp:1000"


def recipe(args: argparse.Namespace, dataset: str) -> tuple[int, int, int]:
    epochs, every, start = RECIPES[dataset]
    return (args.epoch_override or epochs), every, start


def config(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> TrainConfig:
    epochs, every, start = recipe(args, dataset)
    ns = argparse.Namespace(**{**vars(args), "epochs": epochs})
    fields: dict[str, Any] = dict(
        track_spectra=False,
        eval_before_prune=True,
        track_stability=True,
        prune=arm != "dense",
        prune_every=every,
        prune_start=start,
        compression={"keep_bulk": KEEP_BULK},
    )
    if arm == "decay":
        fields["decay_T"] = float(epochs)
    return TrainConfig(**sgd_config(ns, dataset, MODEL, seed, **fields))


def cut_epochs(args: argparse.Namespace, dataset: str) -> list[int]:
    epochs, every, start = recipe(args, dataset)
    return list(range(start, epochs + 1, every))


def protocol(args: argparse.Namespace) -> str:
    """The pre-registered protocol (written and committed before the runs)."""
    sched = "; ".join(
        f"{d}: {recipe(args, d)[0]} epochs, cuts after epochs {', '.join(map(str, cut_epochs(args, d)))} "
        f"(as {SOURCE[d]})"
        for d in args.dataset_list
    )
    return f"""## Protocol (pre-registered: committed before any run)

**Question.** Training lowers the loss, but accuracy need not rise with it (stability of accuracy:
Berlyand, Jabin & Safsten; Shmalo, arXiv 2210.08415). Does an RMT cut during training make
accuracy less stable than dense training?

**Runs.** Datasets {", ".join(args.dataset_list)}; model MLP [784, 1000, 10] (`{MODEL}`) for both
(the Fashion-MNIST experiment's own default is 500,500: here the same MLP as MNIST); SGD momentum
0.9, lr {args.lr:g}, cosine schedule, batch 128, no weight decay, no L1/L2; {sched}. Arms per seed:
{"; ".join(f"**{a}** = {ARM_LABEL[a]}" for a in ARMS)} (keep_bulk {KEEP_BULK}, BEMA rule, the
trainer's defaults otherwise). Seeds {", ".join(map(str, args.seed_list))}. `eval_before_prune=True`,
`track_spectra=False`, one torch thread.

**What is counted** (`rmtprune.training.stability`, docs/training.md "Accuracy stability"). After
every epoch a fixed evaluation (eval mode, the same examples every time) of two splits:
**train** = a fixed seeded subset of 10,000 of the 55,000 training images (the trainer's default),
**val** = the 5,000 held-out validation images. Epoch 1 has no previous measurement, so epochs
2..E are compared. Per run:
- *events* (train, val): epochs where the training loss of the fixed evaluation fell while that
  split's accuracy fell (both strictly), counted per run;
- *flips*: examples correct after the previous epoch and wrong now, per epoch; split into the
  epochs with a cut (the cut included) and the other epochs; for dense, the "cut epochs" are the
  same epoch numbers as the pruned arms' (a position-matched control, since flips shrink as
  training converges);
- *cut flips*: examples correct just before the cut and wrong just after it (same epoch, every
  cut including the one at epoch 1), mean per cut, and the cut's own events.

The test split is used for nothing but the final test accuracy reported next to the counts.

**Hypotheses** (stated before the runs; each is checked on the means over seeds):
- H1: instability events are rare: every arm has <= 1 event per run on average, per split;
- H2: the cuts add instability: in each pruned arm, the mean train flips of its cut epochs exceed
  those of dense at the same epochs (paired by seed);
- H3: most of that excess is the cut itself: the mean train flips of a cut (before -> after,
  epochs >= 2) are at least half of the excess in H2;
- H4: the constant arm (f = 0.45 at every cut) flips fewer examples per cut than the decay arm at
  its late cuts (f small), i.e. cut flips grow as f shrinks.
Whatever comes out is published below, including hypotheses that fail.
"""


def _load_partial(path: Any, code: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("code") == code else {}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Train every (dataset, arm, seed), reusing the finished runs of ``<out>.partial.json``."""
    partial_path = args.out.with_suffix(".partial.json")
    code = training_code()
    done = _load_partial(partial_path, code) if not args.refresh else {}
    runs: dict[str, Any] = done.get("runs", {})
    for dataset in args.dataset_list:
        for seed in args.seed_list:
            for arm in ARMS:
                cfg = config(args, dataset, arm, seed)
                key = f"{dataset}/{arm}/{seed}"
                if key in runs and runs[key]["config"] == cfg.to_dict():
                    continue
                t0 = time.perf_counter()
                res = train(cfg, data_dir=args.data_dir)
                rows = [{k: v for k, v in r.items() if k != "layers"} for r in res.metrics]
                runs[key] = {"config": cfg.to_dict(), "metrics": rows, "seconds": time.perf_counter() - t0}
                s = summarize(rows)["all"]
                log(
                    f"[{key}] {runs[key]['seconds']:.0f} s, test acc {100 * rows[-1]['test_acc']:.2f}%, "
                    f"events train {s['events_train']} val {s['events_val']}, "
                    f"flips/epoch train {s['flips_train']:.1f} val {s['flips_val']:.1f}"
                )
                atomic_write_text(partial_path, json.dumps({"code": code, "runs": runs}) + "\n")
    return runs


def _stats(rows: list[dict[str, Any]], cuts: list[int]) -> dict[str, float | None]:
    """One run's numbers (see the protocol)."""
    s = summarize(rows)
    at = [r for r in rows if r["epoch"] in cuts and r.get("flips_train") is not None]
    cut_rows = [r for r in rows if r.get("cut_flips_train") is not None]
    late = [r for r in cut_rows if r["epoch"] >= 2]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "events_train": s["all"]["events_train"],
        "events_val": s["all"]["events_val"],
        "flips_train": s["all"]["flips_train"],
        "flips_val": s["all"]["flips_val"],
        "at_cut_epochs_train": mean([r["flips_train"] for r in at]),
        "at_cut_epochs_val": mean([r["flips_val"] for r in at]),
        "other_epochs_train": mean(
            [r["flips_train"] for r in rows if r["epoch"] not in cuts and r.get("flips_train") is not None]
        ),
        "cut_flips_train": mean([r["cut_flips_train"] for r in cut_rows]),
        "cut_flips_val": mean([r["cut_flips_val"] for r in cut_rows]),
        "cut_fixes_train": mean([r["cut_fixes_train"] for r in cut_rows]),
        "cut_flips_train_late": mean([r["cut_flips_train"] for r in late]),
        "cut_events_train": sum(bool(r.get("cut_event_train")) for r in cut_rows) if cut_rows else None,
        "cut_events_val": sum(bool(r.get("cut_event_val")) for r in cut_rows) if cut_rows else None,
        "test_acc": rows[-1]["test_acc"],
        "overhead": sum(r["seconds_stability"] for r in rows) / sum(r["seconds_train"] for r in rows),
    }


def _cell(values: list[float | None], digits: int = 1, scale: float = 1.0) -> str:
    got = [v for v in values if v is not None and not math.isnan(v)]
    return pm(got, scale, digits) if got else "-"


COLUMNS = (
    ("events_train", "events/run train", 2, 1.0),
    ("events_val", "events/run val", 2, 1.0),
    ("flips_train", "flips/epoch train", 1, 1.0),
    ("flips_val", "flips/epoch val", 1, 1.0),
    ("at_cut_epochs_train", "train flips, cut epochs", 1, 1.0),
    ("other_epochs_train", "train flips, other epochs", 1, 1.0),
    ("cut_flips_train", "flips by a cut, train", 1, 1.0),
    ("cut_flips_val", "flips by a cut, val", 1, 1.0),
    ("cut_events_train", "cut events train", 2, 1.0),
    ("test_acc", "test acc (%)", 2, 100.0),
)


def tables(args: argparse.Namespace, runs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    out, per = [], {}
    for dataset in args.dataset_list:
        cuts = cut_epochs(args, dataset)
        stats = {
            arm: [_stats(runs[f"{dataset}/{arm}/{s}"]["metrics"], cuts) for s in args.seed_list]
            for arm in ARMS
        }
        per[dataset] = stats
        rows = [
            [ARM_LABEL[arm]] + [_cell([st[k] for st in stats[arm]], d, sc) for k, _, d, sc in COLUMNS]
            for arm in ARMS
        ]
        out.append(
            f"### {dataset} (cuts after epochs {', '.join(map(str, cuts))}; mean +- std over "
            f"{len(args.seed_list)} seeds)\n\n" + md_table(["arm", *(h for _, h, _, _ in COLUMNS)], rows)
        )
        out.append(per_cut_table(args, runs, dataset))
    return "\n\n".join(out), per


def per_cut_table(args: argparse.Namespace, runs: dict[str, Any], dataset: str) -> str:
    """Per cut epoch: train flips of the cut itself and of the epoch (dense: the same epoch)."""
    rows = []
    for e in cut_epochs(args, dataset):
        row = [str(e)]
        for arm in ARMS:
            rs = [
                next(r for r in runs[f"{dataset}/{arm}/{s}"]["metrics"] if r["epoch"] == e)
                for s in args.seed_list
            ]
            if arm != "dense":
                row.append(f"{rs[0]['f']:.3f}" if rs[0].get("f") is not None else "-")
                row.append(_cell([r.get("cut_flips_train") for r in rs]))
            row.append(_cell([r.get("flips_train") for r in rs]))
        rows.append(row)
    head = ["cut epoch", "dense: epoch flips"]
    for arm in ARMS[1:]:
        head += [f"{arm}: f", f"{arm}: cut flips", f"{arm}: epoch flips"]
    return f"Per cut, {dataset}, train split (mean +- std over seeds):\n\n" + md_table(head, rows)


def verdicts(args: argparse.Namespace, per: dict[str, Any], cuts_of: dict[str, list[int]]) -> str:
    """H1..H4 on the means over seeds, as pre-registered."""
    lines = []
    for dataset, stats in per.items():

        def m(arm: str, key: str, stats: dict[str, Any] = stats) -> float:
            got = [s[key] for s in stats[arm] if s[key] is not None]
            return mean_std(got)[0] if got else math.nan

        h1 = {a: (m(a, "events_train"), m(a, "events_val")) for a in ARMS}
        ok1 = all(t <= 1 and v <= 1 for t, v in h1.values())
        lines.append(
            f"- {dataset} H1 ({'holds' if ok1 else 'fails'}): events/run train, val: "
            + "; ".join(f"{a} {t:.2f}, {v:.2f}" for a, (t, v) in h1.items())
        )
        dense_at = m("dense", "at_cut_epochs_train")
        for arm in ARMS[1:]:
            excess = m(arm, "at_cut_epochs_train") - dense_at
            lines.append(
                f"- {dataset} H2 {arm} ({'holds' if excess > 0 else 'fails'}): train flips at the cut "
                f"epochs {m(arm, 'at_cut_epochs_train'):.1f} vs dense at the same epochs {dense_at:.1f} "
                f"(excess {excess:+.1f})"
            )
            late = m(arm, "cut_flips_train_late")
            ok3 = excess > 0 and late >= excess / 2
            lines.append(
                f"- {dataset} H3 {arm} ({'holds' if ok3 else 'fails' if excess > 0 else 'moot: no excess'}): "
                f"flips of a cut itself (epochs >= 2) {late:.1f} vs half the excess {excess / 2:.1f}"
            )
        late_cuts = [e for e in cuts_of[dataset] if e >= 2]
        if late_cuts:
            e = late_cuts[-1]
            c, d = _at(stats, "const", e), _at(stats, "decay", e)
            lines.append(
                f"- {dataset} H4 ({'holds' if c < d else 'fails'}): flips of the cut after epoch {e}: "
                f"constant f=0.45 {c:.1f} vs decay {d:.1f}"
            )
    return "\n".join(lines)


def _at(stats: dict[str, Any], arm: str, epoch: int) -> float:
    vals = [s["_cut_at"].get(epoch) for s in stats[arm] if s["_cut_at"].get(epoch) is not None]
    return mean_std(vals)[0] if vals else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, seeds=3, epochs=0, name=NAME)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, every arm (default 0.05)")
    parser.add_argument("--datasets", default="mnist,fashion-mnist", help="comma list (default both)")
    parser.add_argument("--protocol-only", action="store_true", help="write the protocol alone and stop")
    args = parser.parse_args(argv)
    setup(args, NAME)
    if args.quick and args.epochs == 2:  # setup's quick default; the recipes need a cut after epoch 2
        args.epochs = 3
    args.epoch_override = args.epochs  # 0: each dataset's recipe
    args.dataset_list = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in args.dataset_list:
        if d not in RECIPES:
            parser.error(f"--datasets: {d!r} is not one of {', '.join(RECIPES)}")
    args.epochs = ", ".join(f"{d} {recipe(args, d)[0]}" for d in args.dataset_list)  # for the header
    title = "Accuracy stability during training: dense vs RMT-pruned MLPs (MNIST, Fashion-MNIST)"
    if args.protocol_only:
        write_report(args, title, [protocol(args), "## Results\n\nPending: the runs had not been made."])
        return 0
    runs = run_all(args)
    body, per = tables(args, runs)
    for dataset, stats in per.items():
        for arm in ARMS:
            for st, s in zip(stats[arm], args.seed_list, strict=True):
                st["_cut_at"] = {
                    r["epoch"]: r["cut_flips_train"]
                    for r in runs[f"{dataset}/{arm}/{s}"]["metrics"]
                    if r.get("cut_flips_train") is not None
                }
    cuts_of = {d: cut_epochs(args, d) for d in args.dataset_list}
    overhead = [st["overhead"] for stats in per.values() for arm in ARMS for st in stats[arm]]
    sections = [
        protocol(args),
        "## Results\n\n" + body,
        "## Hypotheses\n\n" + verdicts(args, per, cuts_of),
        "## Cost\n\nTime measuring stability after each epoch (`seconds_stability`: the 10,000-image "
        "train evaluation and the val pass the run makes anyway; the measurement before each cut is "
        "counted as evaluation) over the training time, per run: " + _cell(overhead, 1, 100.0) + " %.",
    ]
    dump_json(args.out.with_suffix(".json"), {"runs": runs, "stats": per})
    write_report(args, title, sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
