"""Rank rules at equal parameter count: BEMA vs Gavish-Donoho vs energy vs uniform rank vs magnitude pruning.

For every model (trained once per seed, weights cached) and every rank rule, a deep copy of the
trained model is compressed with :func:`rmtprune.compress` (post-training, no fine-tuning):

- ``bema`` with ``keep_bulk`` 0 (spikes only), 0.25 and 0.5;
- ``gavish_donoho`` (unknown noise, median rule);
- ``energy`` keeping 90 / 95 / 99 % of ``sum(s**2)``;
- ``fixed`` rank ratio (the uniform-rank baseline): a sweep, plus the three ratios that land on the
  table budgets (25 / 50 / 75 % of the dense prunable weights);
- unstructured global magnitude pruning (``torch.nn.utils.prune.global_unstructured`` with
  ``L1Unstructured``) over the same layers at exactly the stored weight count of every low-rank
  result, and at the three budgets.

Every method acts on the same layers: every ``nn.Linear`` / ``nn.Conv2d`` except the classifier
head (``CompressionConfig.protect_last``, the library default, keeps the head; magnitude pruning
leaves it alone too). Parameters are counted as stored, weights only (biases are identical for
all methods): a factored layer counts ``k (m + n)``, a dense one ``m n``, a masked one its
nonzeros. Then the same with one epoch of fine-tuning (same optimiser, learning rate and batch
order for every method; masks kept fixed through ``torch.nn.utils.prune``'s reparametrisation;
``--ft-images N``: one pass over a fixed random subset of N training images instead, where a full
epoch per result does not fit the time budget).
Latency: median CPU forward time at batch 256 and batch 1, interleaved with the dense model,
for every low-rank result and for a masked model (zeros in a dense matmul: no speed-up).

Raw results are stored per model as JSON under ``--cache`` (``rank_rules/<model>.json``), so
models can run as separate (parallel) invocations; every invocation rewrites the markdown and the
plots from all stored models.

Run: ``python benchmarks/rank_rules.py [--models mnist_mlp,fashion_cnn] [--seeds 0,1,2] [--quick]``;
writes ``benchmarks/results/rank_rules.md`` and ``rank_rules_<model>.png``.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _cli import log
from _env import git_revision
from _measure import test_metrics
from _report import md_table
from torch import nn
from torch.nn.utils import prune

import rmtprune
from rmtprune._atomic import atomic_path, atomic_write_text
from rmtprune.analysis import as_matrix
from rmtprune.config import CompressionConfig
from rmtprune.lowrank import LowRankModule
from rmtprune.spectral import MIN_P
from rmtprune.training import TrainConfig, train
from rmtprune.zoo.data import batches, load_dataset
from rmtprune.zoo.models import build_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
DEFAULT_CACHE = Path(os.environ.get("RMTPRUNE_BENCH_CACHE", Path.home() / ".cache" / "rmtprune" / "bench"))
#: Older caches of the experiment scripts whose dense runs are reused when their config matches.
REUSE = (ROOT / "runs" / "bench-cache",)
VIT_SPEC = "vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2"

#: name -> dataset, model spec, training recipe (TrainConfig fields), fine-tuning optimiser and lr.
MODELS: dict[str, dict[str, Any]] = {
    "mnist_mlp": dict(
        dataset="mnist", spec="mlp:1000", epochs=8, optimizer="sgd", lr=0.05, ft_opt="sgd", ft_lr=0.01
    ),
    "fashion_mlp": dict(
        dataset="fashion-mnist", spec="mlp:1000,1000", epochs=6, optimizer="sgd", lr=0.05, ft_opt="sgd",
        ft_lr=0.01,
    ),
    "fashion_cnn": dict(
        dataset="fashion-mnist", spec="cnn", epochs=3, optimizer="sgd", lr=0.05, ft_opt="sgd", ft_lr=0.01
    ),
    "fashion_vit": dict(
        dataset="fashion-mnist", spec=VIT_SPEC, epochs=2, optimizer="adamw", lr=1e-3, ft_opt="adamw",
        ft_lr=3e-4,
    ),
}  # fmt: skip
TITLES = {
    "mnist_mlp": "MNIST MLP [784, 1000, 10]",
    "fashion_mlp": "Fashion-MNIST MLP [784, 1000, 1000, 10]",
    "fashion_cnn": "Fashion-MNIST CNN (conv 32, 64, fc 128)",
    "fashion_vit": "Fashion-MNIST ViT (dim 64, depth 4, patch 7)",
}
#: Training-config fields that decide what is trained (a cached run must match all of them).
MATCH = (
    "dataset", "model", "epochs", "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "batch_size",
    "seed", "prune", "l1", "l2", "train_subset", "test_subset",
)  # fmt: skip
RULE_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("bema", "BEMA spikes", dict(rule="bema", keep_bulk=0.0)),
    ("bema", "BEMA +25% bulk", dict(rule="bema", keep_bulk=0.25)),
    ("bema", "BEMA +50% bulk", dict(rule="bema", keep_bulk=0.5)),
    # KS distance is <= 1: ks_max=1 switches the gate off (shows what BEMA would cut where the gate refuses)
    ("bema", "BEMA spikes (no gate)", dict(rule="bema", keep_bulk=0.0, ks_max=1.0)),
    ("bema", "BEMA +25% bulk (no gate)", dict(rule="bema", keep_bulk=0.25, ks_max=1.0)),
    ("gavish_donoho", "Gavish-Donoho", dict(rule="gavish_donoho")),
    ("energy", "energy 90%", dict(rule="energy", energy=0.90)),
    ("energy", "energy 95%", dict(rule="energy", energy=0.95)),
    ("energy", "energy 99%", dict(rule="energy", energy=0.99)),
]
SWEEP = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
BUDGETS = (0.25, 0.5, 0.75)
FAMILIES = ("bema", "gavish_donoho", "energy", "uniform", "magnitude")
FAMILY_LABEL = {
    "bema": "BEMA",
    "gavish_donoho": "Gavish-Donoho",
    "energy": "energy",
    "uniform": "uniform rank",
    "magnitude": "magnitude (masks)",
}


#: Heading of the hand-written discussion at the end of the report, kept when the tables are rewritten.
DISCUSSION = "## Discussion"


# ----------------------------------------------------------------------------- training (cached)


def train_config(name: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    spec = MODELS[name]
    return TrainConfig(
        dataset=spec["dataset"],
        model=spec["spec"],
        epochs=args.epochs or spec["epochs"],
        optimizer=spec["optimizer"],
        lr=spec["lr"],
        momentum=0.9,
        lr_schedule="cosine",
        batch_size=128,
        seed=seed,
        prune=False,
        track_spectra=False,
        train_subset=6000 if args.quick else None,
    )


def _same(cfg: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(cfg.get(k) == want.get(k) for k in MATCH)


def _vit_from_sparsify_cache(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any] | None:
    """The ViT trained by ``benchmarks/sparsify_vit.py`` (Adam 1e-3 cosine, batch 128), if cached."""
    if cfg.model != VIT_SPEC or cfg.train_subset is not None:
        return None
    tag = f"vit64x4_{cfg.dataset}_s{cfg.seed}_e{cfg.epochs}_n60000"
    path = DEFAULT_CACHE / f"{tag}.safetensors"
    info = DEFAULT_CACHE / f"{tag}.json"
    if not (path.is_file() and info.is_file()):
        return None
    from rmtprune.sparse_format import load_sparse_into

    ds = load_dataset(cfg.dataset, "test", data_dir=args.data_dir)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes)
    load_sparse_into(path, model)
    meta = json.loads(info.read_text())
    log(f"  reusing {path} (benchmarks/sparsify_vit.py: Adam lr 1e-3 cosine, batch 128)")
    recipe = f"Adam lr 1e-3 cosine to 0, batch 128, {cfg.epochs} epochs (trained by sparsify_vit.py)"
    return {"model": model.eval(), "wall": float(meta.get("train_seconds", float("nan"))), "recipe": recipe}


def trained(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The dense model of ``name`` and ``seed``: from the cache, or trained now and cached."""
    cfg = train_config(name, seed, args)
    want = cfg.to_dict()
    key = hashlib.sha256(json.dumps({k: want[k] for k in MATCH}, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(args.cache)
    path = cache / f"rank_rules-{name}-s{seed}-{key}.pt"
    recipe = (
        f"{cfg.optimizer.upper() if cfg.optimizer == 'sgd' else 'AdamW'} lr {cfg.lr:g}"
        + (" momentum 0.9" if cfg.optimizer == "sgd" else "")
        + f", cosine schedule, batch {cfg.batch_size}, {cfg.epochs} epochs"
        + (f", first {cfg.train_subset} training images" if cfg.train_subset else "")
    )
    if path.is_file() and not args.refresh:
        run = torch.load(path, map_location="cpu", weights_only=False)
        log(f"  cached: {path}")
        return {"model": run["model"].eval(), "wall": run["wall"], "recipe": recipe}
    if not args.refresh:
        vit = _vit_from_sparsify_cache(cfg, args)
        if vit is not None:
            return vit
        for folder in REUSE:
            for other in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
                try:
                    run = torch.load(other, map_location="cpu", weights_only=False)
                except Exception:  # noqa: BLE001 - a damaged cache file is simply not used
                    continue
                if isinstance(run, dict) and "config" in run and _same(run["config"], want):
                    log(f"  reusing {other} (same training config)")
                    return {
                        "model": run["model"].eval(),
                        "wall": run.get("wall", float("nan")),
                        "recipe": recipe,
                    }
    log(f"  training {name} seed {seed}: {recipe}")
    t0 = time.perf_counter()
    result = train(cfg, data_dir=args.data_dir, log=lambda s: log(f"    {s}"))
    run = {"config": want, "model": result.model.eval(), "wall": time.perf_counter() - t0}
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(run, tmp)
    return {"model": run["model"], "wall": run["wall"], "recipe": recipe}


# ----------------------------------------------------------------------------- counting


def prunable_layers(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` but the last one (the classifier head)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[:-1]


def stored_weights(model: nn.Module, names: Sequence[str]) -> int:
    """Weights of ``names`` as stored: factors ``k (m + n)``, dense ``m n``, masked: nonzeros."""
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, LowRankModule):
            total += mod.first.weight.numel() + mod.second.weight.numel()
        elif hasattr(mod, "weight_mask"):
            total += int(mod.weight_mask.count_nonzero())
        else:
            total += int(mod.weight.count_nonzero())
    return total


def ranks(model: nn.Module, names: Sequence[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in names:
        mod = model.get_submodule(name)
        out[name] = int(mod.rank) if isinstance(mod, LowRankModule) else None
    return out


def uniform_ratio_for(model: nn.Module, names: Sequence[str], budget: int) -> float:
    """The rank ratio whose uniform cut stores at most ``budget`` weights (closest from below).

    Mirrors :class:`rmtprune.spectral.FixedRule` (``k = min(p, max(1, round(ratio * p)))``) and the
    factor-only-if-smaller test of :func:`rmtprune.plan`; the result is checked against the real count.
    """
    shapes = [tuple(as_matrix(model.get_submodule(n).weight).shape) for n in names]

    def count(r: float) -> int:
        tot = 0
        for m, n in shapes:
            p = min(m, n)
            k = min(p, max(1, round(r * p)))
            tot += k * (m + n) if (p >= MIN_P and k < p and k * (m + n) < m * n) else m * n
        return tot

    lo, hi = 1e-4, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------- methods


def lowrank(model: nn.Module, cfg: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A compressed copy and, per layer, what the plan did and why (action, rank, spikes, ks, reason)."""
    out = copy.deepcopy(model).eval()
    _, plan = rmtprune.compress(out, CompressionConfig(**cfg))
    layers = {
        lp.name: dict(action=lp.action, rank=lp.rank, n_spikes=lp.n_spikes, ks=lp.ks, reason=lp.reason)
        for lp in plan
    }
    return out, layers


def magnitude(model: nn.Module, names: Sequence[str], nonzeros: int) -> nn.Module:
    """Global unstructured L1 magnitude pruning of ``names`` to ``nonzeros`` weights (masks kept)."""
    out = copy.deepcopy(model).eval()
    params = [(out.get_submodule(n), "weight") for n in names]
    total = sum(m.weight.numel() for m, _ in params)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=int(total - nonzeros))
    return out


def unmasked(model: nn.Module) -> nn.Module:
    """A copy with the masks folded into dense weights (zeros stored densely), for timing."""
    out = copy.deepcopy(model).eval()
    for mod in out.modules():
        if hasattr(mod, "weight_mask"):
            prune.remove(mod, "weight")
    return out


def finetune_epoch(
    model: nn.Module, train_ds: Any, opt_name: str, lr: float, seed: int, images: int | None = None
) -> nn.Module:
    """One epoch, batch 128, fixed lr; the batch order depends only on ``seed`` (same for every method).

    ``images``: one pass over that many training images (the same random subset for every method)
    instead of the whole split, where a full epoch per result does not fit the time budget.
    """
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(10_000 + seed)
    if images is not None and images < len(train_ds):
        train_ds = train_ds.subset(torch.randperm(len(train_ds), generator=gen)[:images])
    params = [p for p in out.parameters() if p.requires_grad]
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out.train()
    for x, y in batches(train_ds, 128, shuffle=True, generator=gen):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(out(x), y).backward()
        opt.step()
    return out.eval()


@torch.no_grad()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, dict[str, float]]:
    """Median forward seconds (wall clock and process CPU time) of every model on ``x``.

    The models are interleaved round by round, so a load change on the shared machine hits all of them
    alike. With one torch thread the CPU time excludes the time the process waited for a core.
    """
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(x)  # warm-up
    for _ in range(reps):
        for key, m in models.items():
            c0, t0 = time.process_time(), time.perf_counter()
            m(x)
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    return {
        "wall": {k: statistics.median(v) for k, v in wall.items()},
        "cpu": {k: statistics.median(v) for k, v in cpu.items()},
    }


# ----------------------------------------------------------------------------- one model, one seed


def run_seed(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = MODELS[name]
    test = load_dataset(spec["dataset"], "test", data_dir=args.data_dir)
    train_ds = load_dataset(spec["dataset"], "train", data_dir=args.data_dir)
    if args.quick:
        train_ds = train_ds.subset(6000)
    t_start = time.perf_counter()
    tr = trained(name, seed, args)
    dense = tr["model"]
    names = prunable_layers(dense)
    dense_w = stored_weights(dense, names)
    acc = lambda m: test_metrics(m, test)[1]  # noqa: E731
    dense_acc = acc(dense)
    log(f"  dense: {100 * dense_acc:.2f}%  prunable weights {dense_w:,} in {len(names)} layers")

    # low-rank results
    configs: list[tuple[str, str, dict[str, Any]]] = list(RULE_CONFIGS)
    for r in args.sweep:
        configs.append(("uniform", f"uniform {r:g}", dict(rule="fixed", ratio=r)))
    for b in BUDGETS:
        r = uniform_ratio_for(dense, names, int(b * dense_w))
        configs.append(("uniform", f"uniform @{int(100 * b)}%", dict(rule="fixed", ratio=round(r, 6))))
    budgets = BUDGETS
    if args.only:  # add these results to a stored run
        configs = [c for c in configs if c[1] in args.only]
        budgets = ()
    points: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    for family, label, cfg in configs:
        t0 = time.perf_counter()
        m, layers = lowrank(dense, cfg)
        w = stored_weights(m, names)
        changed = any(v["action"] in ("factor", "dense-truncate") for v in layers.values())
        a = acc(m) if changed else dense_acc  # nothing cut: the dense model itself
        points.append(
            dict(
                family=family, label=label, config=cfg, weights=w, frac=w / dense_w, acc=a,
                ranks=ranks(m, names), plan=layers,
            )
        )  # fmt: skip
        if changed:
            models[label] = m
        log(
            f"  {label:<16} weights {100 * w / dense_w:6.2f}%  acc {100 * a:6.2f}%  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    # magnitude at every low-rank count and at the budgets (deduplicated)
    targets: dict[int, str] = {}
    for b in budgets:
        targets[int(b * dense_w)] = f"magnitude @{int(100 * b)}%"
    for p in points:
        targets.setdefault(p["weights"], f"magnitude = {p['label']}")
    masked: dict[str, nn.Module] = {}
    for nz, label in sorted(targets.items()):
        if nz >= dense_w:
            continue
        m = magnitude(dense, names, nz)
        a = acc(m)
        w = stored_weights(m, names)
        points.append(
            dict(family="magnitude", label=label, config={"nonzeros": nz}, weights=w, frac=w / dense_w, acc=a)
        )
        masked[label] = m
        log(f"  {label:<28} weights {100 * w / dense_w:6.2f}%  acc {100 * a:6.2f}%")

    # one epoch of fine-tuning: dense, every rule result, the budget points, magnitude at the same counts
    if not args.no_ft:
        ft_labels = {p["label"] for p in points if p["family"] in ("bema", "gavish_donoho", "energy")}
        ft_labels |= {f"uniform @{int(100 * b)}%" for b in BUDGETS}
        ft_labels |= {f"magnitude @{int(100 * b)}%" for b in BUDGETS}
        ft_weights = {p["weights"] for p in points if p["label"] in ft_labels}
        ft_labels |= {p["label"] for p in points if p["family"] == "magnitude" and p["weights"] in ft_weights}
        t0 = time.perf_counter()
        ft_dense = finetune_epoch(dense, train_ds, spec["ft_opt"], spec["ft_lr"], seed, args.ft_images)
        dense_ft = acc(ft_dense)
        epoch_s = time.perf_counter() - t0
        log(f"  fine-tune dense: {100 * dense_ft:.2f}% ({epoch_s:.0f} s)")
        for p in points:
            if p["label"] not in ft_labels:
                continue
            if p["family"] != "magnitude" and p["label"] not in models:  # nothing was cut
                p["acc_ft"] = dense_ft
                continue
            src = models.get(p["label"]) or masked.get(p["label"])
            if src is None:
                continue
            t0 = time.perf_counter()
            tuned = finetune_epoch(src, train_ds, spec["ft_opt"], spec["ft_lr"], seed, args.ft_images)
            if p["family"] == "magnitude":
                assert stored_weights(tuned, names) == p["weights"], "masks changed during fine-tuning"
            p["acc_ft"] = acc(tuned)
            log(f"  FT {p['label']:<28} {100 * p['acc_ft']:6.2f}%  ({time.perf_counter() - t0:.0f} s)")
    else:
        dense_ft = None

    # latency (first seed only): dense vs every low-rank model vs one masked model
    lat: dict[str, Any] = {}
    if seed == args.seed_list[0] and not args.no_latency:
        mask_label = f"magnitude @{int(100 * BUDGETS[1])}%"
        timed = {"dense": dense, **models}
        if mask_label in masked:
            timed["masked"] = unmasked(masked[mask_label])
        for bs, reps in ((256, args.reps), (1, 10 * args.reps)):
            x = test.x[:bs]
            med = latencies(timed, x, reps)
            lat[str(bs)] = med
            log(f"  latency batch {bs}: dense {1e3 * med['wall']['dense']:.3f} ms wall")
    return dict(
        seed=seed,
        recipe=tr["recipe"],
        train_wall=tr["wall"],
        dense_acc=dense_acc,
        dense_ft_acc=dense_ft,
        ft_images=args.ft_images or len(train_ds),
        dense_weights=dense_w,
        total_params=sum(p.numel() for p in dense.parameters()),
        layers=names,
        points=points,
        latency=lat,
        wall=time.perf_counter() - t_start,
    )


# ----------------------------------------------------------------------------- report


def _ms(vals: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    vals = [scale * v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} +- {statistics.stdev(vals):.{digits}f}"


def _by_label(res: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in res["seeds"].values():
        for p in s["points"]:
            out.setdefault(p["label"], []).append(p)
    return out


def _interp(points: list[dict[str, Any]], frac: float, key: str) -> float | None:
    """Linear interpolation of ``key`` over the ``frac`` of ``points`` (None outside their range)."""
    pts = sorted((p["frac"], p[key]) for p in points if p.get(key) is not None)
    if not pts or frac < pts[0][0] - 1e-9 or frac > pts[-1][0] + 1e-9:
        return None
    xs, ys = zip(*pts, strict=True)
    return float(np.interp(frac, xs, ys))


def statistics_counts(items: Sequence[str]) -> str:
    """``"factor 4, keep 21"``: how often each value occurs, in first-seen order."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it] = counts.get(it, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _speedup(lat: dict[str, Any], bs: str, label: str) -> str:
    """``wall x / cpu x``: dense median over ``label``'s median, wall clock and CPU time."""
    d = lat.get(bs)
    if not d or label not in d["wall"]:
        return "-"
    return f"{d['wall']['dense'] / d['wall'][label]:.2f}x / {d['cpu']['dense'] / d['cpu'][label]:.2f}x"


def _range(vals: Sequence[float], fmt: str = "{:g}") -> str:
    vals = sorted(vals)
    if not vals:
        return "-"
    if vals[0] == vals[-1]:
        return fmt.format(vals[0])
    return f"{fmt.format(vals[0])}..{fmt.format(vals[-1])} (median {fmt.format(statistics.median(vals))})"


def _ranks_text(r: dict[str, int | None] | None) -> str:
    """Per-layer ranks; for more than 4 layers a summary (range and median of the factored ranks)."""
    if not r:
        return ""
    if len(r) <= 4:
        return ", ".join(f"{k}:{'dense' if v is None else v}" for k, v in r.items())
    cut = [v for v in r.values() if v is not None]
    dense = len(r) - len(cut)
    if not cut:
        return f"all {dense} dense"
    return f"{len(cut)} factored, k {_range(cut)}" + (f"; {dense} dense" if dense else "")


def model_section(name: str, res: dict[str, Any]) -> str:
    seeds = sorted(res["seeds"], key=int)
    first = res["seeds"][seeds[0]]
    by = _by_label(res)
    dense_w = first["dense_weights"]
    lines = [
        f"## {TITLES.get(name, name)}",
        "",
        f"- training: {first['recipe']}; seeds {', '.join(seeds)}; run {res.get('date', '?')}, "
        + ", ".join(f"`{c}`" for c in res.get("commands", [res.get("command", "?")]))
        + f"; revision {', '.join(res.get('revisions', ['not recorded']))}",
        f"- dense test accuracy {_ms([res['seeds'][s]['dense_acc'] for s in seeds])}%; after the same "
        f"fine-tuning as the compressed models {_ms([res['seeds'][s]['dense_ft_acc'] for s in seeds])}%; "
        f"prunable weights {dense_w:,} in "
        + (", ".join(first["layers"]) if len(first["layers"]) <= 6 else f"{len(first['layers'])} layers")
        + f" (model total {first['total_params']:,})",
        f"- fine-tuning: one pass over {first.get('ft_images', 60000):,} training images, "
        f"{MODELS[name]['ft_opt'].upper()} lr {MODELS[name]['ft_lr']:g}"
        + (" momentum 0.9" if MODELS[name]["ft_opt"] == "sgd" else "")
        + ", batch 128, the same batch order for every method",
        "",
    ]
    # table 1: every low-rank result, magnitude at the same nonzeros, uniform at the same weights
    uni = [p for s in seeds for p in res["seeds"][s]["points"] if p["family"] == "uniform"]
    rows = []
    lat = first.get("latency") or {}
    for label, pts in by.items():
        fam = pts[0]["family"]
        if fam == "magnitude":
            continue
        frac = statistics.fmean(p["frac"] for p in pts)
        mag = []  # per seed: magnitude pruning at exactly this result's stored weights
        for s in seeds:
            pts_s = res["seeds"][s]["points"]
            own = [p for p in pts_s if p["label"] == label]
            same = [
                q for q in pts_s if q["family"] == "magnitude" and own and q["weights"] == own[0]["weights"]
            ]
            mag += sorted(same, key=lambda q: q.get("acc_ft") is None)[:1]  # prefer a fine-tuned one
        uni_acc = None if fam == "uniform" else _interp(uni, frac, "acc")
        lat_cells = [_speedup(lat, bs, label) for bs in ("256", "1")]
        rows.append(
            [
                label,
                f"{100 * frac:.1f}%",
                _ms([p["acc"] for p in pts]),
                _ms([p.get("acc_ft") for p in pts]),
                _ms([p["acc"] for p in mag]) if mag else "-",
                _ms([p.get("acc_ft") for p in mag]) if mag else "-",
                "-" if uni_acc is None else f"{100 * uni_acc:.2f}",
                *lat_cells,
                _ranks_text(pts[0].get("ranks")),
            ]
        )
    rows.sort(key=lambda r: float(r[1].rstrip("%")))
    lines += [
        "Every low-rank result (accuracy in %, mean +- std over the seeds where more than one) next to "
        "global magnitude pruning at exactly the same number of stored weights and the uniform-rank sweep "
        "linearly "
        "interpolated to the same weights; speed-up = dense median latency / low-rank median latency "
        f"(seed {seeds[0]}). Ranks are those of seed {seeds[0]}.",
        "",
        md_table(
            [
                "method", "weights kept", "acc", "acc +FT", "magnitude acc", "magnitude +FT",
                "uniform (interp.)", "speed-up b256 wall / CPU", "speed-up b1 wall / CPU", "ranks",
            ],
            rows,
        ),
        "",
    ]  # fmt: skip
    if lat:
        w256, w1 = lat["256"]["wall"]["dense"], lat["1"]["wall"]["dense"]
        lines += [
            f"Dense median latency: {1e3 * w256:.2f} ms at batch 256, {1e3 * w1:.3f} ms at batch 1 (wall); "
            f"CPU time {1e3 * lat['256']['cpu']['dense']:.2f} / {1e3 * lat['1']['cpu']['dense']:.3f} ms. "
            "Speed-up cells: wall-clock ratio / CPU-time ratio (on this loaded machine the wall clock of a "
            "20 ms call includes waits for a core; the CPU-time ratio is the steadier measure)."
            + (
                f" Masked model (magnitude @50%, zeros stored in the dense weights): "
                f"{_speedup(lat, '256', 'masked')} at batch 256, {_speedup(lat, '1', 'masked')} at batch 1."
                if "masked" in lat["256"]["wall"]
                else ""
            ),
            "",
        ]
    # per-layer decisions of the rule-based methods (seed 0)
    prow = []
    for p in first["points"]:
        if p["family"] not in ("bema", "gavish_donoho", "energy") or not p.get("plan"):
            continue
        plan = {k: v for k, v in p["plan"].items() if k in first["layers"]}
        if len(plan) > 6:  # one summary row per method
            acts = statistics_counts([v["action"] for v in plan.values()])
            spikes = [v["n_spikes"] for v in plan.values() if v.get("n_spikes") is not None]
            kss = [v["ks"] for v in plan.values() if v.get("ks") is not None]
            kept = [v["reason"] for v in plan.values() if v["action"] == "keep"]
            example = f"e.g. kept: {kept[0]}" if kept else next(iter(plan.values()))["reason"]
            prow.append(
                [p["label"], f"all {len(plan)}", acts, _ranks_text(p.get("ranks")), _range(spikes),
                 _range(kss, "{:.3f}"), example]
            )  # fmt: skip
            continue
        for lname, v in plan.items():
            ks = "-" if v.get("ks") is None else f"{v['ks']:.3f}"
            spikes = "-" if v.get("n_spikes") is None else str(v["n_spikes"])
            prow.append([p["label"], lname, v["action"], v.get("rank"), spikes, ks, v["reason"]])
    if prow:
        lines += [
            f"Per-layer decisions of the rule-based methods (seed {seeds[0]}; the head, kept by "
            "`protect_last`, is left out):",
            "",
            md_table(["method", "layer", "action", "rank", "BEMA spikes", "KS", "reason"], prow),
            "",
        ]
    # table 2: the three budgets
    rows = []
    for b in BUDGETS:
        pct = f"{int(100 * b)}%"
        for fam in FAMILIES:
            if fam in ("uniform", "magnitude"):
                pts = by.get(f"{'uniform' if fam == 'uniform' else 'magnitude'} @{pct}", [])
                how = "exact budget" if fam == "magnitude" else "ratio solved for the budget"
            else:
                cands = [
                    (lab, ps) for lab, ps in by.items() if ps[0]["family"] == fam and "no gate" not in lab
                ]
                if not cands:
                    continue
                lab, pts = min(cands, key=lambda c: abs(statistics.fmean(p["frac"] for p in c[1]) - b))
                if abs(statistics.fmean(p["frac"] for p in pts) - b) > 0.15:
                    continue  # no setting of this family near the budget
                how = f"closest: {lab}"
            if not pts:
                continue
            frac = statistics.fmean(p["frac"] for p in pts)
            rows.append(
                [pct, FAMILY_LABEL[fam], how, f"{100 * frac:.1f}%", _ms([p["acc"] for p in pts]),
                 _ms([p.get("acc_ft") for p in pts])]
            )  # fmt: skip
    lines += [
        "At three budgets (fraction of the dense prunable weights). The uniform-rank ratio is solved for "
        "each budget and magnitude pruning hits it exactly; BEMA, Gavish-Donoho and energy have no budget "
        "knob, so the row shows the setting of the family closest to the budget with its actual size (no "
        "row when none is within 15 points of the budget).",
        "",
        md_table(["budget", "family", "setting", "weights kept", "acc", "acc +FT"], rows),
        "",
        f"![accuracy vs weights](rank_rules_{name}.png)",
        "",
    ]
    return "\n".join(lines)


def plot_model(name: str, res: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    seeds = sorted(res["seeds"], key=int)
    s0 = res["seeds"][seeds[0]]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=False)
    style = {
        "bema": dict(color="C3", marker="o", ls="none"),
        "gavish_donoho": dict(color="C2", marker="s", ls="none"),
        "energy": dict(color="C1", marker="^", ls="none"),
        "uniform": dict(color="C0", marker=".", ls="-"),
        "magnitude": dict(color="C7", marker="x", ls="--"),
    }
    for ax, key, title in (
        (axes[0], "acc", "post-training, no fine-tuning"),
        (axes[1], "acc_ft", f"+ fine-tuning ({s0.get('ft_images', 60000):,} images)"),
    ):
        dense = s0["dense_acc"] if key == "acc" else s0["dense_ft_acc"]
        if dense is not None:
            ax.axhline(100 * dense, color="k", lw=0.8, ls=":", label="dense")
        for fam in FAMILIES:
            pts = sorted(
                (p for p in s0["points"] if p["family"] == fam and p.get(key) is not None),
                key=lambda p: p["frac"],
            )
            if not pts:
                continue
            xs = [100 * p["frac"] for p in pts]
            ys = [100 * p[key] for p in pts]
            ax.plot(xs, ys, label=FAMILY_LABEL[fam], **style[fam])
            if fam in ("bema", "gavish_donoho", "energy"):
                for p, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(p["label"].replace("BEMA ", "").replace("energy ", ""), (x, y), fontsize=7,
                                xytext=(3, -9), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("stored weights of the prunable layers (% of dense)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{TITLES.get(name, name)}: {title}", fontsize=9)
        vals = [100 * p[key] for p in s0["points"] if p.get(key) is not None]
        ax.set_ylim(max(0.0, min(vals, default=0.0) - 2), 100 * s0["dense_acc"] + 2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    log(f"wrote {path}")


def write_report(args: argparse.Namespace) -> None:
    store = Path(args.cache) / "rank_rules"
    results = {}
    for name in MODELS:
        f = store / f"{name}{'-quick' if args.quick else ''}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())
    out = Path(args.out)
    head = [
        "# Rank rules at equal parameter count",
        "",
        f"- written: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: "
        f"{os.cpu_count()} CPU cores, no GPU, shared with other jobs (load average "
        f"{os.getloadavg()[0]:.0f} when written), torch threads {args.threads}",
        f"- revision: {git_revision()} (when written; each model section names the revisions its runs "
        "ran on)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"rmtprune {rmtprune.__version__}",
        "- each model section names the command that produced it (models run as separate invocations; "
        "every invocation rewrites this file from all stored results)",
        "- method: see the docstring of `benchmarks/rank_rules.py`. Layers: every Linear/Conv2d but the "
        "classifier head, for every method. Weights counted as stored (factors k(m+n), masks: nonzeros), "
        "biases excluded (identical for all methods).",
        "",
    ]
    if args.quick:
        head.insert(2, "- QUICK smoke run (6000 training images), not a result")
    sections = [model_section(n, r) for n, r in results.items()]
    discussion = args.discussion
    if not discussion and out.is_file():  # keep the hand-written discussion of the previous report
        old = out.read_text(encoding="utf-8")
        if DISCUSSION in old:
            discussion = old[old.index(DISCUSSION) :]
    atomic_write_text(out, "\n".join(head) + "\n" + "\n".join(sections) + "\n" + (discussion or ""))
    log(f"wrote {out}")
    for n, r in results.items():
        plot_model(n, r, out.with_name(f"{out.stem}_{n}.png"))


# ----------------------------------------------------------------------------- main


def merge_seed(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Add the points of an ``--only`` run to a stored seed result (same labels are replaced).

    The new latencies were measured against this run's own dense model: they are stored rescaled
    to the stored dense time, so every ratio is the one measured in the new run.
    """
    labels = {p["label"] for p in new["points"]}
    old["points"] = [p for p in old["points"] if p["label"] not in labels] + new["points"]
    for bs, d in new.get("latency", {}).items():
        if bs not in old.get("latency", {}):
            continue
        for clock in ("wall", "cpu"):
            scale = old["latency"][bs][clock]["dense"] / d[clock]["dense"]
            for label, t in d[clock].items():
                if label not in ("dense", "masked"):
                    old["latency"][bs][clock][label] = t * scale
    old.setdefault("added", []).append(sorted(labels))
    return old


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", default="mnist_mlp,fashion_cnn", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument(
        "--seeds", default="1", help="number of seeds n (0..n-1) or a comma list, '2,' = seed 2 (default 1)"
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per model)")
    p.add_argument("--quick", action="store_true", help="smoke run: 6000 training images, 1 epoch")
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"trained weights and raw results ({DEFAULT_CACHE})"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results markdown (default benchmarks/results/rank_rules.md)"
    )
    p.add_argument("--refresh", action="store_true", help="retrain even if a cached model exists")
    p.add_argument("--no-ft", action="store_true", help="skip the fine-tuning epoch")
    p.add_argument(
        "--ft-images",
        type=int,
        default=None,
        help="fine-tune one pass over this many training images (same subset for all methods; default all)",
    )
    p.add_argument(
        "--sweep",
        default=",".join(f"{r:g}" for r in SWEEP),
        help="uniform rank ratios swept besides the three budget ratios (comma list)",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma list of rule labels (e.g. 'BEMA spikes (no gate)') to compute and add to the stored run",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--reps", type=int, default=15, help="latency repeats at batch 256 (x10 at batch 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", default=None, help="folder with mnist/ and fashion-mnist/")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the markdown and plots from stored results"
    )
    p.add_argument(
        "--discussion",
        type=Path,
        default=None,
        help=f"markdown appended to the report (default: keep the '{DISCUSSION}' part of the existing one)",
    )
    args = p.parse_args(argv)
    bad = [m for m in args.models.split(",") if m and m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; valid: {', '.join(MODELS)}")
    args.only = [t.strip() for t in str(args.only).split(",") if t.strip()]
    valid = [c[1] for c in RULE_CONFIGS]
    bad = [t for t in args.only if t not in valid]
    if bad:
        p.error(f"--only: unknown label(s) {bad}; valid: {', '.join(valid)}")
    args.sweep = [float(t) for t in str(args.sweep).split(",") if t.strip()]
    args.model_list = [m for m in args.models.split(",") if m]
    s = str(args.seeds)
    args.seed_list = [int(t) for t in s.split(",") if t.strip()] if "," in s else list(range(int(s)))
    if not args.seed_list:
        p.error(f"--seeds={s!r} selects no seed")
    if args.quick and args.epochs is None:
        args.epochs = 1
    if args.out is None:
        args.out = (ROOT / "runs" / "bench-quick" if args.quick else RESULTS) / "rank_rules.md"
    if args.data_dir is None and not os.environ.get("RMTPRUNE_DATA") and SHARED_DATA.is_dir():
        args.data_dir = str(SHARED_DATA)
    args.discussion = args.discussion.read_text() if args.discussion else ""
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    argv_list = list(sys.argv)
    with contextlib.suppress(ValueError):
        argv_list[0] = str(Path(argv_list[0]).resolve().relative_to(ROOT))
    command = "python " + " ".join(shlex.quote(a) for a in argv_list)
    revision = git_revision()  # the code this invocation runs, recorded with its results
    store = Path(args.cache) / "rank_rules"
    store.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.model_list:
            f = store / f"{name}{'-quick' if args.quick else ''}.json"
            res = json.loads(f.read_text()) if f.is_file() else {"seeds": {}}
            for seed in args.seed_list:
                log(f"== {name} seed {seed}")
                new = run_seed(name, seed, args)
                if f.is_file():  # re-read: another invocation may have stored other seeds meanwhile
                    res = json.loads(f.read_text())
                old = res["seeds"].get(str(seed))
                res["seeds"][str(seed)] = merge_seed(old, new) if (args.only and old) else new
                cmds = res.setdefault("commands", [])
                if command not in cmds:
                    cmds.append(command)
                revs = res.setdefault("revisions", [])
                if revision not in revs:
                    revs.append(revision)
                res.update(
                    command=command,
                    date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    threads=args.threads,
                )
                atomic_write_text(f, json.dumps(res, indent=1) + "\n")
            print(model_section(name, res))
    write_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
