"""Sequential application of a calibrated plan: block after block, each refit to what reaches it.

A one-shot whitened plan (:func:`rmtprune.plan` with ``calibration=``) truncates every layer on the
*dense* model's inputs ``x``. Once the earlier blocks are cut, a layer sees other inputs ``x~``.
Applied sequentially (as SparseGPT, arXiv:2301.00774, and GPTQ, arXiv:2210.17323, apply their
layers), the blocks are cut in the order the forward pass reaches them, and each block's layers are
truncated in the space whitened by ``C~ = E[x~ x~^T]``, the second moment of the inputs the
already-cut model gives them: the rank-k ``W'`` minimising ``E||W x~ - W' x~||^2`` (SVD-LLM's
truncation, arXiv:2403.07378, on the inputs the layer will really get). Ranks are the plan's
(allocated once, on the dense statistics, so the budget is met exactly); only the factors change.

Aiming at the dense model's outputs instead, ``min E||W x - W' x~||^2 + lam ||W' - W||^2``, has the
closed-form target ``W* = W + W (M - C~)(C~ + lam I)^-1`` (``M = E[x x~^T]``); it lowered the output
error of a synthetic residual stack by 5-13%, but on MiniLM-L6 (224 calibration sentences, 3,000
token rows for 1,536-wide inputs) it *lowered* the validation cosine at every ridge tried (80%:
one-shot 0.9165, inputs-only refit 0.9175, dense target 0.8915 / 0.9049 / 0.9120 / 0.9158 at
``lam`` = 0.01 / 0.1 / 1 / 10 x mean(diag C~)): a regression on that few rows per feature fits its
calibration noise. It is not used (docs/compression.md). A least-squares update of the second factor
given the first, in one-shot mode, changes nothing: given ``A = U_k sqrt(s)``, the least-squares
``B`` *is* the whitened truncation's (tests/test_sequential.py).

This module measures (:func:`stages`, :func:`block_moments`); :func:`rmtprune.surgery.apply_sequential`
cuts. Cost: for each block every fit batch runs through the model up to that block (the pass stops
after the block's last layer), about ``blocks / 2`` forward passes of the calibration set in all.
Memory: one input's rows of one batch, plus an ``n x n`` accumulator per layer of the block
(layers reading one input share each batch's product, as in :func:`rmtprune.calibration.collect`).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._progress import progress as _progress
from .calibration import InputStats, _forward, _model_device, _sums_hook
from .layers import LayerHandler, handler_for

__all__ = ["stages", "block_moments"]

_BLOCK = re.compile(r"^((?:.*?\.)??\d+)(?:\.|$)")


class _StopPass(BaseException):  # noqa: N818  (control flow, not an error)
    """Raised by a hook to end a forward pass once a block's last layer has run (a BaseException,
    so that a model's own ``except Exception`` fallback cannot swallow it and run the layer twice)."""


def _block_of(name: str) -> str:
    """The repeated block a layer belongs to: its name up to the first numeric component
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``); the layer itself when there is none."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def _handler(mod: nn.Module) -> LayerHandler:
    h = handler_for(mod)
    if h is None:
        raise ValueError(f"{type(mod).__name__} is not a layer rmtprune can cut")
    return h


def _call_order(model: nn.Module, names: Sequence[str], batches: Sequence[Any]) -> tuple[list[str], bool]:
    """The layers in the order the forward passes first call them, and whether one is called twice
    in a pass. Batches are run until every layer has been seen (a layer a batch skips, such as a
    data-dependent branch, is placed where a later batch first calls it)."""
    order: list[str] = []
    seen: set[str] = set()
    twice = [False]

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if name in seen:
                twice[0] = True
            seen.add(name)
            if name not in order:
                order.append(name)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                seen.clear()
                _forward(model, batch, i, _model_device(model), {"mask": None})
                if len(order) == len(names):
                    break
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"layer {missing[0]!r} saw no calibration input (is it used in the forward pass?)")
    return order, twice[0]


def _group(order: Sequence[str]) -> list[list[str]]:
    """Consecutive runs of one block in call order: a block whose layers another block's layer
    interrupts is split there, so that every stage is measured after all that runs before it is cut."""
    return [list(g) for _, g in itertools.groupby(order, _block_of)]


def stages(model: nn.Module, names: Sequence[str], batches: Sequence[Any]) -> list[list[str]]:
    """``names`` grouped into blocks (the name up to its first numeric component; consecutive in
    call order) in the order the forward passes on ``batches`` reach them; each group is refit
    together."""
    order, _ = _call_order(model, names, batches)
    return _group(order)


def block_moments(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Any],
    *,
    progress: bool | None = False,
) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """For each block of ``names`` in forward order: ``(block, {layer: C~})``, ``C~ = E[x~ x~^T]``
    over the layer's input rows in ``model`` (float64, padding left out). A generator: the caller
    cuts the block before asking for the next, so each block is measured on the model as cut so
    far. The model runs without gradients (in the mode it is in); ``batches`` (a list) is read once
    per block.
    """
    if not batches:
        raise ValueError("calibration needs at least one batch; got none")
    order, twice = _call_order(model, names, batches)
    groups = _group(order)
    bar = _progress(groups, total=len(groups), desc="sequential", enable=progress)
    for group in bar:
        stop = None if twice else group[-1]  # a layer called twice: run the whole pass
        acc: dict[str, InputStats] = {}

        def sink(
            name: str,
            sums: tuple[torch.Tensor, torch.Tensor, int],
            acc: dict[str, InputStats] = acc,
            stop: str | None = stop,
        ) -> None:
            st = acc.get(name)
            if st is None:
                st = acc[name] = InputStats.zeros(sums[0].shape[0], sums[0].device)
            st.add_sums(*sums)
            if name == stop:
                raise _StopPass

        state: dict[str, Any] = {"mask": None, "last": None}
        hooks = [
            model.get_submodule(n).register_forward_hook(
                _sums_hook(n, _handler(model.get_submodule(n)), state, torch.float32, sink)
            )
            for n in group
        ]
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    state["last"] = None
                    with contextlib.suppress(_StopPass):
                        _forward(model, batch, i, _model_device(model), state)
        finally:
            state["last"] = None
            for hk in hooks:
                hk.remove()
        out = {}
        for name in group:  # a layer a batch does not reach (a data-dependent branch) adds nothing
            if name not in acc or acc[name].rows == 0:
                raise ValueError(
                    f"layer {name!r} saw no calibration input once the blocks before it were cut"
                )
            C = acc[name].second_moment.cpu()
            if not bool(torch.isfinite(C).all()):
                raise ValueError(f"the calibration inputs of layer {name!r} contain NaN or Inf")
            out[name] = C
        yield group, out
