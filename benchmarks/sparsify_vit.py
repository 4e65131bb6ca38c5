"""Accuracy vs sparsity of a small ViT: global magnitude, uniform magnitude, RMT-guided; plus low rank.

Trains the reference ViT (``vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2``) on Fashion-MNIST and
MNIST (weights cached, so reruns skip training), then for every global sparsity in ``--sparsities``
prunes a copy with

- ``global``: one magnitude threshold over all Linear/Conv weights (the usual baseline),
- ``uniform``: the same sparsity in every layer, by magnitude,
- ``rmt-signal``: :func:`rmtprune.sparsify` with its defaults (singular-vector step, ``signal`` budget),
- ``rmt``: the same with the paper's ``energy`` budget,
- ablations: ``rmt-nosv`` (energy budget without the SV step), ``sv-global`` (SV step, then global
  magnitude), ``rmt-noise`` (noise budget; not run by default),

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import git_revision, training_code  # noqa: E402
from _stats import ci  # noqa: E402

from rmtprune._atomic import atomic_path, atomic_write_text
from rmtprune.finetune import evaluate
from rmtprune.masks import count_nonzeros
from rmtprune.sparse_format import load_sparse_into, save_model
from rmtprune.sparsity import SparsifyConfig, sparsify
from rmtprune.zoo.data import batches, load_dataset
from rmtprune.zoo.models import build_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("RMTPRUNE_BENCH_CACHE", Path.home() / ".cache" / "rmtprune" / "bench"))
SPEC = "vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2"
METHODS = {
    "global": {"budget": "global", "sv_sparsify": False},
    "uniform": {"budget": "uniform", "sv_sparsify": False},
    "rmt": {"budget": "energy", "sv_sparsify": True},
    "rmt-nosv": {"budget": "energy", "sv_sparsify": False},
    "sv-global": {"budget": "global", "sv_sparsify": True},
    "rmt-noise": {"budget": "noise", "sv_sparsify": True},
    "rmt-signal": {"budget": "signal", "sv_sparsify": True},
}
LABELS = {
    "global": "global magnitude",
    "uniform": "uniform magnitude",
    "rmt-signal": "RMT, signal budget (+ SV step; the default)",
    "rmt": "RMT, paper's energy budget (+ SV step)",
    "rmt-nosv": "energy budget, no SV step",
    "sv-global": "SV step + global budget",
    "rmt-noise": "RMT (noise budget)",
}
#: The RMT-guided methods whose difference to global magnitude is tabulated and checked.
RMT_METHODS = ("rmt-signal", "rmt")
DEFAULT_METHODS = ("global", "uniform", "rmt-signal", "rmt", "rmt-nosv", "sv-global")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tag(spec: str) -> str:
    """Cache-file prefix of a model spec (the reference ViT keeps its historical name)."""
    if spec == SPEC:
        return "vit64x4"
    return spec.replace(":", "_").replace(",", "_").replace("=", "")


def train_vit(
    dataset: str, seed: int, epochs: int, subset: int | None, spec: str = SPEC
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from the cache) a ViT: Adam, lr 1e-3 cosine to 0, batch 128, on the ``train``
    split (the training file minus the fixed validation split). The cache file is keyed by the
    training code's hash too (:func:`_env.training_code`), so a code change retrains."""
    train_ds = load_dataset(dataset, "train")
    if subset:
        train_ds = train_ds.subset(subset)
    torch.manual_seed(seed)
    model = build_model(spec, train_ds.input_shape, train_ds.num_classes)
    tag = f"{_tag(spec)}_{dataset}_s{seed}_e{epochs}_n{len(train_ds)}_c{training_code()}"
    path = CACHE / f"{tag}.safetensors"
    info_path = CACHE / f"{tag}.json"
    if path.is_file() and info_path.is_file():
        load_sparse_into(path, model)
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
    info = {
        "train_seconds": time.perf_counter() - t0,
        "epochs": epochs,
        "train_images": len(train_ds),
        "code": training_code(),
        "revision": git_revision(),
    }
    save_model(path, model, metadata={"spec": spec})
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
    cfg = bench_config(args, target=target, **METHODS[method])
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


def bench_config(args: argparse.Namespace, **kw: Any) -> SparsifyConfig:
    """The benchmark's SparsifyConfig: its cycles and short fine-tune, with ``kw`` on top."""
    return SparsifyConfig(
        n_cycles=args.cycles,
        cycle_steps=args.cycle_steps,
        finetune_epochs=args.ft_epochs,
        lr=args.ft_lr,
        schedule="cosine",
        warmup=args.warmup,
        **kw,
    )


def run_lowrank(
    base: nn.Module, keep_bulk: float, ft: bool, args: argparse.Namespace, data: Any, test: Any, seed: int
) -> dict:
    """Low-rank compression of a copy (BEMA, ``keep_bulk``); with ``ft``, the same fine-tune."""
    from rmtprune.surgery import compress

    model = copy.deepcopy(base)
    _, plan = compress(model, keep_bulk=keep_bulk)
    if ft:
        torch.manual_seed(seed)
        loader = batches(data, 128, shuffle=True, generator=torch.Generator().manual_seed(1000 + seed))
        # target 0: sparsify prunes nothing and runs exactly the fine-tune every sparse run gets
        sparsify(
            model,
            bench_config(args, target=0.0, budget="global", sv_sparsify=False),
            data=loader,
            show_progress=False,
        )
    counts = count_nonzeros(model)
    return {
        "method": f"lowrank kb={keep_bulk:g}",
        "keep_bulk": keep_bulk,
        "ft": ft,
        "seed": seed,
        "accuracy": evaluate(model, test)["accuracy"],
        "stored": counts["stored"],
        "total": sum(p.numel() for p in base.parameters()),
        "factored": sum(1 for m in model.modules() if type(m).__name__.startswith("LowRank")),
    }


def layer_budgets(
    base: nn.Module, fits: list[dict[str, Any]] | None = None, target: float = 0.5
) -> list[dict[str, Any]]:
    """Per layer of ``base``: spikes, bulk energy, and its sparsity under each budget at ``target``
    (no SV step, no fine-tune), to show where each rule puts the pruning."""
    by_layer = {f["layer"]: f for f in (fits if fits is not None else _fits(base))}
    rows: dict[str, dict[str, Any]] = {}
    for budget in ("global", "energy", "signal", "uniform"):
        model = copy.deepcopy(base)
        _, report = sparsify(
            model, SparsifyConfig(target=target, budget=budget, sv_sparsify=False), show_progress=False
        )
        for r in report.layers:
            row = rows.setdefault(r.name, {"layer": r.name, "params": r.params, **by_layer.get(r.name, {})})
            row[budget] = r.sparsity
    return list(rows.values())


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
    fig = Figure(figsize=(max(6.5 * len(datasets), 10), 10.5))
    handles: list[Any] = []
    labels: list[str] = []
    FigureCanvasAgg(fig)
    colors = {
        "global": "tab:blue",
        "uniform": "tab:orange",
        "rmt": "tab:green",
        "rmt-nosv": "tab:olive",
        "sv-global": "tab:cyan",
        "rmt-noise": "tab:purple",
        "rmt-signal": "tab:brown",
    }
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
                    xs, ys, es = [], [], []
                    for t in sorted({r["target"] for r in rows}):
                        sel = [r for r in rows if r["target"] == t]
                        accs = [100 * r["accuracy"] for r in sel]
                        xs.append(statistics.mean(r["stored"] / r["total"] for r in sel))
                        ys.append(statistics.mean(accs))
                        es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
                    label = f"{LABELS[method]} ({'fine-tuned' if ft else 'no fine-tune'})"
                    ax.errorbar(
                        xs, ys, yerr=es, fmt=style, color=color, marker="o", ms=3, capsize=2, label=label
                    )
            for ft, marker in ((False, "x"), (True, "s")):
                pts = []
                for kb in sorted({r["keep_bulk"] for r in res["lowrank"]}):
                    sel = [r for r in res["lowrank"] if r["keep_bulk"] == kb and r["ft"] == ft]
                    if sel:
                        x = statistics.mean(r["stored"] / r["total"] for r in sel)
                        pts.append((x, statistics.mean(100 * r["accuracy"] for r in sel), kb))
                if not pts:
                    continue
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
                ax.set_title(f"{res.get('spec', SPEC)} on {ds}", fontsize=9)
            else:
                ax.set_ylim(dense_acc - 6, dense_acc + 1)
                ax.set_title(f"{ds}: zoom near the dense accuracy")
            ax.grid(alpha=0.3)
            if i == 0 and row == 0:
                handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _report(args: argparse.Namespace, results: dict[str, Any], seconds: float) -> str:
    first = results[next(iter(results))]
    lines = [
        f"# Sparsifying a ViT (`{first.get('spec', SPEC)}`): RMT-guided budgets vs magnitude pruning, "
        "and low rank",
        "",
        *([args.preamble.read_text().strip(), "", "## Run", ""] if args.preamble else []),
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: 2 CPU cores, no GPU ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), shared with other jobs)",
        "- rerun: the commands under Notes (they ran in parallel, one data set each; the same command "
        "without --datasets/--out/--json runs both data sets sequentially); trained models are cached "
        "in ~/.cache/rmtprune/bench",
        f"- revision: {git_revision()} (training code {training_code()}, the key of the cached ViTs)",
        f"- time of the sparse runs (sparsify, fine-tune, evaluate), summed: {seconds / 60:.1f} min",
        f"- model: `{first.get('spec', SPEC)}` ({first['dense']['total']:,} parameters), "
        f"{max(r['dense'].get('n_seeds', 1) for r in results.values())} independently trained seed(s) "
        "per data set, each trained "
        f"{', '.join(f'{n} epoch(s) on {ds}' for ds, n in args.epochs_of.items())} "
        f"(Adam 1e-3, cosine to 0, batch 128) on {first['dense'].get('train_images', 60000):,} training "
        f"images; accuracy on {'the first ' + str(args.test_subset) if args.test_subset else 'all 10,000'} "
        "test images; seed s also seeds the fine-tune batches and is paired across methods; "
        "cells are mean ± std over seeds",
        f"- short fine-tune (same for every method, and for the dense and low-rank references): "
        f"{args.cycles} cycles with the target ramping linearly, {args.cycle_steps} Adam steps "
        f"(L1 = L2 = 1e-6) after each, then {args.ft_epochs:g} epoch; every fine-tune call warms up over "
        f"{args.warmup:.0%} of its steps to lr {args.ft_lr:g}, then decays it to 0 (cosine); batch 128, "
        "same batch order for every method",
        "- sparsity is over all Linear/Conv weights (patch embedding, q/k/v/out, MLPs, head); "
        "'stored' counts every parameter as the sparse file stores it (biases, norms, embeddings dense)",
        "",
        f"![accuracy vs stored parameters]({args.out.with_suffix('.png').name})",
        "",
    ]
    for ds, res in results.items():
        dense = res["dense"]
        head = f"Dense: {_pm(dense, 'accuracy')} ({dense['total']:,} parameters)"
        if "accuracy_ft" in dense:
            head += (
                "; the dense model given the same fine-tune (steps, lr schedule, L1/L2, no masks): "
                f"{_pm(dense, 'accuracy_ft')}"
            )
        head += f"; training took {dense['train_seconds'] / 60:.1f} min per model"
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
        rows = res["sparse"]
        present = [m for m in LABELS if any(r["method"] == m for r in rows)]
        rmts = [m for m in RMT_METHODS if m in present]
        lines += [
            "| sparsity | fine-tune | "
            + " | ".join(LABELS[m] for m in present)
            + "".join(f" | {m} - global (pp, paired: mean ± std [95% CI])" for m in rmts)
            + " | seeds |",
            "|---|---|" + "---|" * (len(present) + len(rmts)) + "---|",
        ]
        for t in sorted({r["target"] for r in rows}):
            for ft in (False, True):
                cells, n_seeds = [], 0
                for m in present:
                    accs = [
                        r["accuracy"] for r in rows if r["target"] == t and r["ft"] == ft and r["method"] == m
                    ]
                    cells.append(_mean_std(accs) if accs else "-")
                    n_seeds = max(n_seeds, len(accs))
                if n_seeds == 0:
                    continue
                lines.append(
                    f"| {t:.0%} | {'yes' if ft else 'no'} | "
                    + " | ".join(cells)
                    + "".join(f" | {_diff_text(rows, t, ft, m)}" for m in rmts)
                    + f" | {n_seeds} |"
                )
        if not res["lowrank"]:
            lines.append("")
            continue
        lines += ["", "Low rank (BEMA; `keep_bulk=0` is the default rule):", ""]
        lines += [
            "| keep_bulk | fine-tune | factored layers | stored / dense | accuracy |",
            "|---|---|---|---|---|",
        ]
        for kb in sorted({r["keep_bulk"] for r in res["lowrank"]}):
            for ft in (False, True):
                sel = [r for r in res["lowrank"] if r["keep_bulk"] == kb and r["ft"] == ft]
                if not sel:
                    continue
                stored = statistics.mean(r["stored"] / r["total"] for r in sel)
                factored = statistics.mean(r["factored"] for r in sel)
                lines.append(
                    f"| {kb:g} | {'yes' if ft else 'no'} | {factored:.1f} | {stored:.1%} | "
                    f"{_mean_std([r['accuracy'] for r in sel])} |"
                )
        lines.append("")
    lines += _budget_tables(results)
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


def _budget_tables(results: dict[str, Any]) -> list[str]:
    """Where each budget rule puts the pruning at 50% (seed-0 model, no SV step, no fine-tune)."""
    out = []
    for ds, res in results.items():
        rows = res.get("layer_budgets")
        if not rows:
            continue
        out += [
            f"### Where the budgets prune: {ds}, 50% sparsity, seed {res.get('layer_budgets_seed', 0)}",
            "",
            "| layer | params | spikes | bulk energy | KS | global | energy | signal | uniform |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            be = r.get("bulk_energy")
            ks = r.get("ks")
            out.append(
                f"| {r['layer']} | {r['params']:,} | {r.get('n_spikes', '-')} | "
                f"{'-' if be is None else f'{be:.2f}'} | {'-' if ks is None else f'{ks:.3f}'} | "
                + " | ".join(f"{r[b]:.0%}" for b in ("global", "energy", "signal", "uniform"))
                + " |"
            )
        out.append("")
    return out


def _paired(rows: list[dict[str, Any]], a: str, b: str, t: float, ft: bool) -> list[float]:
    """Per-seed accuracy differences ``a - b`` at sparsity ``t`` (seeds present for both)."""
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in rows if r["target"] == t and r["ft"] == ft}
    seeds = sorted({s for m, s in acc if m == a} & {s for m, s in acc if m == b})
    return [acc[(a, s)] - acc[(b, s)] for s in seeds]


def _diff_text(rows: list[dict[str, Any]], t: float, ft: bool, method: str) -> str:
    d = _paired(rows, method, "global", t, ft)
    if not d:
        return "-"
    if len(d) == 1:
        return f"{100 * d[0]:+.2f}"
    _, _, lo, hi = ci(d, 0.95)
    mean, std = 100 * statistics.mean(d), 100 * statistics.stdev(d)
    return f"{mean:+.2f} ± {std:.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _pm(dense: dict[str, Any], key: str) -> str:
    if dense.get("n_seeds", 1) > 1:
        return f"{100 * dense[key]:.2f} ± {100 * dense[key + '_std']:.2f}%"
    return f"{100 * dense[key]:.2f}%"


def _compare(ds: str, rows: list[dict[str, Any]], method: str, ft: bool, n_test: int = 0) -> list[str]:
    """Where ``method`` is below global magnitude at sparsity >= 30% (paired by seed)."""
    worse, within, compared = [], [], 0
    for t in sorted({r["target"] for r in rows if r["ft"] == ft}):
        d = _paired(rows, method, "global", t, ft)
        if t < 0.3 - 1e-9 or not d:
            continue
        compared += 1
        mu = 100 * statistics.mean(d)
        sd = 100 * statistics.stdev(d) if len(d) > 1 else 0.0
        if mu < 0:
            noisy = sd and -mu <= 2 * sd / math.sqrt(len(d))
            spread = f" ± {sd:.2f} pp" if len(d) > 1 else " pp, 1 seed"
            images = f"; {-mu * n_test / 100:.1f} of {n_test:,} test images" if n_test else ""
            (within if noisy else worse).append(f"{t:.0%} ({mu:+.2f}{spread}{images})")
    who, tag = LABELS[method], "with" if ft else "without"
    if not compared:
        return []
    if not worse and not within:
        return [f"- {ds}, {tag} fine-tune: {who} >= global magnitude at every sparsity >= 30%."]
    out = []
    if worse:
        out.append(f"- {ds}, {tag} fine-tune: {who} is below global magnitude at {', '.join(worse)}.")
    if within:
        out.append(
            f"- {ds}, {tag} fine-tune: {who} is below global magnitude, but within two standard errors "
            f"of the paired seed differences, at {', '.join(within)}."
        )
    return out


def _verdict(results: dict[str, Any]) -> list[str]:
    """The issue's targets, checked on the numbers above (means over seeds, differences paired by seed)."""
    out = []
    for ds, res in results.items():
        dense = res["dense"]["accuracy"]
        rows = res["sparse"]

        def mean(method: str, t: float, ft: bool, rows: list = rows) -> float:
            accs = [
                r["accuracy"] for r in rows if r["method"] == method and r["target"] == t and r["ft"] == ft
            ]
            return statistics.mean(accs) if accs else math.nan

        for m in [m for m in (*RMT_METHODS, "global", "uniform") if not math.isnan(mean(m, 0.5, True))]:
            loss = 100 * (dense - mean(m, 0.5, True))
            ok = "met" if loss <= 1.0 else "NOT met"
            verb = f"loses {loss:.2f} pp" if loss >= 0 else f"gains {-loss:.2f} pp"
            text = (
                f"- {ds}, 50% sparsity after the short fine-tune: {LABELS[m]} {verb} against "
                f"the dense model (target <= 1 pp: {ok})"
            )
            if "accuracy_ft" in res["dense"]:
                gap = 100 * (res["dense"]["accuracy_ft"] - mean(m, 0.5, True))
                text += f"; {gap:.2f} pp against the dense model fine-tuned alike"
            out.append(text + ".")
        for method in [m for m in RMT_METHODS if any(r["method"] == m for r in rows)]:
            for ft in (False, True):
                out += _compare(ds, rows, method, ft, res.get("n_test", 10_000))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist"])
    p.add_argument("--epochs", default="15", help="training epochs: N, or DATASET=N,... per dataset")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    p.add_argument(
        "--ft-sparsities", default="0.3,0.4,0.5,0.6,0.7", help="sparsities also run with the fine-tune"
    )
    p.add_argument(
        "--seeds", type=int, default=3, help="independently trained models (seed s also seeds its fine-tunes)"
    )
    p.add_argument(
        "--seed-list", default=None, help="only these seeds, e.g. 1,2 (parallel runs; merge with --render)"
    )
    p.add_argument("--spec", default=SPEC, help="the ViT to train (a rmtprune model spec)")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--cycle-steps", type=int, default=20)
    p.add_argument("--ft-epochs", type=float, default=0.5)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="fine-tune warmup fraction (then cosine to 0)")
    p.add_argument("--keep-bulk", default="0,0.25,0.5")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"subset of {list(METHODS)}")
    p.add_argument("--no-lowrank", action="store_true", help="skip the low-rank runs")
    p.add_argument("--no-dense-ft", action="store_true", help="skip the dense + fine-tune reference")
    p.add_argument("--note", action="append", default=[], help="a line added to the report's notes")
    p.add_argument(
        "--preamble",
        type=Path,
        default=None,
        help="a markdown file (e.g. a pre-registered protocol) put first",
    )
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
        args.sparsities, args.ft_sparsities, args.seeds = "0.3,0.5,0.7", "0.5", 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RMTPRUNE_DATA", str(ROOT.parent / "shared" / "data"))
    if args.render:
        results: dict[str, Any] = {}
        for path in args.render:  # rows of several runs on the same dataset are merged
            for ds, res in json.loads(path.read_text()).items():
                if ds not in results:
                    results[ds] = res
                    continue
                results[ds]["sparse"] += res["sparse"]
                results[ds]["lowrank"] += res["lowrank"]
                seen = {d["seed"] for d in results[ds].get("dense_seeds", [])}
                extra = [d for d in res.get("dense_seeds", []) if d["seed"] not in seen]
                if extra:
                    results[ds]["dense_seeds"] = results[ds].get("dense_seeds", []) + extra
                    results[ds]["dense"] = _dense_summary(results[ds]["dense_seeds"], res["dense"]["epochs"])
                results[ds]["fits"] = results[ds].get("fits") or res.get("fits")
                results[ds]["command"] = f"{results[ds]['command']}` and `{res['command']}"
        args.epochs_of = {ds: res["dense"]["epochs"] for ds, res in results.items()}
        for ds, res in results.items():  # older raw results: recompute from the cached seed-0 model
            spec = res.get("spec", SPEC)
            cached = CACHE / f"{_tag(spec)}_{ds}_s0_e{res['dense']['epochs']}_n{res['dense']['train_images']}"
            if "layer_budgets" not in res and cached.with_suffix(".json").is_file():
                base, _ = train_vit(ds, 0, res["dense"]["epochs"], None, spec)
                res["layer_budgets"], res["layer_budgets_seed"] = layer_budgets(base), 0
        seconds = sum(r.get("seconds", 0) for res in results.values() for r in res["sparse"] + res["lowrank"])
        atomic_write_text(args.json or args.out.with_suffix(".json"), json.dumps(results, indent=1))
        _write(args, results, seconds)
        return 0
    args.epochs_of = _epochs(args.epochs, args.datasets)
    sparsities = [float(v) for v in args.sparsities.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {list(METHODS)}")
    ft_sparsities = [float(v) for v in args.ft_sparsities.split(",")]
    seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    json_path = args.json or args.out.with_suffix(".json")
    for ds in args.datasets:
        train_ds = load_dataset(ds, "train")
        if args.train_subset:
            train_ds = train_ds.subset(args.train_subset)
        test_ds = load_dataset(ds, "test")
        test = batches(test_ds.subset(args.test_subset) if args.test_subset else test_ds, 1000)
        res: dict[str, Any] = {
            "dense": {},
            "dense_seeds": [],
            "sparse": [],
            "lowrank": [],
            "command": args.command,
        }
        res["spec"] = args.spec
        res["n_test"] = min(args.test_subset or len(test_ds), len(test_ds))
        results[ds] = res
        for seed in seeds:
            _log(f"[{ds}] seed {seed}: training / loading the ViT")
            base, info = train_vit(ds, seed, args.epochs_of[ds], args.train_subset, args.spec)
            dense = {
                "seed": seed,
                "accuracy": evaluate(base, test)["accuracy"],
                **count_nonzeros(base),
                **info,
            }
            if ft_sparsities and not args.no_dense_ft:  # the dense model given the same fine-tune
                dense["accuracy_ft"] = run_sparse(base, "global", 0.0, True, args, train_ds, test, seed)[
                    "accuracy"
                ]
            _log(
                f"[{ds}] seed {seed}: dense {100 * dense['accuracy']:.2f}%, + fine-tune "
                f"{100 * dense.get('accuracy_ft', math.nan):.2f}%"
            )
            res["dense_seeds"].append(dense)
            res["dense"] = _dense_summary(res["dense_seeds"], args.epochs_of[ds])
            if seed == min(seeds):
                res["fits"] = _fits(base)
                res["layer_budgets"] = layer_budgets(base, res["fits"])
                res["layer_budgets_seed"] = seed
            jobs = [
                (m, t, ft)
                for t in sparsities
                for ft in (False, True)
                for m in methods
                if not ft or t in ft_sparsities
            ]
            for i, (m, t, ft) in enumerate(jobs, 1):
                row = run_sparse(base, m, t, ft, args, train_ds, test, seed)
                res["sparse"].append(row)
                _log(
                    f"[{ds}] seed {seed} {i}/{len(jobs)} {m:9s} s={t:.0%} ft={ft!s:5s} "
                    f"acc={100 * row['accuracy']:.2f}% ({row['seconds']:.0f} s)"
                )
                atomic_write_text(json_path, json.dumps(results, indent=1))
            for kb in [] if args.no_lowrank else [float(v) for v in args.keep_bulk.split(",")]:
                for ft in (False, True):
                    row = run_lowrank(base, kb, ft, args, train_ds, test, seed)
                    res["lowrank"].append(row)
                    _log(
                        f"[{ds}] seed {seed} lowrank kb={kb:g} ft={ft} acc={100 * row['accuracy']:.2f}% "
                        f"stored={row['stored']:,}"
                    )
            atomic_write_text(json_path, json.dumps(results, indent=1))
    _log(f"done in {(time.perf_counter() - t0) / 60:.1f} min")
    _write(args, results, sum(r.get("seconds", 0) for res in results.values() for r in res["sparse"]))
    return 0


def _dense_summary(seeds: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """Mean dense accuracy (and dense + fine-tune) over the trained seeds, with their spread."""
    out = {k: v for k, v in seeds[0].items() if k not in ("seed", "accuracy", "accuracy_ft")}
    out["epochs"] = epochs
    out["n_seeds"] = len(seeds)
    for key in ("accuracy", "accuracy_ft"):
        vals = [d[key] for d in seeds if key in d]
        if vals:
            out[key] = statistics.mean(vals)
            out[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    out["train_seconds"] = statistics.mean(d["train_seconds"] for d in seeds)
    return out


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
