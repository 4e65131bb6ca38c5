"""Measures of a trained model in the benchmarks: copies, test metrics, parameter counts, ranks, time."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rmtprune.finetune import evaluate
from rmtprune.zoo.data import batches


def clone(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode."""
    return copy.deepcopy(model).eval()


def test_metrics(model: nn.Module, data: Any) -> tuple[float, float]:
    """(loss, accuracy) on ``data`` (the full test split)."""
    res = evaluate(model, lambda: batches(data, 1024), reduction="sum")
    return res["loss"], res["accuracy"]


def n_params(model: nn.Module) -> int:
    """Parameters as stored (a factored layer counts its two factors)."""
    return sum(p.numel() for p in model.parameters())


def module_params(model: nn.Module, name: str) -> int:
    """Parameters of the sub-module ``name`` as stored."""
    return sum(p.numel() for p in model.get_submodule(name).parameters())


def layer_rank(model: nn.Module, name: str) -> int | None:
    """Rank of a factored layer, or None when ``name`` is dense."""
    mod = model.get_submodule(name)
    rank = getattr(mod, "rank", None)
    return int(rank) if isinstance(rank, int) else None


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()`` (no warm-up: a caller that needs one runs it)."""
    return statistics.median(timed(fn)[1] for _ in range(repeats))


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall time (ms) of ``model(x)`` in eval mode over ``repeats`` calls after ``warmup`` calls."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
