"""One parameter budget on the small models: RMT allocation vs the others, data-free and whitened (issue 13).

For each trained model (the experiment scripts' recipes, trained once and cached) and each budget
``F`` (a fraction of the hidden layers' parameters as stored), a copy of the dense model is
compressed with :func:`rmtprune.compress` (``target=F``, ``include`` = every layer but the output
layer) under each allocation (``rmt``, ``uniform``, ``energy``, ``gavish_donoho``, ``spikes``), once
with plain truncated SVD (data-free) and once whitened by 2,048 calibration images of the training
split (SVD-LLM, arXiv:2403.07378, scored against the generalized Marchenko-Pastur edge). References
at the same stored parameter count: global magnitude pruning (``torch.nn.utils.prune``) and Wanda
(Sun et al. 2023, arXiv:2306.11695, on the same calibration statistics). The test split is read
once per reported number; the one choice (the fine-tuning learning rate) is made on a validation
set of further training images. The protocol is :data:`PROTOCOL`, written at the top of the
results file.

Speed: every compression of a model at any budget and allocation decomposes the same matrices
(``W`` data-free, ``W S`` whitened). :func:`svd_memo` memoises ``torch.linalg.svd``, ``svdvals`` and
``eigvalsh`` on the exact bytes of their input for the duration of one model, so each matrix is
decomposed once; the results are the same tensors a fresh call returns (tested in
``tests/test_budget_small.py``).

Run: ``python benchmarks/budget_small.py [--models fashion_mlp,fashion_cnn,fashion_vit]
[--seeds fashion_mlp=0,1] [--no-finetune] [--quick]``; writes ``benchmarks/results/budget_small.md``
and ``.json``. ``--train-only`` trains (or finds) the models and stops, for training in parallel
invocations before the measured run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from _cli import CACHE, QUICK_OUT, RESULTS, ROOT, SHARED_DATA, command_line, log
from _report import dump_json, machine, md_table
from torch import nn
from torch.nn.utils import prune

import rmtprune
from rmtprune._atomic import atomic_write_text
from rmtprune.calibration import Calibration, collect
from rmtprune.finetune import evaluate, finetune
from rmtprune.layers import collect_layers, handler_for, output_layer
from rmtprune.lowrank import LowRankModule
from rmtprune.masks import remove_masks, set_mask
from rmtprune.sparsity import SparsifyConfig, sparsify
from rmtprune.spectral import MIN_P
from rmtprune.zoo.data import Dataset, batches, load_dataset

NAME = "budget_small"
ALLOCATIONS = ("rmt", "uniform", "energy", "gavish_donoho", "spikes")
TRUNCATIONS = ("svd", "whitened")
#: The sparse references at the same stored count.
SPARSE = ("magnitude", "wanda", "rmt-wanda", "rmt-magnitude")
BUDGETS = (0.25, 0.40, 0.60)
LR_GRID = (1e-4, 3e-4, 1e-3)
#: Allocations fine-tuned (with both truncations), and the budget at which the lr is chosen.
FT_ALLOCATIONS = ("rmt", "uniform")
LR_BUDGET = 0.40
N_CALIB, N_VAL, N_FT = 2048, 5000, 10_000
SPLIT_SEED = 1000
VIT_EPOCHS = 3
CALIB_BATCH, FT_BATCH = 256, 128

MODELS: dict[str, dict[str, Any]] = {
    "fashion_mlp": {
        "title": "Fashion-MNIST MLP [784, 1000, 1000, 1000, 10]",
        "seeds": (0, 1),
        "recipe": "SGD momentum 0.9, lr 0.05, cosine over 10 epochs, batch 128 (exp_fashion_mlp.py's dense "
        "arm with --width 1000,1000,1000 --epochs 10; cached under runs/bench-cache as fashion-mlp-dense)",
    },
    "fashion_cnn": {
        "title": "Fashion-MNIST CNN cnn:16,32 (conv 16, conv 32, fc 128)",
        "seeds": (0,),
        "recipe": "SGD momentum 0.9, lr 0.05, cosine over 2 epochs, batch 128 (exp_fashion_cnn.py's dense "
        "arm; cached under runs/bench-cache as fashion-cnn-dense)",
    },
    "fashion_vit": {
        "title": "Fashion-MNIST ViT vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2",
        "seeds": (0,),
        "recipe": "Adam lr 1e-3, cosine to 0 over 3 epochs, batch 128 (sparsify_vit.py's train_vit; cached "
        "under ~/.cache/rmtprune/bench)",
    },
}

PROTOCOL = f"""\
Fixed before the run (issue 13, task H5); not changed after.

- **Models** (Fashion-MNIST, full 60,000-image training split, weights trained once and cached):
  the MLP [784, 1000, 1000, 1000, 10] (SGD momentum 0.9, lr 0.05, cosine over 10 epochs, batch 128),
  seeds 0 and 1: one epoch measured 96 s alone and 255 s with two more trainings beside it on the
  shared 2-core machine (about 16-40 min per seed), so 2 seeds, not 3; the CNN `cnn:16,32` of
  `exp_fashion_cnn.py` (2 epochs), seed 0 only; the ViT `vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2`
  of `sparsify_vit.py` (its recipe, Adam 1e-3, cosine), seed 0 only, 3 epochs instead of its 15: the
  first epoch took 520 s on the loaded machine. No cached model existed; all were trained for this run
  (times in the run section).
- **Layers**: every layer rmtprune can cut except the output layer (the 10-way head, protected and
  outside the budget) and layers with fewer than 10 rows or columns (the library fits no spectrum
  there, and its data-free budgeted plan fails on such a layer: a bug, reported): MLP fc1-fc3; CNN
  conv2 and fc1 (conv1, 16 x 9, left out for every method); ViT the patch-embedding convolution and
  the 24 attention/MLP linears.
- **Data**: per model seed `s`, one permutation of the training split seeded with {SPLIT_SEED} + s: the
  first {N_CALIB:,} images are the calibration set, the next {N_VAL:,} the validation set, the next
  {N_FT:,} the fine-tuning set (three disjoint sets; all training images, never test images). Test
  accuracy on the full 10,000-image test split, read once per reported number (the MLP's and CNN's
  trainer also logs it after each epoch; nothing is chosen from it, the epochs are fixed).
- **Budgets**: `target` = 0.25, 0.40, 0.60 of the hidden layers' parameters as stored (weights and
  biases; a factored layer k(m + n) + bias), `rmtprune.compress(model, target=F, allocation=A,
  include=hidden)`; the library fills each budget to within one rank step below it.
- **Methods**: allocations rmt / uniform / energy / gavish_donoho / spikes, each with plain SVD
  (data-free, no `calibration`) and whitened (`calibration` = the statistics of the {N_CALIB:,}
  calibration images, `rmtprune.calibration.collect(..., held_out=0)`, default damping); no guard.
  References at the same stored count, `floor(F (W + b)) - b` nonzero weights: global magnitude
  (`torch.nn.utils.prune.global_unstructured`, L1, then `prune.remove`) and Wanda (|W_ij| ||X_j||,
  the same fraction pruned in every output row of every layer; convolutions over their unfolded
  patches; ||X_j|| from the same calibration statistics). `rmtprune.sparsify(calibration=)` landed
  (58c46a3) while this protocol was written, so two RMT-allocated sparse references go through it,
  one-shot (`sv_sparsify=False`, `n_cycles=1`, no data) at the sparsity `1 - n_keep / W`:
  `budget="rmt"` with `score="wanda"` (the same calibration) and with `score="magnitude"`
  (data-free); library defaults for `rmt_metric`, `budget_range` and `allocation` (nothing tuned).
- **Metrics**: test accuracy without fine-tuning; parameters as stored; per seed the difference to
  `uniform` with the same truncation, mean +- sample std over seeds (one seed: no std).
- **Fine-tuning** (a second stage, after every number without it; as time allows): rmt and uniform
  with both truncations, global magnitude (its zeros kept as masks) and the dense model, each with
  `rmtprune.finetune`: Adam, one
  pass over the {N_FT:,}-image fine-tuning set (not a full epoch: time), batch {FT_BATCH}, cosine schedule
  with 5% warm-up, the same batch order for every method of a seed. The learning rate is chosen per
  model from {{1e-4, 3e-4, 1e-3}} by the mean validation accuracy of the four low-rank arms at target
  0.40 on the model's first seed, then used for every fine-tuned arm of that model. That is the only
  choice made, and the only use of the validation set.
- **Compute**: 1 torch thread; the decompositions of one model are memoised across budgets and
  allocations (identical results, see the script's docstring)."""


# ------------------------------------------------------------------------------------------- pure parts
def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of ``sizes`` from one permutation of ``range(n)`` seeded with ``seed``."""
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in sizes):
        raise ValueError(f"sizes={list(sizes)!r} must be non-negative integers")
    if sum(sizes) > n:
        raise ValueError(f"sizes={list(sizes)!r} need {sum(sizes)} samples, the split has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for k in sizes:
        out.append(perm[start : start + k])
        start += k
    return out


def hidden_layers(model: nn.Module, min_p: int = MIN_P) -> list[str]:
    """Every layer rmtprune can cut except the model's output layer and layers with fewer than
    ``min_p`` rows or columns (no spectrum to fit), in registration order."""
    entries = collect_layers(model)
    out, _ = output_layer(model, entries)
    names = [
        e.name
        for e in entries
        if e.handler is not None
        and not e.reason
        and e.name != out
        and min(e.handler.matrix_shape(e.module)) >= min_p
    ]
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer to compress besides its output layer")
    return names


def stored_params(model: nn.Module, names: Sequence[str]) -> int:
    """Parameters of the named layers as stored: a factored layer its factors, a dense one its nonzero
    weights; biases in full."""
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, LowRankModule):
            total += sum(p.numel() for p in mod.parameters())
            continue
        total += int(torch.count_nonzero(mod.weight.detach())) + _bias_numel(mod)
    return total


def weight_budget(model: nn.Module, names: Sequence[str], fraction: float) -> int:
    """Nonzero weights a sparse method may keep so that weights + biases are ``floor(fraction * dense)``,
    the budget :func:`rmtprune.compress` aims at with ``target=fraction``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    biases = sum(_bias_numel(model.get_submodule(n)) for n in names)
    keep = math.floor(fraction * (weights + biases)) - biases
    if keep < 0:
        raise ValueError(f"fraction={fraction} leaves no room for the {biases} biases")
    return keep


def _bias_numel(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def global_magnitude(model: nn.Module, names: Sequence[str], n_keep: int) -> None:
    """Keep the ``n_keep`` largest ``|W_ij|`` over all named layers, zero the rest (in place).

    ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, then ``prune.remove``, as
    ``benchmarks/_baselines.py`` does for linear layers; here convolutions too.
    """
    params = [(model.get_submodule(n), "weight") for n in names]
    total = sum(mod.weight.numel() for mod, _ in params)
    if not 0 <= n_keep <= total:
        raise ValueError(f"n_keep={n_keep} must be in [0, {total}]")
    if n_keep == total:
        return
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=total - n_keep)
    for mod, _ in params:
        prune.remove(mod, "weight")


def wanda(model: nn.Module, names: Sequence[str], calib: Calibration, n_keep: int) -> None:
    """Wanda (arXiv:2306.11695) in place: in every output row keep the ``|W_ij| ||X_j||_2`` largest.

    Every row of every named layer keeps ``round(n_keep / total * n)`` of its ``n`` inputs (the
    paper's per-output group, one sparsity everywhere). ``||X_j||`` is the norm of input feature ``j``
    over the calibration rows (``calib[name].l2_norm``; for a convolution the unfolded patches, so a
    weight ``out x (in kh kw)``, the layer's matrix view).
    """
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    if not 0 <= n_keep <= total:
        raise ValueError(f"n_keep={n_keep} must be in [0, {total}]")
    keep = n_keep / total
    new = {}
    for name in names:
        mod = model.get_submodule(name)
        h = handler_for(mod)
        W = h.matrix(mod).detach()
        n = W.shape[1]
        n_prune = n - round(keep * n)
        if n_prune == 0:
            continue
        norm = calib[name].l2_norm.to(W.device)
        if norm.numel() != n:
            raise ValueError(f"calibration of layer {name!r} has {norm.numel()} features, the layer {n}")
        score = W.abs().to(torch.float64) * norm[None, :]
        drop = torch.sort(score, dim=1, stable=True).indices[:, :n_prune]
        new[name] = W.clone().scatter_(1, drop, 0)
    for name, W in new.items():
        mod = model.get_submodule(name)
        handler_for(mod).write_dense(mod, W)


def paired(rows: Sequence[dict[str, Any]], a: str, b: str, **where: Any) -> list[float]:
    """Per-seed ``acc(a) - acc(b)`` over the rows matching ``where`` (seeds present for both), where a
    row's method is ``row["method"]``."""
    acc = {(r["method"], r["seed"]): r["acc"] for r in rows if all(r.get(k) == v for k, v in where.items())}
    seeds = sorted({s for m, s in acc if m == a} & {s for m, s in acc if m == b})
    return [acc[(a, s)] - acc[(b, s)] for s in seeds]


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 2, sign: bool = False) -> str:
    """``mean +- std`` (sample std) of ``values * scale``; one value: the value alone; none: ``-``."""
    if not values:
        return "-"
    vals = [scale * v for v in values]
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    mean = fmt.format(statistics.fmean(vals))
    return mean if len(vals) == 1 else f"{mean} +- {statistics.stdev(vals):.{digits}f}"


@contextlib.contextmanager
def svd_memo() -> Iterator[dict[str, int]]:
    """Memoise ``torch.linalg.svd``, ``svdvals`` and ``eigvalsh`` on the exact input bytes.

    Inside the block, a call with a CPU tensor that does not need gradients, and hashable keyword
    arguments, is computed once per distinct (function, dtype, shape, bytes, keywords); later calls
    return clones of the stored result. LAPACK is deterministic for the same input and thread count,
    so the tensors are those a fresh call returns. Yields the hit and miss counts.
    """
    counts = {"hits": 0, "misses": 0}
    originals = {name: getattr(torch.linalg, name) for name in ("svd", "svdvals", "eigvalsh")}
    store: dict[tuple[Any, ...], Any] = {}

    def clone(out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return out.clone()
        return type(out)(tuple(t.clone() for t in out))

    def wrap(name: str, fn: Any) -> Any:
        def memo(A: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                usable = (
                    isinstance(A, torch.Tensor)
                    and A.device.type == "cpu"
                    and not A.requires_grad
                    and not args
                )
                usable = usable and all(not isinstance(v, torch.Tensor) for v in kwargs.values())
                kw = tuple(sorted(kwargs.items())) if usable else ()
                hash(kw)
            except TypeError:
                usable = False
            if not usable:
                return fn(A, *args, **kwargs)
            digest = hashlib.blake2b(A.detach().contiguous().numpy().tobytes(), digest_size=20).hexdigest()
            key = (name, A.dtype, tuple(A.shape), kw, digest)
            if key not in store:
                counts["misses"] += 1
                store[key] = fn(A, **kwargs)
            else:
                counts["hits"] += 1
            return clone(store[key])

        return memo

    try:
        for name, fn in originals.items():
            setattr(torch.linalg, name, wrap(name, fn))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)
        store.clear()


# ------------------------------------------------------------------------------------------- models
def train_args(args: argparse.Namespace, **fields: Any) -> argparse.Namespace:
    """The namespace ``_cache.train_cached`` and the experiment configs read."""
    ns = argparse.Namespace(
        cache=args.cache, refresh=False, data_dir=args.data_dir, quick=args.quick, threads=args.threads
    )
    for k, v in fields.items():
        setattr(ns, k, v)
    return ns


def load_model(args: argparse.Namespace, key: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The dense model of ``key`` for ``seed`` (trained now when not cached) and its training facts."""
    from _cache import train_cached

    if key == "fashion_mlp":
        import exp_fashion_mlp as exp

        ns = train_args(
            args, epochs=2 if args.quick else 10, lr=0.05, width="1000,1000,1000", mu=5e-6, prune_every=2,
            prune_start=1, keep_bulk=0.45, decay_T=None,
        )  # fmt: skip
        run = train_cached(exp.config(ns, "dense", seed), ns, "fashion-mlp-dense", prefix=f"[mlp s{seed}] ")
    elif key == "fashion_cnn":
        import exp_fashion_cnn as exp

        ns = train_args(args, epochs=2, lr=0.05, model="cnn:16,32", keep_bulk=0.25)
        run = train_cached(exp.config(ns, seed, False), ns, "fashion-cnn-dense", prefix=f"[cnn s{seed}] ")
    elif key == "fashion_vit":
        import sparsify_vit

        epochs, n = (1, 6000) if args.quick else (VIT_EPOCHS, 60000)
        tag = f"{sparsify_vit._tag(sparsify_vit.SPEC)}_fashion-mnist_s{seed}_e{epochs}_n{n}"
        cached = (sparsify_vit.CACHE / f"{tag}.json").is_file()
        model, info = sparsify_vit.train_vit("fashion-mnist", seed, epochs, n if args.quick else None)
        return model.eval(), {"epochs": epochs, "train_seconds": info["train_seconds"], "cached": cached}
    else:
        raise ValueError(f"unknown model {key!r}; known: {', '.join(MODELS)}")
    return run["model"].eval(), {
        "epochs": run["config"]["epochs"],
        "train_seconds": float(run["timings"].get("total", run.get("wall", float("nan")))),
        "cached": bool(run["cached"]),
    }


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Accuracy of ``model`` (eval mode) over ``data``."""
    model.eval()
    return float(evaluate(model, lambda: batches(data, 1024), reduction="sum")["accuracy"])


def fine_tuned(model: nn.Module, ft: Dataset, lr: float, seed: int) -> nn.Module:
    """A fine-tuned copy: Adam, one pass over ``ft``, cosine, 5% warm-up, batch order seeded by ``seed``."""
    out = copy.deepcopy(model)
    loader = batches(ft, FT_BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    finetune(out, loader, epochs=1.0, lr=lr, schedule="cosine", warmup=0.05)
    return out.eval()


def compressed(
    dense: nn.Module, names: list[str], target: float, allocation: str, calib: Calibration | None
) -> tuple[nn.Module, Any]:
    """A compressed copy of ``dense`` and the report."""
    model = copy.deepcopy(dense)
    model, report = rmtprune.compress(
        model, target=target, allocation=allocation, include=names, calibration=calib
    )
    return model.eval(), report


def sparse_copy(
    dense: nn.Module, names: list[str], method: str, n_keep: int, calib: Calibration
) -> nn.Module:
    """A copy of ``dense`` with ``n_keep`` nonzero weights over ``names`` by ``method`` (:data:`SPARSE`)."""
    model = copy.deepcopy(dense)
    if method == "magnitude":
        global_magnitude(model, names, n_keep)
    elif method == "wanda":
        wanda(model, names, calib, n_keep)
    elif method in ("rmt-wanda", "rmt-magnitude"):
        total = sum(model.get_submodule(n).weight.numel() for n in names)
        score = method.split("-")[1]
        cfg = SparsifyConfig(
            target=1 - n_keep / total, budget="rmt", score=score, include=list(names), sv_sparsify=False,
            n_cycles=1,
        )  # fmt: skip
        sparsify(model, cfg, calibration=calib if score == "wanda" else None, show_progress=False)
        remove_masks(model)
    else:
        raise ValueError(f"unknown sparse method {method!r}; known: {', '.join(SPARSE)}")
    return model.eval()


def with_masks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy whose zero weights are masks, so fine-tuning keeps them zero."""
    out = copy.deepcopy(model)
    for n in names:
        mod = out.get_submodule(n)
        set_mask(mod, mod.weight.detach() != 0)
    return out


# ------------------------------------------------------------------------------------------- the run
def prepare(args: argparse.Namespace, key: str, seed: int, train: Dataset) -> dict[str, Any]:
    """The dense model of ``key``/``seed``, its hidden layers, calibration, validation and FT sets."""
    dense, facts = load_model(args, key, seed)
    names = hidden_layers(dense)
    calib_idx, val_idx, ft_idx = split_indices(len(train), [N_CALIB, N_VAL, N_FT], SPLIT_SEED + seed)
    t0 = time.perf_counter()
    calib = collect(dense, list(train.x[calib_idx].split(CALIB_BATCH)), layers=names, held_out=0)
    return {
        "dense": dense,
        "facts": facts,
        "names": names,
        "calib": calib,
        "calib_seconds": time.perf_counter() - t0,
        "val": train.subset(val_idx),
        "ft": train.subset(ft_idx),
        "before": stored_params(dense, names),
    }


def run_model(args: argparse.Namespace, key: str, train: Dataset, test: Dataset) -> dict[str, Any]:
    """Every method at every budget for every seed of ``key``, without fine-tuning."""
    res: dict[str, Any] = {"key": key, "title": MODELS[key]["title"], "rows": [], "dense": [], "lr": None}
    for seed in args.seeds_of[key]:
        prep = prepare(args, key, seed, train)
        dense, names, calib, before = prep["dense"], prep["names"], prep["calib"], prep["before"]
        dense_acc = accuracy(dense, test)
        log(f"[{key} s{seed}] dense {100 * dense_acc:.2f}%, {len(names)} layers, {before:,} params")
        res["dense"].append(
            {"seed": seed, "acc": dense_acc, "hidden_params": before, "total_params": _n(dense),
             **prep["facts"], "layers": names, "calib_seconds": prep["calib_seconds"]}
        )  # fmt: skip
        with svd_memo() as memo:
            for target in args.budgets:
                for trunc in TRUNCATIONS:
                    for alloc in ALLOCATIONS:
                        t0 = time.perf_counter()
                        model, report = compressed(
                            dense, names, target, alloc, calib if trunc == "whitened" else None
                        )
                        secs = time.perf_counter() - t0
                        row = _row(key, seed, target, f"{alloc}/{trunc}", model, names, before, test, secs)
                        row.update(allocation=alloc, truncation=trunc, warnings=list(report.warnings))
                        row["ranks"] = {
                            lp.name: lp.rank if lp.action == "factor" else None
                            for lp in report.layers
                            if lp.name in names
                        }
                        res["rows"].append(row)
                n_keep = weight_budget(dense, names, target)
                for method in SPARSE:
                    t0 = time.perf_counter()
                    model = sparse_copy(dense, names, method, n_keep, calib)
                    secs = time.perf_counter() - t0
                    res["rows"].append(_row(key, seed, target, method, model, names, before, test, secs))
            res.setdefault("memo", []).append(dict(memo))
    return res


def finetune_model(
    args: argparse.Namespace, res: dict[str, Any], train: Dataset, test: Dataset
) -> dict[str, Any]:
    """The fine-tuned arms of one model (``res`` from :func:`run_model`, rows added in place): the lr
    chosen on the validation set of the first seed, then every seed and budget at that lr."""
    key = res["key"]
    for i, seed in enumerate(args.seeds_of[key]):
        prep = prepare(args, key, seed, train)
        dense, names, calib, before, ft = (
            prep["dense"],
            prep["names"],
            prep["calib"],
            prep["before"],
            prep["ft"],
        )
        with svd_memo():
            if i == 0:
                res["lr"] = choose_lr(args, key, dense, names, calib, ft, prep["val"], seed)
            lr = res["lr"]["chosen"]
            t0 = time.perf_counter()
            dense_row = next(d for d in res["dense"] if d["seed"] == seed)
            dense_row["ft_acc"] = accuracy(fine_tuned(dense, ft, lr, seed), test)
            dense_row["ft_seconds"] = time.perf_counter() - t0
            log(f"[{key} s{seed}] dense +FT: {100 * dense_row['ft_acc']:.2f}%")
            for target in args.budgets:
                arms = {}
                for trunc in TRUNCATIONS:
                    for alloc in FT_ALLOCATIONS:
                        c = calib if trunc == "whitened" else None
                        arms[f"{alloc}/{trunc}"] = compressed(dense, names, target, alloc, c)[0]
                n_keep = weight_budget(dense, names, target)
                arms["magnitude"] = with_masks(sparse_copy(dense, names, "magnitude", n_keep, calib), names)
                for method, model in arms.items():
                    t0 = time.perf_counter()
                    mft = fine_tuned(model, ft, lr, seed)
                    secs = time.perf_counter() - t0
                    res["rows"].append(
                        _row(key, seed, target, method, mft, names, before, test, secs, ft=True)
                    )
    return res


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _row(
    key: str, seed: int, target: float, method: str, model: nn.Module, names: list[str], before: int,
    test: Dataset, seconds: float, ft: bool = False,
) -> dict[str, Any]:  # fmt: skip
    stored = stored_params(model, names)
    acc = accuracy(model, test)
    what = f"{method}{' +FT' if ft else ''} @{target:g}"
    log(f"[{key} s{seed}] {what}: {100 * acc:.2f}% (kept {stored / before:.3f}; {seconds:.0f}s)")
    return {
        "model": key,
        "seed": seed,
        "target": target,
        "method": method,
        "ft": ft,
        "acc": acc,
        "stored": stored,
        "kept": stored / before,
        "seconds": seconds,
    }


def choose_lr(
    args: argparse.Namespace, key: str, dense: nn.Module, names: list[str], calib: Calibration, ft: Dataset,
    val: Dataset, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The fine-tuning lr of ``key``: best mean validation accuracy of the low-rank arms at LR_BUDGET."""
    models = {}
    for trunc in TRUNCATIONS:
        for alloc in FT_ALLOCATIONS:
            c = calib if trunc == "whitened" else None
            models[f"{alloc}/{trunc}"] = compressed(dense, names, LR_BUDGET, alloc, c)[0]
    table: dict[str, dict[str, float]] = {}
    for lr in args.lr_grid:
        table[f"{lr:g}"] = {m: accuracy(fine_tuned(model, ft, lr, seed), val) for m, model in models.items()}
        log(f"[{key} s{seed}] lr {lr:g}: validation {table[f'{lr:g}']}")
    means = {lr: statistics.fmean(v.values()) for lr, v in table.items()}
    chosen = max(means, key=lambda lr: means[lr])
    return {"chosen": float(chosen), "validation": table, "mean": means, "seed": seed, "target": LR_BUDGET}


# ------------------------------------------------------------------------------------------- report
def label(method: str) -> str:
    alloc, _, trunc = method.partition("/")
    if not trunc:
        return {
            "magnitude": "global magnitude (sparse)",
            "wanda": "Wanda (sparse, calibration)",
            "rmt-wanda": "sparsify rmt budget + Wanda (calibration)",
            "rmt-magnitude": "sparsify rmt budget + magnitude",
        }[method]
    return f"{alloc}, {'data-free SVD' if trunc == 'svd' else 'whitened'}"


def model_section(res: dict[str, Any], budgets: Sequence[float]) -> str:
    rows = res["rows"]
    dense = res["dense"]
    seeds = [d["seed"] for d in dense]
    d0 = dense[0]
    lines = [f"## {res['title']}", ""]
    lines.append(
        f"- seeds {', '.join(map(str, seeds))}; dense test accuracy {pm([d['acc'] for d in dense])}%; "
        f"hidden layers ({len(d0['layers'])}): {_names(d0['layers'])}, {d0['hidden_params']:,} parameters "
        f"of {d0['total_params']:,}"
    )
    times = ", ".join(
        f"s{d['seed']}: {d['train_seconds'] / 60:.1f} min{' (cached)' if d['cached'] else ''}" for d in dense
    )
    lines.append(f"- training ({dense[0]['epochs']} epochs): {times}")
    lines.append("")
    methods = [f"{a}/{t}" for t in TRUNCATIONS for a in ALLOCATIONS] + list(SPARSE)
    head = ["method", *[f"{100 * b:g}%: acc (kept)" for b in budgets]]
    body = []
    for m in methods:
        cells = [label(m)]
        for b in budgets:
            sel = [r for r in rows if r["method"] == m and r["target"] == b and not r["ft"]]
            kept = statistics.fmean(r["kept"] for r in sel) if sel else float("nan")
            cells.append(f"{pm([r['acc'] for r in sel])} ({100 * kept:.1f}%)" if sel else "-")
        body.append(cells)
    lines += ["### Test accuracy without fine-tuning (%, kept = stored / dense hidden parameters)", ""]
    lines += [md_table(head, body), ""]
    body = []
    for t in TRUNCATIONS:
        for a in ALLOCATIONS:
            if a == "uniform":
                continue
            cells = [label(f"{a}/{t}")]
            for b in budgets:
                d = paired(rows, f"{a}/{t}", f"uniform/{t}", target=b, ft=False)
                wins = sum(v > 0 for v in d)
                cells.append(f"{pm(d, sign=True)} ({wins}/{len(d)})" if d else "-")
            body.append(cells)
    for m in SPARSE:
        for t in TRUNCATIONS:
            cells = [f"{label(m)} vs uniform, {'data-free SVD' if t == 'svd' else 'whitened'}"]
            for b in budgets:
                d = paired(rows, m, f"uniform/{t}", target=b, ft=False)
                cells.append(f"{pm(d, sign=True)} ({sum(v > 0 for v in d)}/{len(d)})" if d else "-")
            body.append(cells)
    lines += [
        "### Paired difference to `uniform` with the same truncation (pp; seeds where better / seeds)",
        "",
        md_table(["method", *[f"{100 * b:g}%" for b in budgets]], body),
        "",
    ]
    lines += ["### Ranks of the first seed (hidden layers in order)", ""]
    body = []
    for t in TRUNCATIONS:
        for a in ALLOCATIONS:
            cells = [label(f"{a}/{t}")]
            for b in budgets:
                m = f"{a}/{t}"
                sel = [r for r in rows if r["method"] == m and r["target"] == b and r["seed"] == seeds[0]]
                cells.append(_ranks(sel[0]["ranks"], d0["layers"]) if sel else "-")
            body.append(cells)
    lines += [md_table(["method", *[f"{100 * b:g}%" for b in budgets]], body), ""]
    if res.get("lr"):
        lr = res["lr"]
        lines += [
            "### Fine-tuned (one pass over the fine-tuning set, the same lr for every arm)",
            "",
            f"lr chosen on the validation set (seed {lr['seed']}, target {lr['target']:g}): "
            f"**{lr['chosen']:g}**; validation accuracy (%) per lr:",
            "",
        ]
        arms = list(next(iter(lr["validation"].values())))
        body = [
            [k, *[f"{100 * v[a]:.2f}" for a in arms], f"{100 * lr['mean'][k]:.2f}"]
            for k, v in lr["validation"].items()
        ]
        lines += [md_table(["lr", *[label(a) for a in arms], "mean"], body), ""]
        ft_methods = [f"{a}/{t}" for t in TRUNCATIONS for a in FT_ALLOCATIONS] + ["magnitude"]
        body = [["dense (same fine-tune)", *[pm([d["ft_acc"] for d in dense]) for _ in budgets]]]
        for m in ft_methods:
            cells = [label(m)]
            for b in budgets:
                sel = [r for r in rows if r["method"] == m and r["target"] == b and r["ft"]]
                cells.append(pm([r["acc"] for r in sel]))
            body.append(cells)
        for t in TRUNCATIONS:
            cells = [f"rmt - uniform, {'data-free SVD' if t == 'svd' else 'whitened'} (pp)"]
            for b in budgets:
                d = paired(rows, f"rmt/{t}", f"uniform/{t}", target=b, ft=True)
                cells.append(f"{pm(d, sign=True)} ({sum(v > 0 for v in d)}/{len(d)})" if d else "-")
            body.append(cells)
        lines += [md_table(["method", *[f"{100 * b:g}%" for b in budgets]], body), ""]
    warns = sorted({w for r in rows for w in r.get("warnings", [])})
    if warns:
        lines += ["Warnings of the library during these runs:", "", *[f"- {w}" for w in warns], ""]
    return "\n".join(lines)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, ... {names[-1]}"


def _ranks(ranks: dict[str, int | None], names: Sequence[str]) -> str:
    vals = ["d" if ranks.get(n) is None else str(ranks[n]) for n in names]
    if len(vals) <= 6:
        return "/".join(vals)
    return f"{'/'.join(vals[:7])}/... (sum {sum(int(v) for v in vals if v != 'd')})"


def summary_lines(results: Sequence[dict[str, Any]], budgets: Sequence[float]) -> list[str]:
    """One line per model and truncation: rmt - uniform at each budget, without and with fine-tuning."""
    out = []
    for res in results:
        for t in TRUNCATIONS:
            parts = []
            for b in budgets:
                d = paired(res["rows"], f"rmt/{t}", f"uniform/{t}", target=b, ft=False)
                parts.append(f"{100 * b:g}%: {pm(d, sign=True)}")
            name = "data-free SVD" if t == "svd" else "whitened"
            out.append(f"- {res['key']}, {name}: rmt - uniform (pp, no fine-tuning) {'; '.join(parts)}")
    return out


def write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """The results markdown (protocol first) and the raw rows as JSON beside it, atomically."""
    wall = time.perf_counter() - args.t0
    results = sorted(results, key=lambda r: list(MODELS).index(r["key"]))
    head = [
        "# One budget on the small models: RMT allocation vs uniform, energy, Gavish-Donoho, spikes",
        "",
        "## Protocol",
        "",
        PROTOCOL,
        "",
        "## Run",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()} (shared with other jobs; torch threads {args.threads}), Python "
        f"{platform.python_version()}, torch {torch.__version__}",
        *run_lines(results),
        f"- wall time of the last invocation: {wall / 60:.1f} min (training of cached models not included)",
        "" if not args.quick else "- QUICK smoke run (short training on a subset): not a result",
        "",
        "## Summary (rmt - uniform, same truncation, paired by seed)",
        "",
        *summary_lines(results, args.budgets),
        "",
    ]
    text = "\n".join(head) + "\n" + "\n".join(model_section(r, args.budgets) for r in results)
    atomic_write_text(args.out, text)
    dump_json(
        args.out.with_suffix(".json"),
        {"protocol": PROTOCOL, "results": results},
    )
    log(f"wrote {args.out}")


def run_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per invocation that produced some of ``results``: its models, revision and command."""
    runs: dict[tuple[str, str, str], list[str]] = {}
    for res in results:
        run = res["run"]
        runs.setdefault((run["date"], run["revision"], run["command"]), []).append(res["key"])
    return [
        f"- {', '.join(keys)}: run {date} at git revision {rev}: `{cmd}`"
        for (date, rev, cmd), keys in sorted(runs.items())
    ]


def merged(args: argparse.Namespace, keys: Sequence[str]) -> list[dict[str, Any]]:
    """With ``--merge``: the results of the other models from the existing JSON beside ``--out``."""
    path = args.out.with_suffix(".json")
    if not args.merge or not path.is_file():
        return []
    old = json.loads(path.read_text())
    if old.get("protocol") != PROTOCOL:
        raise SystemExit(f"--merge: {path} was written under another protocol; rerun every model")
    kept = [r for r in old["results"] if r["key"] not in keys]
    written = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for r in kept:  # results of the first layout name their run at the top level
        run = {"date": old.get("date", f"(written {written})")}
        r.setdefault("run", {**run, "revision": old.get("revision", "?"), "command": old.get("command", "?")})
    return kept


def parse_seeds(text: str | None) -> dict[str, tuple[int, ...]]:
    """``"fashion_mlp=0,1;fashion_cnn=0"`` -> seeds per model (the others keep :data:`MODELS`' seeds)."""
    out = {k: tuple(v["seeds"]) for k, v in MODELS.items()}
    if not text:
        return out
    for part in text.split(";"):
        key, _, vals = part.partition("=")
        key = key.strip()
        if key not in MODELS or not vals.strip():
            raise SystemExit(f"--seeds {text!r}: expected MODEL=S,S;... with MODEL in {', '.join(MODELS)}")
        out[key] = tuple(int(v) for v in vals.split(",") if v.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--seeds", default=None, help="seeds per model, e.g. 'fashion_mlp=0,1;fashion_vit=0'")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="targets (comma list)")
    p.add_argument("--no-finetune", dest="finetune", action="store_false", help="skip the fine-tuned arms")
    p.add_argument("--train-only", action="store_true", help="train (or find) the models, then stop")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: short training on 6000 images, one budget"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--merge", action="store_true", help="keep the other models' results from the JSON beside --out"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.data_dir is None:
        shared = str(SHARED_DATA) if SHARED_DATA.is_dir() else None
        args.data_dir = os.environ.get("RMTPRUNE_DATA") or shared
    if args.data_dir:
        os.environ.setdefault("RMTPRUNE_DATA", args.data_dir)  # sparsify_vit.train_vit reads it
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    args.seeds_of = parse_seeds(args.seeds)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.lr_grid = LR_GRID
    if args.quick:
        args.budgets = [0.4]
    args.out = args.out or (QUICK_OUT if args.quick else RESULTS) / f"{NAME}.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.command = command_line()
    args.t0 = time.perf_counter()
    if args.train_only:
        for key in keys:
            for seed in args.seeds_of[key]:
                _, facts = load_model(args, key, seed)
                log(f"[{key} s{seed}] {facts}")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_models import git_revision

    args.revision = git_revision()
    train = load_dataset("fashion-mnist", "train", data_dir=args.data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir=args.data_dir)
    results = merged(args, keys)
    run = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": args.revision,
        "command": args.command,
    }
    new = []
    for key in keys:  # every number without fine-tuning first, then the fine-tuned arms
        new.append(run_model(args, key, train, test))
        new[-1]["run"] = run
        results.append(new[-1])
        write(args, results)
    if args.finetune:
        for res in new:
            finetune_model(args, res, train, test)
            write(args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
