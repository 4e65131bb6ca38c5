"""Cached training runs of the benchmarks: a trained model is stored under ``runs/bench-cache/``
keyed by a hash of what its :class:`rmtprune.TrainConfig` trains and of the package source that
trains it (:func:`_env.training_code`), so a rerun or another experiment reuses it, and a change to
the code retrains instead of mixing code versions in one table."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from _cli import log
from _env import git_revision, training_code

from rmtprune._atomic import atomic_path
from rmtprune.training import TrainConfig, train

#: The TrainConfig fields that change what is trained: the cache key. Fields added to TrainConfig
#: later (bookkeeping such as ``eval_before_prune``) do not invalidate cached runs.
KEY_FIELDS = (
    "dataset", "model", "epochs", "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "lr_step",
    "lr_gamma", "l1", "l2", "batch_size", "seed", "prune", "prune_every", "prune_start", "keep_bulk",
    "decay_T", "ks_max", "min_rank", "keep_output_rank", "exclude", "train_subset", "test_subset",
    "val_size",
)  # fmt: skip
_KEY_DEFAULTS = {"keep_output_rank": True}
#: Where a nested ``TrainConfig.to_dict()["compression"]`` keeps the fields of the flat layout.
_FLAT_NAMES = {"protect_last": "keep_output_rank"}
#: Real-valued fields: hashed as floats, so ``keep_bulk=0`` and ``keep_bulk=0.0`` are one run.
_FLOAT_FIELDS = ("lr", "momentum", "weight_decay", "lr_gamma", "l1", "l2", "keep_bulk", "decay_T", "ks_max")


def flat_config(d: dict[str, Any]) -> dict[str, Any]:
    """A ``TrainConfig.to_dict()`` of any release as one flat dict under the flat layout's names.

    Earlier releases kept ``keep_bulk``, ``ks_max``, ``min_rank``, ``exclude`` and
    ``keep_output_rank`` at the top level; later ones nest a ``CompressionConfig`` under
    ``compression`` (``protect_last`` for ``keep_output_rank``). Compression fields the flat layout
    never had (``rule``, ``alpha``, ...) are kept under ``compression.<name>`` when they differ from
    their defaults, so a run with a non-default rule gets its own key while every run of the old
    layout keeps its key.
    """
    flat = {k: v for k, v in d.items() if k != "compression"}
    nested = d.get("compression")
    if isinstance(nested, dict):
        from rmtprune.config import CompressionConfig

        defaults = CompressionConfig().to_dict()
        for k, v in nested.items():
            name = _FLAT_NAMES.get(k, k)
            if name in KEY_FIELDS:
                flat[name] = v
            elif k not in defaults or v != defaults[k]:
                flat[f"compression.{k}"] = v
    return flat


def cache_key(cfg: TrainConfig | dict[str, Any], code: str | None = None) -> str:
    """16 hex digits of the sha256 of what ``cfg`` trains (:data:`KEY_FIELDS`, see :func:`flat_config`)
    with which code (``code``, default the installed package's :func:`_env.training_code`)."""
    d = flat_config(cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg)
    sub = {k: d.get(k, _KEY_DEFAULTS.get(k)) for k in KEY_FIELDS}
    sub["code"] = training_code() if code is None else code
    sub.update({k: v for k, v in d.items() if k.startswith("compression.")})
    for k in _FLOAT_FIELDS:
        if isinstance(sub.get(k), int) and not isinstance(sub[k], bool):
            sub[k] = float(sub[k])
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def sgd_config(
    args: argparse.Namespace, dataset: str, model: str, seed: int, **fields: Any
) -> dict[str, Any]:
    """The experiments' training recipe as ``TrainConfig`` fields: SGD (momentum 0.9) at ``args.lr``,
    cosine schedule over ``args.epochs``, batch 128, plus ``fields``; ``--quick`` trains on 6000 images."""
    cfg = dict(
        dataset=dataset,
        model=model,
        epochs=args.epochs,
        optimizer="sgd",
        lr=args.lr,
        momentum=0.9,
        lr_schedule="cosine",
        batch_size=128,
        seed=seed,
        **fields,
    )
    if args.quick:
        cfg["train_subset"] = 6000
    return cfg


def _find_cached(cache: Path, tag: str, key: str) -> Path | None:
    """The cached run of ``key``: ``<tag>-<key>.pt``, or another file of the tag whose config and code
    match (runs cached before the code was part of the key never match: they are retrained)."""
    path = cache / f"{tag}-{key}.pt"
    if path.is_file():
        return path
    for other in sorted(cache.glob(f"{tag}-*.pt")):
        try:
            run = torch.load(other, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a damaged cache file is simply not used
            continue
        if "code" in run and cache_key(run["config"], run["code"]) == key:
            os.replace(other, path)
            return path
    return None


def train_cached(cfg: TrainConfig, args: argparse.Namespace, tag: str, prefix: str = "") -> dict[str, Any]:
    """Train ``cfg`` (or load the cached run of the same config): model, metrics, timings, decisions.

    The returned dict also has ``wall`` (seconds of the run when it was trained), ``cached``, and the
    ``code`` hash and git ``revision`` it was trained at.
    """
    key = cache_key(cfg)
    path = Path(args.cache) / f"{tag}-{key}.pt"
    found = None if args.refresh else _find_cached(Path(args.cache), tag, key)
    if found is not None:
        run = torch.load(found, map_location="cpu", weights_only=False)
        run["cached"] = True
        log(f"{prefix}cached: {found.name} (test acc {100 * run['metrics'][-1]['test_acc']:.2f}%)")
        return run
    t0 = time.perf_counter()
    result = train(cfg, data_dir=args.data_dir, log=lambda s: log(f"{prefix}{s}"))
    run = {
        "config": cfg.to_dict(),
        "code": training_code(),
        "revision": git_revision(),
        "model": result.model,
        "metrics": result.metrics,
        "timings": dict(result.timings),
        "decisions": result.decisions,
        "wall": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(run, tmp)
    run["cached"] = False
    return run
