"""Reference models from short spec strings: ``"mlp:1000"``, ``"cnn:32,64"``, ``"vit:dim=64,depth=4"``.

:func:`build_model` turns a spec plus the data's input shape and class count into one of the
networks of :mod:`.nets` (:class:`MLP`, :class:`CNN`, :class:`ViT`, re-exported here), after checking
on the meta device that it fits in memory; :func:`count_parameters` and :func:`describe` inspect
any model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import first_line
from .nets import ACTIVATIONS, CNN, MAX_SIZE, MLP, Attention, Block, FeedForward, ViT, _check_int  # noqa: F401

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MAX_SIZE",
    "MLP",
    "MODEL_FAMILIES",
    "ViT",
    "build_model",
    "count_parameters",
    "describe",
    "parse_spec",
]

#: Model families understood by :func:`build_model`, with the spec syntax of each.
MODEL_FAMILIES: dict[str, str] = {
    "mlp": "mlp[:W1,W2,...] hidden widths (default 1000; 'WxK' repeats W K times), "
    "options activation=relu|gelu|tanh|silu|sigmoid|leaky_relu, dropout=P",
    "cnn": "cnn[:C1,C2,...] conv channels (default 32,64), options hidden=H (0: no hidden layer), dropout=P",
    "vit": "vit[:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2,dropout=0]",
}


def _parse_number(token: str, kind: type, spec: str) -> Any:
    try:
        value = kind(token)
    except ValueError:
        raise ValueError(f"bad token {token!r} in model spec {spec!r}: expected {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"bad token {token!r} in model spec {spec!r}: expected a finite number")
    if kind is int and abs(value) > MAX_SIZE:
        raise ValueError(f"bad token {token!r} in model spec {spec!r}: at most {MAX_SIZE}")
    return value


def _memory_bytes() -> int:
    """Memory available now (``MemAvailable``), else physical memory, else a large default."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


def _construct(spec: str, make: Any) -> nn.Module:
    """Build ``make()`` after checking on the meta device (no memory) that it fits in memory.

    A spec such as ``mlp:4000000`` would otherwise allocate tens of GB before anything is checked.
    """
    if torch.empty(0).device.type == "meta":  # already building a skeleton: nothing is allocated
        return make()
    try:
        with torch.device("meta"):
            probe = make()
    except (RuntimeError, OverflowError, MemoryError) as exc:
        raise ValueError(f"model spec {spec!r} cannot be built: {first_line(exc, 200)}") from None
    n = sum(p.numel() for p in probe.parameters())
    itemsize = torch.empty(0).element_size()
    limit = _memory_bytes()
    if n * itemsize > limit:
        raise ValueError(
            f"model spec {spec!r} has {n:,} parameters ({n * itemsize / 1e9:.1f} GB), more than the "
            f"memory available ({limit / 1e9:.0f} GB)"
        )
    return make()


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """Split ``"family:a,b,key=value"`` into ``(family, positional tokens, options)``."""
    if not isinstance(spec, str):
        raise TypeError(f"model spec must be a string, got {type(spec).__name__}")
    family, _, rest = spec.strip().partition(":")
    family = family.strip().lower()
    if family not in MODEL_FAMILIES:
        raise ValueError(
            f"unknown model family {family!r} in spec {spec!r}; valid: {', '.join(MODEL_FAMILIES)} "
            f"({'; '.join(MODEL_FAMILIES.values())})"
        )
    positional: list[str] = []
    options: dict[str, str] = {}
    for raw in rest.split(",") if rest.strip() else []:
        token = raw.strip()
        if not token:
            raise ValueError(f"empty token in model spec {spec!r}")
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip().lower()
            if key in options:
                raise ValueError(f"option {key!r} given twice in model spec {spec!r}")
            options[key] = value.strip()
        else:
            positional.append(token)
    return family, positional, options


_MAX_LAYERS = 10_000


def _widths(tokens: list[str], spec: str) -> list[int]:
    out: list[int] = []
    for token in tokens:
        width, sep, times = token.lower().partition("x")
        w = _parse_number(width, int, spec) if width else _parse_number(token, int, spec)
        k = _parse_number(times, int, spec) if sep else 1
        if w < 1 or k < 1:
            raise ValueError(f"bad token {token!r} in model spec {spec!r}: widths and repeats must be >= 1")
        if len(out) + k > _MAX_LAYERS:
            raise ValueError(f"model spec {spec!r} asks for more than {_MAX_LAYERS} layers")
        out.extend([w] * k)
    return out


def _check_options(family: str, options: dict[str, str], valid: Sequence[str], spec: str) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for {family} in model spec {spec!r}; valid: {', '.join(valid)}"
        )


def build_model(spec: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a reference model from a spec string for data of ``input_shape`` (C, H, W).

    Specs: ``"mlp"`` (hidden widths [1000]), ``"mlp:3000,3000"`` or ``"mlp:3000x4,500"``
    (hidden widths only: the input and output widths come from the data), ``"mlp:1000,
    activation=gelu,dropout=0.1"``, ``"cnn"`` / ``"cnn:32,64,hidden=128"``, ``"vit"`` /
    ``"vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2"``. Raises ``ValueError`` for an unknown
    family (listing the valid ones), a bad token (naming it) or a shape rule the data breaks.
    """
    family, positional, options = parse_spec(spec)
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    shape = tuple(input_shape)
    if not shape or any(
        isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_SIZE for d in shape
    ):
        raise ValueError(f"input_shape={shape} must be positive ints, e.g. (1, 28, 28)")
    _check_int("num_classes", num_classes)

    if family == "mlp":
        _check_options(family, options, ("activation", "dropout"), spec)
        widths = _widths(positional, spec) if positional else [1000]
        activation = options.get("activation", "relu").lower()
        dropout = _parse_number(options["dropout"], float, spec) if "dropout" in options else 0.0
        return _construct(
            spec, lambda: MLP(math.prod(shape), widths, num_classes, activation=activation, dropout=dropout)
        )

    if len(shape) != 3:
        raise ValueError(f"{family} needs input_shape=(C, H, W), got {shape}")
    c, h, w = shape
    if family == "cnn":
        _check_options(family, options, ("hidden", "dropout"), spec)
        channels = _widths(positional, spec) if positional else [32, 64]
        hidden = _parse_number(options["hidden"], int, spec) if "hidden" in options else 128
        dropout = _parse_number(options["dropout"], float, spec) if "dropout" in options else 0.0
        return _construct(
            spec, lambda: CNN(c, num_classes, channels, image_size=(h, w), hidden=hidden, dropout=dropout)
        )

    # vit
    valid = ("dim", "depth", "heads", "patch", "mlp_ratio", "dropout")
    if positional:
        raise ValueError(f"bad token {positional[0]!r} in model spec {spec!r}: vit takes key=value options")
    _check_options(family, options, valid, spec)
    kwargs: dict[str, Any] = {}
    for key in ("dim", "depth", "heads"):
        if key in options:
            kwargs[key] = _parse_number(options[key], int, spec)
    if "patch" in options:
        patch = _parse_number(options["patch"], int, spec)
    else:  # the largest patch <= 7 that tiles the image: 7 on 28x28, 4 on 8x8
        g = math.gcd(h, w)
        patch = max(p for p in range(1, 8) if g % p == 0)
    for key in ("mlp_ratio", "dropout"):
        if key in options:
            kwargs[key] = _parse_number(options[key], float, spec)
    return _construct(
        spec,
        lambda: ViT(image_size=(h, w), patch_size=patch, in_channels=c, num_classes=num_classes, **kwargs),
    )


# ----------------------------------------------------------------------------- inspection


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters as stored (a low-rank layer counts its factors; buffers excluded)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """A short table of the model's leaf modules with parameters: name, type, weight shape, count."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rows = [("module", "type", "weight", "params")]
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        weight = getattr(mod, "weight", None)
        shape = "x".join(map(str, weight.shape)) if isinstance(weight, torch.Tensor) else "-"
        rows.append((name or "(root)", type(mod).__name__, shape, f"{sum(p.numel() for p in own):,}"))
    rows.append(("total", "", "", f"{count_parameters(model):,}"))
    from .._format import table

    return table(rows[0], rows[1:], sep_line=False, right=(3,))
