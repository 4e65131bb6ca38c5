"""Do the sparsify budgets carry over from ViTs to MLPs and CNNs? One-shot pruning, no fine-tune.

The ``signal`` budget became :func:`rmtprune.sparsify`'s default on ViT evidence
(``sparsify_vit.md``). This script checks it on the dense MLPs and CNNs that the experiment
scripts trained (``exp_mnist_mlp.py``, ``exp_fashion_mlp.py``, ``exp_fashion_cnn.py``; run them
first, their runs are cached under ``runs/bench-cache``): for every cached full-data dense run of
the longest schedule, one copy per method and sparsity is pruned with :func:`rmtprune.sparsify`
(no data, so no fine-tune) and evaluated on the whole test split. Methods: ``global`` and
``uniform`` magnitude, ``signal`` (default) and ``energy`` (paper) with the singular-vector step.

Run: ``python benchmarks/sparsify_budgets.py`` (writes ``benchmarks/results/sparsify_budgets.md``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _cli import CACHE, ROOT, command_line, log
from _env import git_revision, versions
from _report import machine, md_table
from _stats import mean_std, pm

from rmtprune._atomic import atomic_write_text
from rmtprune.finetune import evaluate
from rmtprune.sparsity import SparsifyConfig, sparsify
from rmtprune.zoo.data import batches, load_dataset

TAGS = {
    "mnist-mlp-dense": "MNIST MLP",
    "fashion-mlp-dense": "Fashion-MNIST MLP",
    "fashion-cnn-dense": "Fashion-MNIST CNN",
}
METHODS = {
    "global": {"budget": "global", "sv_sparsify": False},
    "uniform": {"budget": "uniform", "sv_sparsify": False},
    "signal": {"budget": "signal", "sv_sparsify": True},
    "energy": {"budget": "energy", "sv_sparsify": True},
}


def cached_runs(cache: Path, tag: str) -> list[dict[str, Any]]:
    """The full-data runs of ``tag`` with the most epochs (per model spec: the most seeds), one per seed."""
    runs = []
    for path in sorted(cache.glob(f"{tag}-*.pt")):
        run = torch.load(path, map_location="cpu", weights_only=False)
        if run["config"].get("train_subset") is None:
            runs.append(run)
    if not runs:
        return []
    best_epochs = max(r["config"]["epochs"] for r in runs)
    runs = [r for r in runs if r["config"]["epochs"] == best_epochs]
    by_spec: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_spec.setdefault(r["config"]["model"], []).append(r)
    chosen = max(by_spec.values(), key=len)
    seen, out = set(), []
    for r in sorted(chosen, key=lambda r: r["config"]["seed"]):
        if r["config"]["seed"] not in seen:
            seen.add(r["config"]["seed"])
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=CACHE, help="runs cached by the experiment scripts")
    p.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparsify_budgets.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RMTPRUNE_DATA", str(ROOT.parent / "shared" / "data"))
    sparsities = [float(v) for v in args.sparsities.split(",")]
    t0 = time.perf_counter()
    sections = []
    for tag, title in TAGS.items():
        runs = cached_runs(args.cache, tag)
        if not runs:
            log(f"[{tag}] no cached full-data dense runs in {args.cache}: skipped (run its exp_* script)")
            continue
        cfg = runs[0]["config"]
        test = batches(load_dataset(cfg["dataset"], "test"), 1000)
        dense = [evaluate(r["model"], test)["accuracy"] for r in runs]
        acc: dict[tuple[str, float], list[float]] = {}
        achieved: dict[tuple[str, float], list[float]] = {}
        layers_dense: dict[str, list[int]] = {}
        for r in runs:
            for t in sparsities:
                for m, kw in METHODS.items():
                    model = copy.deepcopy(r["model"]).eval()
                    _, report = sparsify(model, SparsifyConfig(target=t, **kw), show_progress=False)
                    acc.setdefault((m, t), []).append(evaluate(model, test)["accuracy"])
                    achieved.setdefault((m, t), []).append(report.achieved)
                    if m == "signal" and t == sparsities[0]:
                        layers_dense.setdefault(m, []).append(
                            sum(1 for lr in report.layers if lr.nnz_after == lr.params)
                        )
            log(f"[{tag}] seed {r['config']['seed']} done")
        rows = []
        for t in sparsities:
            cells = [f"{t:.0%}"]
            for m in METHODS:
                vals = acc[(m, t)]
                got = statistics.mean(achieved[(m, t)])
                short = f" (achieved {got:.0%})" if got < t - 0.005 else ""
                cells.append(pm(vals, 100) + short)
            for m in ("signal", "energy"):
                if statistics.mean(achieved[(m, t)]) < t - 0.005:
                    cells.append("n/a: target not reached")
                    continue
                d = [a - b for a, b in zip(acc[(m, t)], acc[("global", t)], strict=True)]
                mu, sd = mean_std(d)
                cells.append(f"{100 * mu:+.2f} +- {100 * sd:.2f}")
            rows.append(cells)
        n_layers = len(report.layers)
        sections.append(
            f"## {title} (`{cfg['model']}`, {cfg['epochs']} epochs, seeds "
            f"{', '.join(str(r['config']['seed']) for r in runs)})\n\n"
            f"Dense: {pm(dense, 100)}%. Layers left dense by "
            f"`signal` for want of an accepted MP fit: {statistics.mean(layers_dense['signal']):.1f} of "
            f"{n_layers}; their weights count toward the target, so the other layers are pruned harder, and "
            "where too few weights are left the target is not reached (the cell says what was).\n\n"
            + md_table(
                ["sparsity", *METHODS, "signal - global (pp)", "energy - global (pp)"],
                rows,
            )
        )
    if not sections:
        raise SystemExit(f"no cached dense runs under {args.cache}: run benchmarks/exp_*.py first")
    head = [
        "# Sparsify budgets on MLPs and CNNs (one shot, no fine-tune)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- revision: {git_revision()}",
        f"- machine: {machine()} (shared), {versions('rmtprune', 'torch')}",
        f"- command: `{command_line().split(' --note ')[0]}`{' (+ the notes below)' if args.note else ''} "
        f"({(time.perf_counter() - t0) / 60:.1f} min)",
        "- models: the dense runs cached by the experiment scripts; accuracy on the whole test split; "
        "mean +- std over seeds, differences paired by seed; sparsity over all Linear/Conv weights "
        "(the last layer included); RMT methods with the singular-vector step",
        "",
    ]
    if args.note:
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in args.note))
    text = "\n".join(head) + "\n" + "\n\n".join(sections) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
