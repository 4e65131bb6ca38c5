"""Accuracy vs sparsity of a small ViT: global magnitude, uniform magnitude, RMT-guided; plus low rank.

Trains the reference ViT (``vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2``) on Fashion-MNIST and
MNIST (weights cached, so reruns skip training), then for every global sparsity in ``--sparsities``
prunes a copy with

- ``global``: one magnitude threshold over all Linear/Conv weights (the usual baseline),
- ``uniform``: the same sparsity in every layer, by magnitude,
- ``rmt``: :func:`rmtprune.sparsify` (singular-vector step, ``energy`` budget, the default),
- ``rmt-noise``: the same with the ``noise`` budget,

each without fine-tuning and with the *same* short fine-tune (identical cycles, regularisation,
steps, learning rate and batch order). All go through :func:`rmtprune.sparsify` with only
``budget``/``sv_sparsify`` changed, so the comparison is one to one. Low-rank compression of the
same trained ViT (BEMA default, ``keep_bulk`` in {0, 0.25, 0.5}) is measured with and without the
same fine-tune and plotted next to the sparse results (x: parameters as stored).

Run: ``python benchmarks/sparsify_vit.py`` (writes ``benchmarks/results/sparsify_vit.md`` and
``sparsify_vit.png``); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtprune._atomic import atomic_path, atomic_write_text
from rmtprune.data import batches, load_dataset
from rmtprune.finetune import evaluate
from rmtprune.masks import count_nonzeros
from rmtprune.models import build_model
from rmtprune.sparse_format import load_model, save_model
from rmtprune.sparsify import SparsifyConfig, sparsify

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("RMTPRUNE_BENCH_CACHE", Path.home() / ".cache" / "rmtprune" / "bench"))
SPEC = "vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2"
METHODS = {
    "global": {"budget": "global", "sv_sparsify": False},
    "uniform": {"budget": "uniform", "sv_sparsify": False},
    "rmt": {"budget": "energy", "sv_sparsify": True},
    "rmt-noise": {"budget": "noise", "sv_sparsify": True},
}
LABELS = {
    "global": "global magnitude",
    "uniform": "uniform magnitude",
    "rmt": "RMT (energy budget)",
    "rmt-noise": "RMT (noise budget)",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_vit(dataset: str, seed: int, epochs: int, subset: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from the cache) the reference ViT: Adam, lr 1e-3 cosine to 0, batch 128."""
    train_ds = load_dataset(dataset, "train")
    if subset:
        train_ds = train_ds.subset(subset)
    torch.manual_seed(seed)
    model = build_model(SPEC, train_ds.input_shape, train_ds.num_classes)
    tag = f"vit64x4_{dataset}_s{seed}_e{epochs}_n{len(train_ds)}"
    path = CACHE / f"{tag}.safetensors"
    info_path = CACHE / f"{tag}.json"
    if path.is_file() and info_path.is_file():
        load_model(path, model)
        return model, json.loads(info_path.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    loader = batches(train_ds, 128, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        _log(f"  {dataset} seed {seed} epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    info = {"train_seconds": time.perf_counter() - t0, "epochs": epochs, "train_images": len(train_ds)}
    save_model(path, model, metadata={"spec": SPEC})
    atomic_write_text(info_path, json.dumps(info))
    return model, info


def run_sparse(
    base: nn.Module,
    method: str,
    target: float,
    ft: bool,
    args: argparse.Namespace,
    data: Any,
    test: Any,
    seed: int,
) -> dict[str, Any]:
    """Sparsify a copy of ``base`` with ``method`` at ``target`` (with ``ft``: the short fine-tune)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    cfg = SparsifyConfig(
        target=target,
        n_cycles=args.cycles,
        cycle_steps=args.cycle_steps,
        finetune_epochs=args.ft_epochs,
        lr=args.ft_lr,
        **METHODS[method],
    )
    loader = None
    if ft:
        loader = batches(data, 128, shuffle=True, generator=torch.Generator().manual_seed(1000 + seed))
    t0 = time.perf_counter()
    _, report = sparsify(model, cfg, data=loader, show_progress=False)
    acc = evaluate(model, test)["accuracy"]
    counts = count_nonzeros(model)
    return {
        "method": method,
        "target": target,
        "ft": ft,
        "seed": seed,
        "accuracy": acc,
        "achieved": report.achieved,
        "stored": counts["stored"],
        "total": counts["total"],
        "dense_layers": sum(1 for r in report.layers if r.nnz_after == r.params),
        "seconds": time.perf_counter() - t0,
    }


def run_lowrank(
    base: nn.Module, keep_bulk: float, ft: bool, args: argparse.Namespace, data: Any, test: Any
) -> dict:
    """Low-rank compression of a copy (BEMA, ``keep_bulk``); with ``ft``, as many fine-tune steps."""
    from rmtprune.finetune import finetune
    from rmtprune.surgery import compress

    model = copy.deepcopy(base)
    _, plan = compress(model, keep_bulk=keep_bulk)
    if ft:
        loader = batches(data, 128, shuffle=True, generator=torch.Generator().manual_seed(1000))
        steps = args.cycles * args.cycle_steps + int(round(args.ft_epochs * len(loader)))
        finetune(model, loader, steps=steps, lr=args.ft_lr)
    counts = count_nonzeros(model)
    return {
        "method": f"lowrank kb={keep_bulk:g}",
        "keep_bulk": keep_bulk,
        "ft": ft,
        "accuracy": evaluate(model, test)["accuracy"],
        "stored": counts["stored"],
        "total": sum(p.numel() for p in base.parameters()),
        "factored": sum(1 for m in model.modules() if type(m).__name__.startswith("LowRank")),
    }


def _fits(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer MP fit of the trained model: verdict, spikes, KS distance, bulk energy."""
    from rmtprune.analysis import analyze_tensor
    from rmtprune.masks import prunable_layers

    out = []
    for name, mod in prunable_layers(model):
        a = analyze_tensor(name, mod.weight.detach())
        fit = a.fit
        out.append(
            {
                "layer": name,
                "verdict": a.verdict,
                "n_spikes": fit.n_spikes if fit else None,
                "ks": fit.ks if fit else None,
                "bulk_energy": fit.bulk_energy if fit else None,
            }
        )
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _plot(path: Path, results: dict[str, Any]) -> None:
    """Per dataset: accuracy vs parameters stored, full range (top) and zoomed near dense (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(results)
    fig = Figure(figsize=(6.5 * len(datasets), 9))
    FigureCanvasAgg(fig)
    colors = {"global": "tab:blue", "uniform": "tab:orange", "rmt": "tab:green", "rmt-noise": "tab:purple"}
    for i, ds in enumerate(datasets):
        res = results[ds]
        dense_acc = 100 * res["dense"]["accuracy"]
        for row in (0, 1):
            ax = fig.add_subplot(2, len(datasets), row * len(datasets) + i + 1)
            for method, color in colors.items():
                for ft, style in ((False, "--"), (True, "-")):
                    rows = [r for r in res["sparse"] if r["method"] == method and r["ft"] == ft]
                    if not rows:
                        continue
                    xs, ys = [], []
                    for t in sorted({r["target"] for r in rows}):
                        sel = [r for r in rows if r["target"] == t]
                        xs.append(statistics.mean(r["stored"] / r["total"] for r in sel))
                        ys.append(100 * statistics.mean(r["accuracy"] for r in sel))
                    label = f"{LABELS[method]} ({'fine-tuned' if ft else 'no fine-tune'})"
                    ax.plot(xs, ys, style, color=color, marker="o", ms=3, label=label)
            for ft, marker in ((False, "x"), (True, "s")):
                lr_rows = [r for r in res["lowrank"] if r["ft"] == ft]
                if not lr_rows:
                    continue
                pts = [(r["stored"] / r["total"], 100 * r["accuracy"], r["keep_bulk"]) for r in lr_rows]
                ax.scatter(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    color="tab:red",
                    label=f"low rank, keep_bulk 0/0.25/0.5 ({'fine-tuned' if ft else 'no fine-tune'})",
                    zorder=3,
                )
                for x, y, kb in pts:
                    ax.annotate(f"kb={kb:g}", (x, y), fontsize=7)
            ax.axhline(dense_acc, color="gray", lw=0.8, label="dense")
            if "accuracy_ft" in res["dense"]:
                acc_ft = 100 * res["dense"]["accuracy_ft"]
                ax.axhline(acc_ft, color="gray", lw=0.8, ls=":", label="dense + same fine-tune")
            ax.set_xlabel("parameters stored / dense")
            ax.set_ylabel("test top-1 accuracy (%)")
            if row == 0:
                ax.set_ylim(0, 100)
                ax.set_title(f"ViT dim 64 depth 4 on {ds}")
            else:
                ax.set_ylim(dense_acc - 6, dense_acc + 1)
                ax.set_title(f"{ds}: zoom near the dense accuracy")
            ax.grid(alpha=0.3)
            if i == 0 and row == 0:
                ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _report(args: argparse.Namespace, results: dict[str, Any], seconds: float) -> str:
    lines = [
        "# Sparsifying a small ViT: RMT-guided budgets vs magnitude pruning, and low rank",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: 2 CPU cores, no GPU ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), shared with other jobs)",
        "- rerun: `python benchmarks/sparsify_vit.py` (every table and the plot below, sequentially; "
        "trained models are cached in ~/.cache/rmtprune/bench)",
        f"- time of the sparsify/fine-tune/evaluate runs: {seconds / 60:.1f} min (shared CPU)",
        f"- model: `{SPEC}` ({results[next(iter(results))]['dense']['total']:,} parameters), trained "
        f"{', '.join(f'{n} epoch(s) on {ds}' for ds, n in args.epochs_of.items())} "
        f"(Adam 1e-3, cosine, batch 128) on {args.train_subset or 60000} training "
        f"images; accuracy on {'the first ' + str(args.test_subset) if args.test_subset else 'all 10,000'} "
        "test images",
        f"- short fine-tune (same for every method): {args.cycles} cycles with the target ramping linearly, "
        f"{args.cycle_steps} Adam steps (lr {args.ft_lr:g}, L1 = L2 = 1e-6) after each, then "
        f"{args.ft_epochs:g} epoch at lr {args.ft_lr:g}; batch 128, same batch order for every method",
        "- sparsity is over all Linear/Conv weights (patch embedding, q/k/v/out, MLPs, head); "
        "'stored' counts every parameter as the sparse file stores it (biases, norms, embeddings dense)",
        "",
        "![accuracy vs stored parameters](sparsify_vit.png)",
        "",
    ]
    for ds, res in results.items():
        dense = res["dense"]
        head = f"Dense: {100 * dense['accuracy']:.2f}% ({dense['total']:,} parameters)"
        if "accuracy_ft" in dense:
            head += (
                "; the dense model given the same fine-tune (steps, lr, L1/L2, no masks): "
                f"{100 * dense['accuracy_ft']:.2f}%"
            )
        lines += [f"## {ds}", "", head + ".", ""]
        fits = res.get("fits") or []
        if fits:
            ok = [f for f in fits if f["verdict"] == "fit"]
            spikes = sorted(f["n_spikes"] for f in ok)
            energy = sorted(f["bulk_energy"] for f in ok)
            lines += [
                f"Spectra of the trained model: {len(ok)} of {len(fits)} Linear/Conv layers have an accepted "
                f"MP fit; spikes per layer median {spikes[len(spikes) // 2]} (max {spikes[-1]}); bulk energy "
                f"median {energy[len(energy) // 2]:.2f} (min {energy[0]:.2f}).",
                "",
            ]
        lines += [
            "| sparsity | fine-tune | " + " | ".join(LABELS.values()) + " | RMT - global (pp) | seeds |",
            "|---|---|" + "---|" * len(LABELS) + "---|---|",
        ]
        rows = res["sparse"]
        for t in sorted({r["target"] for r in rows}):
            for ft in (False, True):
                cells, means = [], {}
                n_seeds = 0
                for m in LABELS:
                    accs = [
                        r["accuracy"] for r in rows if r["target"] == t and r["ft"] == ft and r["method"] == m
                    ]
                    cells.append(_mean_std(accs) if accs else "-")
                    means[m] = statistics.mean(accs) if accs else math.nan
                    n_seeds = max(n_seeds, len(accs))
                if n_seeds == 0:
                    continue
                diff = 100 * (means["rmt"] - means["global"])
                lines.append(
                    f"| {t:.0%} | {'yes' if ft else 'no'} | "
                    + " | ".join(cells)
                    + f" | {diff:+.2f} | {n_seeds} |"
                )
        lines += ["", "Low rank (BEMA; `keep_bulk=0` is the default rule):", ""]
        lines += [
            "| keep_bulk | fine-tune | factored layers | stored / dense | accuracy |",
            "|---|---|---|---|---|",
        ]
        for r in res["lowrank"]:
            lines.append(
                f"| {r['keep_bulk']:g} | {'yes' if r['ft'] else 'no'} | {r['factored']} | "
                f"{r['stored'] / r['total']:.1%} | {100 * r['accuracy']:.2f} |"
            )
        lines.append("")
    lines += ["## Against the targets", ""] + _verdict(results) + [""]
    commands = sorted({r["command"] for r in results.values() if r.get("command")})
    if args.render:
        commands = [c for item in commands for c in item.split("` and `")]
        commands.append(args.render_command)
    notes = list(args.note)
    if commands:
        notes.insert(0, "Produced by: " + "; ".join(f"`{c}`" for c in commands) + ".")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _verdict(results: dict[str, Any]) -> list[str]:
    """The issue's targets, checked on the numbers above (mean over seeds where there are several)."""
    out = []
    for ds, res in results.items():
        dense = res["dense"]["accuracy"]
        rows = res["sparse"]

        def mean(method: str, t: float, ft: bool, rows: list = rows) -> float:
            accs = [
                r["accuracy"] for r in rows if r["method"] == method and r["target"] == t and r["ft"] == ft
            ]
            return statistics.mean(accs) if accs else math.nan

        half = mean("rmt", 0.5, True)
        if not math.isnan(half):
            loss = 100 * (dense - half)
            ok = "met" if loss <= 1.0 else "NOT met"
            text = (
                f"- {ds}, 50% sparsity after the short fine-tune: RMT-guided loses {loss:.2f} pp against "
                f"the dense model (target <= 1 pp: {ok})"
            )
            if "accuracy_ft" in res["dense"]:
                gap = 100 * (res["dense"]["accuracy_ft"] - half)
                text += f"; {gap:.2f} pp against the dense model fine-tuned alike"
            out.append(text + ".")
        for ft in (False, True):
            worse = []
            for t in sorted({r["target"] for r in rows if r["ft"] == ft}):
                if t < 0.3 - 1e-9:
                    continue
                d = 100 * (mean("rmt", t, ft) - mean("global", t, ft))
                if d < 0:
                    worse.append(f"{t:.0%} ({d:+.2f} pp)")
            tag = "with" if ft else "without"
            if worse:
                out.append(
                    f"- {ds}, {tag} fine-tune: RMT-guided is below global magnitude at {', '.join(worse)}."
                )
            else:
                out.append(
                    f"- {ds}, {tag} fine-tune: RMT-guided >= global magnitude at every sparsity >= 30%."
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist"])
    p.add_argument(
        "--epochs", default="fashion-mnist=2,mnist=3", help="training epochs: N, or DATASET=N,... per dataset"
    )
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--ft-sparsities", default="0.3,0.5,0.7", help="sparsities also run with the fine-tune")
    p.add_argument("--headline", default="0.5", help="sparsities run with every seed (others: seed 0)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tune seeds at the headline sparsities")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--cycle-steps", type=int, default=10)
    p.add_argument("--ft-epochs", type=float, default=0.15)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--keep-bulk", default="0,0.25,0.5")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {list(METHODS)}")
    p.add_argument("--no-lowrank", action="store_true", help="skip the low-rank runs")
    p.add_argument("--no-dense-ft", action="store_true", help="skip the dense + fine-tune reference")
    p.add_argument("--note", action="append", default=[], help="a line added to the report's notes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch on 6000 images, 3 sparsities")
    p.add_argument("--out", type=Path, default=RESULTS / "sparsify_vit.md")
    p.add_argument("--json", type=Path, default=None, help="raw results (default: beside --out)")
    p.add_argument(
        "--render",
        nargs="+",
        type=Path,
        default=None,
        help="only write the report and plot from raw results JSON files (of parallel runs)",
    )
    args = p.parse_args(argv)
    argv_all = sys.argv[1:] if argv is None else argv
    args.command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/sparsify_vit.py", *argv_all])
    shown, skip = [], False
    for a in argv_all:  # the render command without its (long) --note texts
        if skip:
            skip = False
            continue
        if a == "--note":
            skip = True
            continue
        shown.append(a)
    args.render_command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/sparsify_vit.py", *shown])
    if args.quick:
        args.epochs, args.train_subset, args.test_subset = "1", 6000, 2000
        args.sparsities, args.ft_sparsities, args.headline, args.seeds = "0.3,0.5,0.7", "0.5", "0.5", 2
    torch.set_num_threads(args.threads)
    if args.render:
        results: dict[str, Any] = {}
        for path in args.render:  # rows of several runs on the same dataset are merged
            for ds, res in json.loads(path.read_text()).items():
                if ds not in results:
                    results[ds] = res
                    continue
                results[ds]["sparse"] += res["sparse"]
                results[ds]["lowrank"] += res["lowrank"]
                results[ds]["dense"] = {**res["dense"], **results[ds]["dense"]}
                results[ds]["fits"] = results[ds].get("fits") or res.get("fits")
                results[ds]["command"] = f"{results[ds]['command']}` and `{res['command']}"
        args.epochs_of = {ds: res["dense"]["epochs"] for ds, res in results.items()}
        seconds = sum(r.get("seconds", 0) for res in results.values() for r in res["sparse"] + res["lowrank"])
        atomic_write_text(args.json or args.out.with_suffix(".json"), json.dumps(results, indent=1))
        _write(args, results, seconds)
        return 0
    args.epochs_of = _epochs(args.epochs, args.datasets)
    os.environ.setdefault("RMTPRUNE_DATA", str(ROOT.parent / "shared" / "data"))
    sparsities = [float(v) for v in args.sparsities.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {list(METHODS)}")
    ft_sparsities = [float(v) for v in args.ft_sparsities.split(",")]
    headline = [float(v) for v in args.headline.split(",")]
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    json_path = args.json or args.out.with_suffix(".json")
    for ds in args.datasets:
        _log(f"[{ds}] training / loading the ViT")
        base, info = train_vit(ds, 0, args.epochs_of[ds], args.train_subset)
        train_ds = load_dataset(ds, "train")
        if args.train_subset:
            train_ds = train_ds.subset(args.train_subset)
        test_ds = load_dataset(ds, "test")
        test = batches(test_ds.subset(args.test_subset) if args.test_subset else test_ds, 1000)
        dense = {"accuracy": evaluate(base, test)["accuracy"], **count_nonzeros(base), **info}
        dense["epochs"] = args.epochs_of[ds]
        if ft_sparsities and not args.no_dense_ft:  # the dense model given the same fine-tune
            from rmtprune.finetune import finetune

            tuned = copy.deepcopy(base)
            loader = batches(train_ds, 128, shuffle=True, generator=torch.Generator().manual_seed(1000))
            steps = args.cycles * args.cycle_steps + int(round(args.ft_epochs * len(loader)))
            finetune(tuned, loader, steps=steps, lr=args.ft_lr, l1=1e-6, l2=1e-6)
            dense["accuracy_ft"] = evaluate(tuned, test)["accuracy"]
            _log(f"[{ds}] dense + same fine-tune {100 * dense['accuracy_ft']:.2f}%")
        _log(f"[{ds}] dense accuracy {100 * dense['accuracy']:.2f}%")
        res: dict[str, Any] = {"dense": dense, "sparse": [], "lowrank": [], "command": args.command}
        res["fits"] = _fits(base)
        results[ds] = res
        jobs = []
        for t in sparsities:
            for ft in (False, True):
                if ft and t not in ft_sparsities:
                    continue
                seeds = range(args.seeds) if (t in headline and ft) else range(1)
                for seed in seeds:
                    for m in methods:
                        jobs.append((m, t, ft, seed))
        for i, (m, t, ft, seed) in enumerate(jobs, 1):
            row = run_sparse(base, m, t, ft, args, train_ds, test, seed)
            res["sparse"].append(row)
            _log(
                f"[{ds}] {i}/{len(jobs)} {m:8s} s={t:.0%} ft={ft!s:5s} seed={seed} "
                f"acc={100 * row['accuracy']:.2f}% ({row['seconds']:.0f} s)"
            )
            atomic_write_text(json_path, json.dumps(results, indent=1))
        for kb in [] if args.no_lowrank else [float(v) for v in args.keep_bulk.split(",")]:
            for ft in (False, True):
                row = run_lowrank(base, kb, ft, args, train_ds, test)
                res["lowrank"].append(row)
                _log(
                    f"[{ds}] lowrank kb={kb:g} ft={ft} acc={100 * row['accuracy']:.2f}% "
                    f"stored={row['stored']:,}"
                )
        atomic_write_text(json_path, json.dumps(results, indent=1))
    _write(args, results, time.perf_counter() - t0)
    return 0


def _epochs(text: str, datasets: list[str]) -> dict[str, int]:
    if "=" not in text:
        return {ds: int(text) for ds in datasets}
    pairs = dict(item.split("=") for item in text.split(","))
    missing = [ds for ds in datasets if ds not in pairs]
    if missing:
        raise SystemExit(f"--epochs {text!r} gives no epochs for {missing}")
    return {ds: int(pairs[ds]) for ds in datasets}


def _write(args: argparse.Namespace, results: dict[str, Any], seconds: float) -> None:
    _plot(args.out.with_suffix(".png"), results)
    text = _report(args, results, seconds)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
