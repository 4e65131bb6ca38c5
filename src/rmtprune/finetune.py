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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._progress import progress as _progress
from ._validate import check_bool, check_choice, check_int, check_number
from .errors import RmtpruneError, first_line
from .lowrank import LowRankModule
from .masks import apply_masks, get_mask, mask_gradients, prunable_layers

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
    "recover",
    "distill_loss",
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


# ====================================================================== recovery by distillation
#: What :func:`recover` trains, and the distillation losses it knows.
RECOVER_TRAINABLE = ("factors", "all")
RECOVER_LOSSES = ("auto", "kl", "mse")


def _call(model: nn.Module, batch: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, tuple or mapping batch (the forms
    :func:`rmtprune.calibration.collect` accepts), its tensors moved to the model's device."""
    device = _device(model)
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    if isinstance(batch, tuple):
        return model(*(v.to(device) if torch.is_tensor(v) else v for v in batch))
    if torch.is_tensor(batch):
        return model(batch.to(device))
    raise TypeError(f"a recovery batch is a {type(batch).__name__}: expected a tensor, tuple or dict")


def _pick(out: Any, loss: str) -> tuple[str, torch.Tensor]:
    """``(loss kind, tensor)`` compared by the distillation loss: ``.logits`` for KL,
    ``.last_hidden_state`` (else ``.logits``, a tensor, or a tuple's first tensor) for MSE."""
    fields = out if isinstance(out, Mapping) else {}  # a transformers ModelOutput is both
    logits = fields.get("logits", getattr(out, "logits", None))
    hidden = fields.get("last_hidden_state", getattr(out, "last_hidden_state", None))
    if not torch.is_tensor(out) and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        out = out[0]
    plain = out if torch.is_tensor(out) else None
    if loss == "auto":
        loss = "kl" if torch.is_tensor(logits) else "mse"
    if loss == "kl":
        t = logits if torch.is_tensor(logits) else plain
    else:
        t = next((v for v in (hidden, logits, plain) if torch.is_tensor(v)), None)
    if t is None:
        what = "logits (.logits or a tensor)" if loss == "kl" else "a tensor output"
        raise TypeError(f"loss={loss!r} needs {what}; the model returned a {type(out).__name__}")
    return loss, t


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The distillation loss of one batch, in float32, over the positions ``mask`` keeps.

    ``kind="kl"``: ``KL(teacher || student)`` of the softmax over the last dim (temperature 1),
    averaged over positions (every leading index). ``"mse"``: ``sum (s - t)^2 / sum t^2`` over the
    kept positions, the squared error relative to the teacher's mean square. ``mask`` (a batch's
    ``attention_mask``) applies when its shape is the outputs' leading shape; otherwise every
    position counts (a classifier's pooled logits, a conv's feature map).
    """
    check_choice("kind", kind, ("kl", "mse"))
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"student output {tuple(student.shape)} != teacher output {tuple(teacher.shape)}")
    s, t = student.float(), teacher.detach().float().to(student.device)
    if kind == "kl":
        log_t = torch.log_softmax(t, dim=-1)
        per = (log_t.exp() * (log_t - torch.log_softmax(s, dim=-1))).sum(-1)
        sq_t = None
    else:
        per = (s - t).pow(2)
        sq_t = t.pow(2)
    keep = None
    if mask is not None and s.ndim >= 2 and tuple(mask.shape) == tuple(s.shape[:-1]):
        keep = mask.to(device=s.device) != 0
    if kind == "kl":
        return per[keep].mean() if keep is not None else per.mean()
    if keep is not None:
        per, sq_t = per[keep], sq_t[keep]
    return per.sum() / sq_t.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _sparse_masks(model: nn.Module, keep_zeros: bool) -> dict[nn.Parameter, torch.Tensor]:
    """Each sparse weight's zero pattern (True = kept), captured before training: the mask buffers
    of :mod:`rmtprune.masks`, and with ``keep_zeros`` every registered layer weight holding exact zeros."""
    out: dict[nn.Parameter, torch.Tensor] = {}
    for mod in model.modules():
        mask = get_mask(mod)
        if mask is not None and isinstance(mod.weight, nn.Parameter):
            out[mod.weight] = mask.detach().clone().to(device=mod.weight.device, dtype=torch.bool)
    if keep_zeros:
        for _, mod in prunable_layers(model):
            w = mod.weight
            if isinstance(w, nn.Parameter) and w not in out and bool((w == 0).any()):
                out[w] = w.detach() != 0
    return out


def _recover_params(model: nn.Module, trainable: str, sparse: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters :func:`recover` trains: every one (``"all"``), or those of the factored
    layers and of the layers whose weight is sparse (``"factors"``)."""
    if trainable == "all":
        return list(model.parameters())
    sparse_ids = {id(p) for p in sparse}
    chosen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, LowRankModule) or id(getattr(mod, "weight", None)) in sparse_ids:
            chosen.update((id(p), p) for p in mod.parameters())
    return list(chosen.values())


def _check_recover(model: Any, teacher: Any, steps: Any, lr: Any, weight_decay: Any, seed: Any) -> None:
    for name, m in (("model", model), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if teacher is model:
        raise ValueError("teacher is model: pass the dense model from before compression (a deep copy)")
    check_int("steps", steps, 0)
    check_number("lr", lr, 0.0, lo_open=True)
    check_number("weight_decay", weight_decay, 0.0)
    check_int("seed", seed)


def recover(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    trainable: str = "factors",
    loss: str = "auto",
    weight_decay: float = 0.0,
    keep_zeros: bool = False,
    progress: bool | None = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Recovery after compression: distil ``teacher`` (the dense model) into ``model``, ``steps`` AdamW steps.

    The short fine-tune the benchmarks give every compression method alike (issue 13), in the
    spirit of the recovery steps of LLM-Pruner (arXiv:2305.11627) and SVD-LLM (arXiv:2403.07378),
    with the teacher's output as the target (Hinton et al., arXiv:1503.02531) so no labels are
    needed: any calibration ``batches`` do (a tensor, tuple or mapping each, as for
    :func:`rmtprune.calibration.collect`), cycled in a fresh seeded order each pass.

    ``loss``: ``"kl"`` compares softmaxes (``.logits`` of a transformers LM / classifier, or a
    plain logits tensor), ``"mse"`` the relative squared error of ``.last_hidden_state`` or any
    tensor output, ``"auto"`` KL when the output has ``.logits``, else MSE; padding positions (the
    batch's ``attention_mask``) are left out (:func:`distill_loss`). ``trainable="factors"`` trains
    the parameters of the factored layers (:mod:`rmtprune.lowrank`) and of the sparse layers only;
    ``"all"`` every parameter. Sparse weights keep their zeros: their pattern (mask buffers of
    :mod:`rmtprune.masks`, and with ``keep_zeros`` any registered layer weight with exact zeros, as
    one-shot sparse pruning leaves) is captured first, gradients are masked and the zeros re-applied
    after every step.

    Both models run in eval mode (no dropout, batch-norm statistics untouched: the target is the
    teacher's deterministic output); modes and ``requires_grad`` are restored afterwards, the
    teacher is only read (under ``no_grad``). Returns ``{"steps", "loss", "loss_start",
    "loss_end", "window", "losses", "trainable_params", "seconds"}``: ``loss_start`` / ``loss_end``
    are the mean loss of the first / last ``window`` steps (each measured before its update).
    """
    _check_recover(model, teacher, steps, lr, weight_decay, seed)
    check_choice("trainable", trainable, RECOVER_TRAINABLE)
    check_choice("loss", loss, RECOVER_LOSSES)
    check_bool("keep_zeros", keep_zeros)
    nan = float("nan")
    result: dict[str, Any] = {"steps": 0, "loss": loss, "loss_start": nan, "loss_end": nan, "window": 0}
    result.update(losses=[], trainable_params=0, seconds=0.0)
    if steps == 0:
        return result
    t0 = time.perf_counter()
    batches = list(batches)
    if not batches:
        raise ValueError("recovery needs at least one batch; got none")
    sparse = _sparse_masks(model, keep_zeros)
    params = _recover_params(model, trainable, sparse)
    if not params:
        raise ValueError(
            "trainable='factors' found no factored or sparse layer in the model; compress it first "
            "(or pass keep_zeros=True for zeroed weights without masks, or trainable='all')"
        )
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters() if p.numel()}
    ids = {id(p) for p in params}
    shared = [n for n, p in model.named_parameters() if id(p) in ids and p.data_ptr() in teacher_ptrs]
    if shared:
        raise ValueError(
            f"parameter {shared[0]!r} is shared with the teacher: pass a copy of the dense model"
        )
    check_lr(lr, params)
    grads = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in [*model.modules(), *teacher.modules()]}
    try:
        for p in grads:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        teacher.eval()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        kind, losses = _recover_loop(model, teacher, batches, opt, sparse, steps, loss, progress, seed)
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
            if id(p) in ids:
                p.grad = None
        for m, mode in modes.items():
            m.training = mode
    window = max(1, min(10, steps // 5))
    result.update(steps=steps, window=window, losses=losses, trainable_params=sum(p.numel() for p in params))
    result.update(loss_start=sum(losses[:window]) / window, loss_end=sum(losses[-window:]) / window)
    result.update(loss=kind, seconds=time.perf_counter() - t0)
    return result


def _recover_loop(
    model: nn.Module,
    teacher: nn.Module,
    batches: list[Any],
    opt: torch.optim.Optimizer,
    sparse: Mapping[nn.Parameter, torch.Tensor],
    steps: int,
    loss: str,
    progress: bool | None,
    seed: int,
) -> tuple[str, list[float]]:
    """The optimizer steps of :func:`recover`: ``(loss kind used, loss of each step)``."""
    gen = torch.Generator().manual_seed(seed)
    lr = opt.param_groups[0]["lr"]
    order: list[int] = []
    losses: list[float] = []
    kind = loss
    with torch.no_grad():
        for w, keep in sparse.items():
            w.mul_(keep.to(w.dtype))
    for step in _progress(range(steps), total=steps, desc="recover", enable=progress):
        if not order:
            order = torch.randperm(len(batches), generator=gen).tolist()
        batch = batches[order.pop()]
        with torch.no_grad():
            target = _call(teacher, batch)
        kind, t = _pick(target, loss)
        _, s = _pick(_call(model, batch), kind)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        value = distill_loss(s, t, kind, mask if torch.is_tensor(mask) else None)
        losses.append(float(value.detach()))
        if not math.isfinite(losses[-1]):
            raise DivergedError(
                f"recovery diverged at step {step + 1} of {steps}: the loss is {losses[-1]}; "
                f"lower the learning rate (lr, now {lr:g})"
            )
        opt.zero_grad(set_to_none=True)
        value.backward()
        for w, keep in sparse.items():
            if w.grad is not None:
                w.grad.mul_(keep.to(w.grad.dtype))
        optimizer_step(opt, f"recovery diverged at step {step + 1} of {steps}", lr)
        with torch.no_grad():
            for w, keep in sparse.items():
                w.mul_(keep.to(w.dtype))
    return kind, losses
