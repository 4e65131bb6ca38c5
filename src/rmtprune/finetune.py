"""Fine-tuning with frozen pruning masks and optional L1 / L2 / group-lasso regularisation.

Model-agnostic on purpose: ``data`` is any re-iterable of ``(inputs, targets)`` batches (a list,
a ``DataLoader``, or a zero-argument callable returning a fresh iterator), ``loss_fn`` any
``loss(outputs, targets)``. Pruned entries stay exactly zero: gradients are masked before each
step and masks re-applied after it (see :mod:`rmtprune.masks`).

The regulariser is ``l1 * sum|w| + l2 * sum w**2 + group_lasso * sum_rows ||w_row||_2`` over the
weights of the prunable layers (Linear/Conv; biases and norms are left alone), as in
Berlyand, Bourdais, Owhadi and Shmalo (2025), arXiv:2503.01922.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._validate import check_choice, check_int, check_number
from .errors import RmtpruneError, first_line
from .masks import apply_masks, mask_gradients, prunable_layers

SCHEDULES = ("constant", "cosine")

__all__ = [
    "DivergedError",
    "FinetuneResult",
    "finetune",
    "lr_factor",
    "regularizer",
    "evaluate",
    "iterate_batches",
    "check_lr",
]


class DivergedError(RmtpruneError, FloatingPointError):
    """The loss became NaN or infinite during training or fine-tuning (the message names the
    epoch or step and the learning rate). A user error: the command line prints it in one line."""


Batch = tuple[Any, Any]


def optimizer_step(opt: torch.optim.Optimizer, where: str, lr: float) -> None:
    """``opt.step()``, turning torch's overflow error (a learning rate too large for the dtype)
    into :class:`DivergedError`: ``where`` names the epoch/step, the message asks for a smaller lr."""
    try:
        opt.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise DivergedError(
            f"{where}: the optimizer step overflowed ({first_line(exc, 120)}); "
            f"lower the learning rate (--lr, now {lr:g})"
        ) from None


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: optimizer steps, mean data loss, mean regulariser."""

    steps: int
    mean_loss: float
    mean_reg: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return {"steps": self.steps, "mean_loss": self.mean_loss, "mean_reg": self.mean_reg}


def iterate_batches(data: Iterable[Batch] | Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """One pass over ``data`` (calling it first when it is a zero-argument callable)."""
    src = data() if callable(data) else data
    return iter(src)


def _cycle(data: Any) -> Iterator[Batch]:
    """Batches forever, re-iterating ``data`` at its end; raises when a pass yields nothing."""
    while True:
        empty = True
        for batch in iterate_batches(data):
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batches")


#: Which weights :func:`regularizer` penalises.
REG_WEIGHTS = ("prunable", "all")


def _reg_weights(model: nn.Module, weights: str) -> Iterator[torch.Tensor]:
    if weights == "prunable":
        return (mod.weight for _, mod in prunable_layers(model))
    return (p for p in model.parameters() if p.requires_grad and p.ndim >= 2)


def regularizer(
    model: nn.Module,
    l1: float = 0.0,
    l2: float = 0.0,
    group_lasso: float = 0.0,
    *,
    weights: str = "prunable",
) -> torch.Tensor:
    """``l1 sum|w| + l2 sum w^2 + group_lasso sum_rows ||w_row||`` over the model's weights.

    ``weights="prunable"``: the weights of the prunable layers (Linear/Conv, as masked by
    :mod:`rmtprune.masks`); ``"all"``: every trainable tensor with >= 2 dims, low-rank factors
    included (what the trainer penalises). Biases and normalisation parameters never are. The
    papers use 1e-6 to 5e-6 for ``l1`` and ``l2``.
    """
    l1, l2, group_lasso = (
        check_number(n, v, 0.0) for n, v in (("l1", l1), ("l2", l2), ("group_lasso", group_lasso))
    )
    check_choice("weights", weights, REG_WEIGHTS)
    total: torch.Tensor | None = None
    if not (l1 or l2 or group_lasso):
        return torch.zeros(())
    for w in _reg_weights(model, weights):
        term = w.new_zeros((), dtype=torch.float32)
        if l1:
            term = term + l1 * w.abs().sum().float()
        if l2:
            term = term + l2 * w.pow(2).sum().float()
        if group_lasso:
            term = term + group_lasso * w.reshape(w.shape[0], -1).norm(dim=1).sum().float()
        total = term if total is None else total + term.to(total.device)
    return total if total is not None else torch.zeros(())


def lr_factor(steps: int, schedule: str = "constant", warmup: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier of step ``i`` (0-based) of ``steps``: linear warmup, then flat or cosine.

    With ``warmup`` the first ``ceil(warmup * steps)`` steps ramp from ``1/n`` to 1; ``cosine``
    then decays to ``0.5 * (1 + cos(pi * (n - 1) / n))`` at the last step, never exactly 0, so
    every step moves the weights.
    """
    n_warm = math.ceil(warmup * steps) if warmup > 0 else 0
    rest = max(steps - n_warm, 1)

    def factor(i: int) -> float:
        if i < n_warm:
            return (i + 1) / n_warm
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (i - n_warm) / rest))

    return factor


def check_lr(lr: float, params: Iterable[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``lr`` is finite, > 0 and representable in every floating
    dtype of ``params`` (Adam multiplies the weights by it: ``lr=1e308`` overflows float32)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    for p in params:
        if p.dtype.is_floating_point and lr > torch.finfo(p.dtype).max:
            dtype = str(p.dtype).replace("torch.", "")
            raise ValueError(
                f"lr={lr!r} must be <= {torch.finfo(p.dtype).max:.3g}, the largest {dtype} of the weights"
            )


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def finetune(
    model: nn.Module,
    data: Iterable[Batch] | Callable[[], Iterable[Batch]],
    *,
    steps: int | None = None,
    epochs: float = 1.0,
    lr: float = 1e-4,
    l1: float = 0.0,
    l2: float = 0.0,
    group_lasso: float = 0.0,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup: float = 0.0,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place with Adam, pruned entries frozen, optional regularisation.

    ``optimizer`` builds another optimizer from the trainable parameters (e.g.
    ``lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)``); ``lr`` and the schedule still set
    its learning rate at every step.

    Runs ``steps`` optimizer steps, or ``epochs`` passes over ``data`` when ``steps`` is None
    (fractional epochs stop early). ``loss_fn`` defaults to cross-entropy. The model is left in
    the train/eval mode it came in.

    ``schedule="cosine"`` decays the learning rate from ``lr`` to 0 over the run; ``warmup`` (a
    fraction of the steps) ramps it up linearly first. Both matter after a model trained to a
    cosine-annealed minimum: a fresh Adam at a constant ``lr`` moves every weight by about
    ``lr`` per step and costs the *dense* model accuracy by itself.
    """
    if steps is not None:
        check_int("steps", steps, 0)
    check_number("epochs", epochs, 0.0)
    check_number("lr", lr, 0.0, lo_open=True)
    check_number("weight_decay", weight_decay, 0.0)
    check_choice("schedule", schedule, SCHEDULES)
    check_number("warmup", warmup, 0.0, 1.0, hi_open=True)
    loss_fn = loss_fn or nn.functional.cross_entropy
    if steps is None:
        n_batches = len(data) if hasattr(data, "__len__") else sum(1 for _ in iterate_batches(data))
        steps = int(round(epochs * n_batches))
    params = [p for p in model.parameters() if p.requires_grad]
    if steps == 0 or not params:
        return FinetuneResult(0, float("nan"), float("nan"))
    check_lr(lr, params)
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
    factor = lr_factor(steps, schedule, warmup)
    device = _device(model)
    was_training = model.training
    model.train()
    apply_masks(model)
    tot_loss = tot_reg = 0.0
    use_reg = bool(l1 or l2 or group_lasso)
    batches = _cycle(data)
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * factor(step)
            x, y = next(batches)
            x, y = _to(x, device), _to(y, device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            reg = regularizer(model, l1, l2, group_lasso) if use_reg else None
            total = loss + reg.to(loss.device, loss.dtype) if reg is not None else loss
            value = float(total.detach())
            if not math.isfinite(value):
                raise DivergedError(
                    f"fine-tuning diverged at step {step + 1} of {steps}: the loss is {value}; "
                    f"lower the learning rate (--lr, now {lr:g})"
                )
            total.backward()
            mask_gradients(model)
            optimizer_step(opt, f"fine-tuning diverged at step {step + 1} of {steps}", lr)
            apply_masks(model)
            tot_loss += float(loss.detach())
            tot_reg += float(reg.detach()) if reg is not None else 0.0
    finally:
        model.train(was_training)
    return FinetuneResult(steps, tot_loss / steps, tot_reg / steps)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Iterable[Batch] | Callable[[], Iterable[Batch]],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    reduction: str = "mean",
) -> dict[str, float]:
    """Mean loss and top-1 accuracy of a classifier over one pass of ``data`` (eval mode, no grad).

    ``reduction`` says what ``loss_fn`` returns for a batch: its mean (multiplied back by the
    batch size) or its ``"sum"``; the default loss is cross-entropy with that reduction. Returns
    ``{"loss", "accuracy", "n"}``.
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    if loss_fn is None:
        loss_fn = nn.functional.cross_entropy
        if reduction == "sum":
            loss_fn = functools.partial(nn.functional.cross_entropy, reduction="sum")
    device = _device(model)
    was_training = model.training
    model.eval()
    n = correct = 0
    loss_sum = 0.0
    try:
        for x, y in iterate_batches(data):
            x, y = _to(x, device), _to(y, device)
            out = model(x)
            b = int(y.shape[0])
            batch_loss = float(loss_fn(out, y))
            loss_sum += batch_loss if reduction == "sum" else batch_loss * b
            correct += int((out.argmax(dim=-1) == y).sum())
            n += b
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("data yielded no batches")
    return {"loss": loss_sum / n, "accuracy": correct / n, "n": n}
