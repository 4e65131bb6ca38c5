"""One parameter budget on the small models: RMT allocation vs the others (pre-registered, issue 14).

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
[--seeds fashion_mlp=0,1] [--stage 1|2] [--no-finetune] [--quick]``; writes
``benchmarks/results/allocation_small.md`` and ``.json``. ``--train-only`` trains (or finds) the
models and stops, for training in parallel invocations before the measured run.
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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from _cli import CACHE, QUICK_OUT, RESULTS, SHARED_DATA, command_line, log
from _env import git_revision, training_code
from _measure import latency_ms
from _report import dump_json, machine, md_table
from _stats import ci
from torch import nn
from torch.nn.utils import prune

import rmtprune
from rmtprune._atomic import atomic_write_text
from rmtprune.calibration import Calibration, collect
from rmtprune.finetune import evaluate, finetune
from rmtprune.layers import collect_layers, handler_for, output_layer
from rmtprune.lowrank import LowRankModule
from rmtprune.masks import remove_masks, set_mask
from rmtprune.sparse_format import encode_tensor, stored_bytes
from rmtprune.sparsity import SparsifyConfig, sparsify
from rmtprune.spectral import MIN_P
from rmtprune.zoo.data import Dataset, batches, load_dataset

NAME = "allocation_small"
ALLOCATIONS = ("rmt", "uniform", "energy", "gavish_donoho", "spikes")
TRUNCATIONS = ("svd", "whitened")
#: The sparse references at the same count of nonzero weights.
SPARSE = ("magnitude", "wanda", "rmt-wanda", "rmt-magnitude")
BUDGETS = (0.25, 0.40, 0.60)
LR_GRID = (1e-4, 3e-4, 1e-3)
#: The fine-tuned arms by family; each family's lr is chosen on the validation split (first seed,
#: target LR_BUDGET) by the mean validation accuracy of the family's arms.
FT_FAMILIES: dict[str, tuple[str, ...]] = {
    "low rank, data-free SVD": ("rmt/svd", "uniform/svd"),
    "low rank, whitened": ("rmt/whitened", "uniform/whitened"),
    "sparse": ("magnitude", "wanda"),
}
LR_BUDGET = 0.40
N_CALIB = 2048
SPLIT_SEED = 1000
VIT_EPOCHS = 15
CALIB_BATCH, FT_BATCH = 256, 128
#: Latency: median over this many timed calls at batch 1 and at batch 256 (after 3 warm-up calls).
LATENCY_REPS = {1: 50, 256: 10}

MODELS: dict[str, dict[str, Any]] = {
    "fashion_mlp": {
        "title": "Fashion-MNIST MLP [784, 1000, 1000, 1000, 10]",
        "seeds": (10, 11, 12, 13, 14),
        "recipe": "SGD momentum 0.9, lr 0.05, cosine over 10 epochs, batch 128 (exp_fashion_mlp.py's dense "
        "arm with --width 1000,1000,1000 --epochs 10; cached under runs/bench-cache as fashion-mlp-dense)",
    },
    "fashion_vit": {
        "title": "Fashion-MNIST ViT vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2",
        "seeds": (3, 4, 5),
        "recipe": "Adam lr 1e-3, cosine to 0 over 15 epochs, batch 128 (sparsify_vit.py's train_vit; cached "
        "under ~/.cache/rmtprune/bench)",
    },
    "fashion_cnn": {
        "title": "Fashion-MNIST CNN cnn:16,32 (conv 16, conv 32, fc 128)",
        "seeds": (0,),
        "recipe": "SGD momentum 0.9, lr 0.05, cosine over 2 epochs, batch 128 (exp_fashion_cnn.py's dense "
        "arm; cached under runs/bench-cache as fashion-cnn-dense); not part of the pre-registered protocol",
    },
}
#: The models of the pre-registered protocol (the default of --models).
PROTOCOL_MODELS = ("fashion_mlp", "fashion_vit")

PROTOCOL = """\
Written and committed before any number of this benchmark was computed (issue 14); not changed after.
It replaces issue 13's `budget_small.md` protocol (2 MLP seeds, 1 ViT seed, validation carved ad hoc).

- **Models** (Fashion-MNIST; trained on the `train` split, 55,000 images: the training file minus the
  library's fixed 5,000-image validation split, `rmtprune.load_dataset(..., "val")`; weights trained
  once and cached, keyed by config and training-code hash): the MLP [784, 1000, 1000, 1000, 10] (SGD
  momentum 0.9, lr 0.05, cosine over 10 epochs, batch 128), 5 fresh seeds 10-14; the ViT
  `vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2` (`sparsify_vit.py`'s recipe: Adam 1e-3, cosine to 0
  over 15 epochs, batch 128), 3 fresh seeds 3-5 (never used before; seeds 3-7 are also the held-out
  seeds of the `signal` re-run). No choice depends on the trainings; the trainer logs test accuracy
  per epoch, nothing reads it.
- **Layers**: every layer rmtprune can cut except the output layer (the 10-way head, outside the
  budget) and layers with fewer than 10 rows or columns: MLP fc1-fc3; ViT the patch embedding and the
  24 attention/MLP linears.
- **Data**: per seed `s`, a permutation of the `train` split seeded with 1000 + s; its first 2,048
  images are the calibration set. The validation split (5,000 images) is used for one thing: the
  fine-tuning learning rate. Test accuracy on all 10,000 test images, read once per reported number.
- **Budgets**: 25%, 40%, 60% of the hidden layers' parameters as stored (weights + biases; a factored
  layer k(m + n) + bias): `rmtprune.compress(model, target=F, allocation=A, include=hidden)`.
- **Allocations** (library names): `uniform` (same ratio per layer), `energy` (one global energy
  fraction), `gavish_donoho` (Gavish-Donoho threshold x one global multiplier), `spikes` (BEMA spikes
  + one global `keep_bulk`, found by bisection), `rmt` (the global score `s_i / s_plus`; under whitened
  truncation its whitened version, against the generalized-MP edge). **Truncations**: plain SVD
  (data-free) and whitened SVD (SVD-LLM, the 2,048 calibration images, default damping); no guard.
  **Unstructured references** at the same count of nonzero weights, `floor(F (W + b)) - b`: global
  magnitude and Wanda (per-output-row |W| ||X||, the same calibration); two RMT-allocated sparse
  references (`sparsify(budget="rmt")` with Wanda and with magnitude scores, one shot, library
  defaults). Their stored size is reported both as nonzero values and with the bitmask/CSR index bytes
  (`rmtprune.sparse_format.stored_bytes`, in float32-parameter equivalents).
- **Metrics**: test accuracy without fine-tuning (every arm, every seed: the primary numbers), and
  after one fine-tune epoch; CPU latency (1 thread, median of 50 calls at batch 1 and 10 at batch
  256) of every arm on each model's first seed, next to the dense model's in the same process; paired
  differences against `uniform` with the same truncation: mean, standard error, 95% CI
  (t distribution, n - 1 degrees of freedom) over seeds.
- **Fine-tuning**: `rmtprune.finetune`, Adam, one epoch over the `train` split (55,000 images),
  batch 128, cosine with 5% warm-up, the same batch order for every arm of a seed; sparse arms keep
  their zeros (masks). Arms: `rmt` and `uniform` under both truncations, global magnitude, Wanda, and
  the dense model (fine-tuned at each family's lr). The lr is chosen per family (low rank data-free,
  low rank whitened, sparse) from {1e-4, 3e-4, 1e-3} by the mean validation accuracy of the family's
  arms at 40% on the model's first seed.
- **Success criterion** (as the issue states it): RMT allocation beats uniform allocation by more
  than 2 standard errors at >= 2 of the 3 budgets under both truncations. Evaluated on the accuracy
  without fine-tuning (all seeds) and, separately, after fine-tuning where every seed of a model ran.
  Published whichever way it falls, in the README's Results.
- **Order and compute** (2 shared CPU cores, one torch thread per process): stage 1, every number
  without fine-tuning (MLP, then ViT); stage 2, the fine-tuned arms (MLP, then ViT). A stage-2 cell
  that the session's compute does not reach is reported as not run; no cell is dropped for its value.
"""


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


def ci95(values: Sequence[float]) -> tuple[float, float, float, float]:
    """``(mean, standard error, low, high)``: the 95% t interval over seeds (:func:`_stats.ci`)."""
    return ci(values, 0.95)


def fmt_diff(d: Sequence[float]) -> str:
    """``+1.23 (SE 0.10; 95% CI +1.0, +1.5; 4/5)`` in pp, or ``-``; the last part: seeds better / seeds."""
    if not d:
        return "-"
    mean, se, lo, hi = (100 * v for v in ci95(d))
    wins = f"{sum(v > 0 for v in d)}/{len(d)}"
    if len(d) < 2:
        return f"{mean:+.2f} ({wins})"
    return f"{mean:+.2f} (SE {se:.2f}; CI {lo:+.2f}, {hi:+.2f}; {wins})"


def beats(d: Sequence[float]) -> bool:
    """The issue's test: mean difference above 2 standard errors (needs >= 2 seeds)."""
    if len(d) < 2:
        return False
    mean, se, _, _ = ci95(d)
    return mean > 2 * se


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

        epochs, n = (1, 6000) if args.quick else (VIT_EPOCHS, len(load_dataset("fashion-mnist", "train")))
        code = sparsify_vit.training_code()
        tag = f"{sparsify_vit._tag(sparsify_vit.SPEC)}_fashion-mnist_s{seed}_e{epochs}_n{n}_c{code}"
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
def sparse_stored_equiv(model: nn.Module, names: Sequence[str]) -> int:
    """Float32-parameter equivalents of the named layers as a sparse file stores them: the kept values
    plus the bitmask/CSR index bytes (``auto``: the smaller), from :mod:`rmtprune.sparse_format`'s
    own encoder, plus the biases; ``bytes / 4``."""
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        W = mod.weight.detach().float()
        parts, _ = encode_tensor(W, W != 0, "auto")
        total += stored_bytes(parts) + 4 * _bias_numel(mod)
    return math.ceil(total / 4)


def latencies(model: nn.Module, test: Dataset) -> dict[str, float]:
    """``{"b1": ms, "b256": ms}`` on the first test images (:data:`LATENCY_REPS`, after 3 warm-up calls)."""
    return {f"b{b}": latency_ms(model, test.x[:b], reps, warmup=3) for b, reps in LATENCY_REPS.items()}


def prepare(args: argparse.Namespace, key: str, seed: int, train: Dataset) -> dict[str, Any]:
    """The dense model of ``key``/``seed``, its hidden layers and its calibration statistics."""
    dense, facts = load_model(args, key, seed)
    names = hidden_layers(dense)
    (calib_idx,) = split_indices(len(train), [N_CALIB], SPLIT_SEED + seed)
    t0 = time.perf_counter()
    calib = collect(dense, list(train.x[calib_idx].split(CALIB_BATCH)), layers=names, held_out=0)
    return {
        "dense": dense,
        "facts": facts,
        "names": names,
        "calib": calib,
        "calib_seconds": time.perf_counter() - t0,
        "before": stored_params(dense, names),
    }


def run_model(args: argparse.Namespace, key: str, train: Dataset, test: Dataset) -> dict[str, Any]:
    """Every method at every budget for every seed of ``key``, without fine-tuning (stage 1)."""
    res: dict[str, Any] = {"key": key, "title": MODELS[key]["title"], "rows": [], "dense": [], "lr": None}
    for i, seed in enumerate(args.seeds_of[key]):
        timing = i == 0 and args.latency
        prep = prepare(args, key, seed, train)
        dense, names, calib, before = prep["dense"], prep["names"], prep["calib"], prep["before"]
        dense_acc = accuracy(dense, test)
        log(f"[{key} s{seed}] dense {100 * dense_acc:.2f}%, {len(names)} layers, {before:,} params")
        res["dense"].append(
            {"seed": seed, "acc": dense_acc, "hidden_params": before, "total_params": _n(dense),
             **prep["facts"], "layers": names, "calib_seconds": prep["calib_seconds"],
             "training_code": training_code(),
             "latency": latencies(dense, test) if timing else None}
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
                        if timing:
                            row["latency"] = latencies(model, test)
                        res["rows"].append(row)
                n_keep = weight_budget(dense, names, target)
                for method in SPARSE:
                    t0 = time.perf_counter()
                    model = sparse_copy(dense, names, method, n_keep, calib)
                    secs = time.perf_counter() - t0
                    row = _row(key, seed, target, method, model, names, before, test, secs)
                    row["stored_with_index"] = sparse_stored_equiv(model, names)
                    if timing:
                        row["latency"] = latencies(model, test)
                    res["rows"].append(row)
            res.setdefault("memo", []).append(dict(memo))
    return res


def ft_arms(dense: nn.Module, names: list[str], calib: Calibration, target: float) -> dict[str, nn.Module]:
    """The fine-tuned arms of :data:`FT_FAMILIES` at ``target``, before fine-tuning (sparse: masked)."""
    arms: dict[str, nn.Module] = {}
    n_keep = weight_budget(dense, names, target)
    for family in FT_FAMILIES.values():
        for m in family:
            alloc, _, trunc = m.partition("/")
            if trunc:
                arms[m] = compressed(dense, names, target, alloc, calib if trunc == "whitened" else None)[0]
            else:
                arms[m] = with_masks(sparse_copy(dense, names, m, n_keep, calib), names)
    return arms


def family_of(method: str) -> str:
    return next(f for f, ms in FT_FAMILIES.items() if method in ms)


def finetune_model(
    args: argparse.Namespace, res: dict[str, Any], train: Dataset, val: Dataset, test: Dataset
) -> dict[str, Any]:
    """Stage 2 for one model (``res`` from :func:`run_model`, rows added in place): each family's lr
    chosen on the validation split on the first seed, then every seed and budget at those lrs."""
    key = res["key"]
    for i, seed in enumerate(args.seeds_of[key]):
        if seed in res.get("ft_seeds", []):  # a restarted stage 2: never fine-tune (read test) twice
            continue
        dense_row = next((d for d in res["dense"] if d["seed"] == seed), None)
        if dense_row is None:
            raise SystemExit(f"--stage 2: seed {seed} of {key} has no stage-1 results")
        if dense_row.get("training_code", training_code()) != training_code():
            raise SystemExit(
                f"--stage 2: {key} seed {seed} was measured with training code {dense_row['training_code']}, "
                f"the package is now {training_code()}: its cached model would be retrained; rerun stage 1"
            )
        prep = prepare(args, key, seed, train)
        dense, names, calib, before = prep["dense"], prep["names"], prep["calib"], prep["before"]
        with svd_memo():
            if i == 0 and not res.get("lr"):
                res["lr"] = choose_lr(key, dense, names, calib, train, val, seed)
            lrs = res["lr"]["chosen"]
            dense_row["ft_acc"] = {}
            for lr in sorted(set(lrs.values())):
                dense_row["ft_acc"][f"{lr:g}"] = accuracy(fine_tuned(dense, train, lr, seed), test)
            log(f"[{key} s{seed}] dense +FT: {dense_row['ft_acc']}")
            for target in args.budgets:
                for method, model in ft_arms(dense, names, calib, target).items():
                    t0 = time.perf_counter()
                    mft = fine_tuned(model, train, lrs[family_of(method)], seed)
                    secs = time.perf_counter() - t0
                    res["rows"].append(
                        _row(key, seed, target, method, mft, names, before, test, secs, ft=True)
                    )
        res["ft_seeds"] = [*res.get("ft_seeds", []), seed]
        args.on_progress()
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
    key: str, dense: nn.Module, names: list[str], calib: Calibration, train: Dataset, val: Dataset, seed: int
) -> dict[str, Any]:
    """Each family's fine-tuning lr: the best mean validation accuracy of its arms at :data:`LR_BUDGET`."""
    models = ft_arms(dense, names, calib, LR_BUDGET)
    table: dict[str, dict[str, float]] = {}
    for lr in LR_GRID:
        table[f"{lr:g}"] = {
            m: accuracy(fine_tuned(model, train, lr, seed), val) for m, model in models.items()
        }
        log(f"[{key} s{seed}] lr {lr:g}: validation {table[f'{lr:g}']}")
    chosen, means = {}, {}
    for family, members in FT_FAMILIES.items():
        means[family] = {lr: statistics.fmean(v[m] for m in members) for lr, v in table.items()}
        chosen[family] = float(max(means[family], key=lambda lr: means[family][lr]))
    return {"chosen": chosen, "validation": table, "mean": means, "seed": seed, "target": LR_BUDGET}


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
            kept_txt = f"{100 * kept:.1f}%"
            if sel and "stored_with_index" in sel[0]:
                idx = statistics.fmean(r["stored_with_index"] / d0["hidden_params"] for r in sel)
                kept_txt += f", {100 * idx:.1f}%"
            cells.append(f"{pm([r['acc'] for r in sel])} ({kept_txt})" if sel else "-")
        body.append(cells)
    lines += [
        "### Test accuracy without fine-tuning (%, kept = stored / dense hidden parameters; sparse rows: "
        "nonzero values, then with the bitmask/CSR index bytes)",
        "",
    ]
    lines += [md_table(head, body), ""]
    body = []
    for t in TRUNCATIONS:
        for a in ALLOCATIONS:
            if a == "uniform":
                continue
            cells = [label(f"{a}/{t}")]
            for b in budgets:
                cells.append(fmt_diff(paired(rows, f"{a}/{t}", f"uniform/{t}", target=b, ft=False)))
            body.append(cells)
    for m in SPARSE:
        for t in TRUNCATIONS:
            cells = [f"{label(m)} vs uniform, {'data-free SVD' if t == 'svd' else 'whitened'}"]
            for b in budgets:
                cells.append(fmt_diff(paired(rows, m, f"uniform/{t}", target=b, ft=False)))
            body.append(cells)
    lines += [
        "### Paired difference to `uniform` with the same truncation, no fine-tuning (pp: mean, standard "
        "error, 95% CI over seeds, seeds where better / seeds)",
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
    lat = [r for r in rows if r.get("latency") and not r["ft"]]
    if lat and d0.get("latency"):
        dl = d0["latency"]
        lines += [
            f"### CPU latency, seed {seeds[0]} (1 thread; ms, median; dense: batch 1 {dl['b1']:.3f} ms, "
            f"batch 256 {dl['b256']:.2f} ms; in brackets: compressed / dense)",
            "",
        ]
        body = []
        for m in methods:
            cells = [label(m)]
            for b in budgets:
                sel = [r for r in lat if r["method"] == m and r["target"] == b]
                if not sel:
                    cells.append("-")
                    continue
                x = sel[0]["latency"]
                r1, r256 = x["b1"] / dl["b1"], x["b256"] / dl["b256"]
                cells.append(f"{x['b1']:.3f} ({r1:.2f}x) / {x['b256']:.2f} ({r256:.2f}x)")
            body.append(cells)
        lines += [md_table(["method (b1 / b256)", *[f"{100 * b:g}%" for b in budgets]], body), ""]
    if res.get("lr"):
        lr = res["lr"]
        ft_seeds = res.get("ft_seeds", [])
        lines += [
            "### Fine-tuned (one epoch over the train split; each family at its lr)",
            "",
            f"lrs chosen on the validation split (seed {lr['seed']}, target {lr['target']:g}): "
            + "; ".join(f"{f}: **{v:g}**" for f, v in lr["chosen"].items())
            + ". Validation accuracy (%) per lr:",
            "",
        ]
        arms = list(next(iter(lr["validation"].values())))
        body = [[k, *[f"{100 * v[a]:.2f}" for a in arms]] for k, v in lr["validation"].items()]
        lines += [md_table(["lr", *[label(a) for a in arms]], body), ""]
        lines.append(
            f"Fine-tuned seeds: {', '.join(map(str, ft_seeds)) or 'none'}"
            + ("" if set(ft_seeds) >= set(seeds) else f" of {', '.join(map(str, seeds))} (the rest not run)")
            + "."
        )
        lines.append("")
        body = []
        for lr_txt in sorted({k for d in dense for k in d.get("ft_acc", {})}):
            vals = [d["ft_acc"][lr_txt] for d in dense if lr_txt in d.get("ft_acc", {})]
            body.append([f"dense, the same fine-tune at lr {lr_txt}", *[pm(vals) for _ in budgets]])
        for members in FT_FAMILIES.values():
            for m in members:
                cells = [label(m)]
                for b in budgets:
                    sel = [r for r in rows if r["method"] == m and r["target"] == b and r["ft"]]
                    cells.append(pm([r["acc"] for r in sel]))
                body.append(cells)
        for t in TRUNCATIONS:
            cells = [f"rmt - uniform, {'data-free SVD' if t == 'svd' else 'whitened'} (pp)"]
            for b in budgets:
                cells.append(fmt_diff(paired(rows, f"rmt/{t}", f"uniform/{t}", target=b, ft=True)))
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


def criterion(res: dict[str, Any], budgets: Sequence[float], ft: bool) -> tuple[bool, list[str]]:
    """The pre-registered success criterion for one model: ``rmt`` beats ``uniform`` by more than 2
    standard errors at >= 2 of the budgets, under both truncations; and one line per truncation."""
    ok, out = True, []
    for t in TRUNCATIONS:
        diffs = [paired(res["rows"], f"rmt/{t}", f"uniform/{t}", target=b, ft=ft) for b in budgets]
        n_win = sum(beats(d) for d in diffs)
        ok = ok and n_win >= 2
        parts = [f"{100 * b:g}%: {fmt_diff(d)}" for b, d in zip(budgets, diffs, strict=True)]
        name = "data-free SVD" if t == "svd" else "whitened"
        out.append(f"  - {name}: {'; '.join(parts)}; beats by > 2 SE at {n_win} of {len(budgets)}")
    return ok, out


def summary_lines(results: Sequence[dict[str, Any]], budgets: Sequence[float]) -> list[str]:
    """The success criterion per model (rmt - uniform, pp, paired by seed), without and with fine-tuning."""
    out = []
    for res in results:
        if res["key"] not in PROTOCOL_MODELS:
            continue
        seeds = [d["seed"] for d in res["dense"]]
        ok, lines = criterion(res, budgets, ft=False)
        verdict = "met" if ok else "not met"
        out.append(f"- **{res['key']}**, no fine-tuning ({len(seeds)} seeds): criterion **{verdict}**")
        out += lines
        if set(res.get("ft_seeds", [])) >= set(seeds):
            ok, lines = criterion(res, budgets, ft=True)
            out.append(f"- **{res['key']}**, fine-tuned: criterion **{'met' if ok else 'not met'}**")
            out += lines
        else:
            out.append(
                f"- **{res['key']}**, fine-tuned: not evaluated (seeds fine-tuned: {res.get('ft_seeds', [])})"
            )
    return out


def write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """The results markdown (protocol first) and the raw rows as JSON beside it, atomically.

    The other models' results are re-read from the JSON just before writing, so invocations for
    different models (run in parallel processes) do not overwrite each other's results."""
    import fcntl

    with open(args.out.with_suffix(".lock"), "w") as lock:  # one writer at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_locked(args, results)


def _write_locked(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    wall = time.perf_counter() - args.t0
    own = {r["key"] for r in results}
    results = [*results, *[r for r in merged(args, sorted(own)) if r["key"] not in own]]
    results = sorted(results, key=lambda r: list(MODELS).index(r["key"]))
    head = [
        "# Allocation on the small models, pre-registered: RMT vs uniform, energy, Gavish-Donoho, spikes",
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
        "## The success criterion (rmt - uniform, same truncation, paired by seed; pp, SE, 95% CI)",
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
        for i, run in enumerate([res["run"], *res.get("ft_runs", [])]):
            what = res["key"] + (" (stage 2)" if i else "")
            runs.setdefault((run["date"], run["revision"], run["command"]), []).append(what)
    return [
        f"- {', '.join(keys)}: run {date} at git revision {rev}: `{cmd}`"
        for (date, rev, cmd), keys in sorted(runs.items())
    ]


def merged(args: argparse.Namespace, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The results of the models not in ``keys`` from the existing JSON beside ``--out``."""
    path = args.out.with_suffix(".json")
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if old.get("protocol") != PROTOCOL:
        raise SystemExit(f"{path} was written under another protocol; move it away or rerun every model")
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
    p.add_argument("--models", default=",".join(PROTOCOL_MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument(
        "--stage",
        choices=("all", "1", "2"),
        default="all",
        help="1: the numbers without fine-tuning; 2: the fine-tuned arms (reads stage 1 from the JSON)",
    )
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency columns")
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
    args.revision = git_revision()
    train = load_dataset("fashion-mnist", "train", data_dir=args.data_dir)
    if args.quick:  # the smoke run fine-tunes on 6,000 images, not an epoch
        train = train.subset(6000)
    val = load_dataset("fashion-mnist", "val", data_dir=args.data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir=args.data_dir)
    run = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": args.revision,
        "command": args.command,
    }
    new: list[dict[str, Any]] = []
    args.on_progress = lambda: write(args, new)
    if args.stage == "2":  # stage 1 of these models from the JSON
        path = args.out.with_suffix(".json")
        have = {r["key"]: r for r in json.loads(path.read_text())["results"]} if path.is_file() else {}
        missing = [k for k in keys if k not in have]
        if missing:
            raise SystemExit(f"--stage 2: no stage-1 results of {missing} in {path}")
        new = [have[k] for k in keys]
        for res in new:
            res.setdefault("ft_runs", []).append(run)
    else:
        for key in keys:  # every number without fine-tuning first, then the fine-tuned arms
            new.append(run_model(args, key, train, test))
            new[-1]["run"] = run
            write(args, new)
    if args.finetune and args.stage != "1":
        for res in new:
            finetune_model(args, res, train, val, test)
            write(args, new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
