"""The building blocks of a run: checks of names and devices, data, the model (sized on the meta
device first), the optimizer, the learning-rate schedule and mixed precision."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from ..errors import RmtpruneError, first_line
from .config import TrainConfig

#: Device types a run can train on (``meta`` holds no data; the rest are not built into torch).
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _short(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (torch's messages run long)."""
    text = f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    from torch.optim import lr_scheduler

    if cfg.lr_schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.lr_schedule == "step":
        return lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    return lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def _meta_model(cfg: TrainConfig, input_shape: Any, num_classes: int) -> nn.Module:
    """``cfg.model`` built on the meta device: shapes only, no memory, no random numbers drawn."""
    from ..zoo.models import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg.model, input_shape, num_classes)
    except (RuntimeError, OverflowError, MemoryError) as exc:
        raise RmtpruneError(f"model={cfg.model!r} cannot be built: {_short(exc)}") from None


def _memory_bytes(device: str) -> int | None:
    """Total memory of the device (RAM for the CPU), or None when unknown."""
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
        if dev.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def _check_model_size(cfg: TrainConfig, model: nn.Module) -> int:
    """Refuse a model whose training state (weights, gradients, optimizer moments) cannot fit the
    device's memory, before a byte of it is allocated; return its parameter count."""
    n = sum(p.numel() for p in model.parameters())
    copies = 4 if cfg.optimizer == "adamw" else 3
    need = n * 4 * copies
    have = _memory_bytes(cfg.device)
    if have is not None and need > have:
        raise RmtpruneError(
            f"model={cfg.model!r} has {n:,} parameters: training it needs about {need / 2**30:,.1f} GiB "
            f"(weights, gradients, optimizer state), more than the {have / 2**30:,.1f} GiB of device "
            f"{cfg.device!r}; choose a smaller model"
        )
    return n


def _check_names(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` listing the valid names for an unknown dataset or model family."""
    from ..zoo.data import DATASETS
    from ..zoo.models import parse_spec

    key = cfg.dataset.strip().lower().replace("_", "-")
    if key not in DATASETS and key.replace("-", "") not in ("fashion", "fmnist", "fashionmnist"):
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    parse_spec(cfg.model)
    _check_device(cfg.device)
    _check_amp(cfg)


def _check_device(device: str) -> None:
    """Raise ``ValueError`` for a device string torch does not know, one that holds no data
    (``meta``) or a device that is not there, before anything is built or written."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({_short(exc)})") from None
    if dev.type == "meta":
        raise ValueError(
            f"device={device!r} holds no data (shapes only), so nothing can be trained on it; "
            "use device='cpu' or a GPU"
        )
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(
            f"device={device!r} is not supported for training; use one of {', '.join(_DEVICE_TYPES)}"
        )
    available = {
        "cuda": lambda: torch.cuda.is_available(),
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if dev.type in available and not available[dev.type]():
        raise ValueError(
            f"device={device!r} asked for but {dev.type.upper()} is not available; use device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} asked for but there are only {torch.cuda.device_count()} CUDA device(s)"
        )


#: ``TrainConfig.amp`` -> the autocast dtype of the forward pass (``off``: none).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's mixed precision: ``torch.autocast`` in ``cfg.amp``'s dtype, or nothing.

    Only the training forward runs under it: the weights stay float32, the loss is taken in
    float32, evaluation is float32, and the cuts (SVD, fits) happen outside it at the precision
    METHOD.md asks for (float32/float64, never half).
    """
    dtype = AMP_DTYPES[cfg.amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=dtype)


def _make_scaler(cfg: TrainConfig) -> Any:
    """The gradient scaler float16 autocast needs (its small range underflows gradients); else None."""
    if cfg.amp != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(cfg.device).type)


def _check_amp(cfg: TrainConfig) -> None:
    """``amp='fp16'`` only on CUDA: on the CPU, float16 autocast is slow and bfloat16 is the mixed type."""
    if cfg.amp == "fp16" and torch.device(cfg.device).type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (device={cfg.device!r}); on the CPU use amp='bf16'")


def _load_data(cfg: TrainConfig, data_dir: str | os.PathLike[str] | None) -> tuple[Any, Any, Any]:
    """The run's ``(train, val, test)`` datasets; ``val`` is None when ``cfg.val_size == 0``.

    ``train`` is the training file minus the fixed validation split
    (:func:`rmtprune.zoo.data.load_dataset`); nothing in a run chooses anything on ``test``.
    """
    from ..zoo.data import load_dataset

    train_ds = load_dataset(cfg.dataset, "train", data_dir=data_dir, val_size=cfg.val_size)
    val_ds = (
        None
        if cfg.val_size == 0
        else load_dataset(cfg.dataset, "val", data_dir=data_dir, val_size=cfg.val_size)
    )
    test_ds = load_dataset(cfg.dataset, "test", data_dir=data_dir)
    for name, ds in (("train_subset", train_ds), ("test_subset", test_ds)):
        n = getattr(cfg, name)
        if n is not None:
            if n > len(ds):
                raise ValueError(
                    f"{name}={n} is larger than the {len(ds)} samples of {cfg.dataset} {ds.split}"
                )
            if ds is train_ds:
                train_ds = ds.subset(n)
            else:
                test_ds = ds.subset(n)
    return train_ds, val_ds, test_ds
