"""Reference models for the experiments: an MLP, a small CNN and a small ViT.

Every weight that rmtprune may factor is a plain ``nn.Linear`` or ``nn.Conv2d`` called as a
sub-module (never through its ``.weight`` in ``forward``), so :mod:`rmtprune.surgery` can swap it
for a low-rank factorisation and the model keeps working. No model puts an activation on its
logits (METHOD.md section 7: the 2023 baseline did, and one class died).

:func:`build_model` turns a short spec (``"mlp:1000"``, ``"cnn:32,64"``,
``"vit:dim=64,depth=4"``) plus the data's input shape and class count into a model.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import first_line

__all__ = [
    "ACTIVATIONS",
    "CNN",
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

#: Activation names accepted by :class:`MLP` and the ``activation=`` option of ``mlp`` specs.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


# ----------------------------------------------------------------------------- validation helpers


#: Largest width, depth, channel count... a reference spec may ask for (torch's sizes are int64,
#: and no real layer comes near it; beyond it torch fails with a C++ error instead of ours).
MAX_SIZE = 2**31 - 1


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    if value > MAX_SIZE:
        raise ValueError(f"{name}={value} is too large (at most {MAX_SIZE})")
    return value


def _check_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1)")
    return float(value)


def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}={tuple(value)} must be an int or a pair (height, width)")
        return _check_int(f"{name}[0]", value[0]), _check_int(f"{name}[1]", value[1])
    v = _check_int(name, value)
    return v, v


# ----------------------------------------------------------------------------- MLP


class MLP(nn.Sequential):
    """Fully connected net ``in_features -> widths... -> num_classes`` on flattened inputs.

    Layers are named ``fc1 .. fcK`` (hidden) and ``head`` (logits); each hidden layer is followed
    by the activation (and dropout if ``dropout > 0``); the logits have no activation.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        _check_int("in_features", in_features)
        _check_int("num_classes", num_classes)
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise TypeError(f"widths must be a sequence of ints, got {type(widths).__name__}")
        widths = [_check_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")
        dropout = _check_prob("dropout", dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        prev = in_features
        for i, w in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(prev, w)
            layers[f"act{i}"] = ACTIVATIONS[activation]()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            prev = w
        layers["head"] = nn.Linear(prev, num_classes)
        super().__init__(layers)
        self.in_features = in_features
        self.widths = tuple(widths)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_sample = x[0].numel() if x.ndim > 1 else x.numel()
        if per_sample != self.in_features:
            raise ValueError(
                f"input of shape {tuple(x.shape)} has {per_sample} features per sample but the MLP "
                f"expects in_features={self.in_features}; build it for the data's input shape"
            )
        return super().forward(x)


# ----------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """Small convnet: blocks of conv3x3-batchnorm-ReLU-maxpool2, then a fully connected head.

    ``channels`` gives one block each; the spatial size halves per block (floor), so
    ``image_size // 2**len(channels)`` must stay >= 1. ``hidden=0`` puts the logits layer right
    after the features. Modules: ``features.block<i>.{conv,bn,act,pool}``, ``fc1`` (if hidden),
    ``head``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        image_size: int | tuple[int, int] = 28,
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        _check_int("hidden", hidden, minimum=0)
        dropout = _check_prob("dropout", dropout)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
            raise TypeError("channels must be a non-empty sequence of ints")
        channels = [_check_int(f"channels[{i}]", c) for i, c in enumerate(channels)]
        h, w = _pair("image_size", image_size)
        out_h, out_w = h >> len(channels), w >> len(channels)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"{len(channels)} conv blocks halve image_size=({h}, {w}) to ({out_h}, {out_w}); "
                f"each block needs the size to stay >= 1, so use at most {int(math.log2(min(h, w)))} blocks"
            )
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_channels
        for i, c in enumerate(channels, start=1):
            blocks[f"block{i}"] = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(prev, c, kernel_size=3, padding=1, bias=False),
                    bn=nn.BatchNorm2d(c),
                    act=nn.ReLU(),
                    pool=nn.MaxPool2d(2),
                )
            )
            prev = c
        self.features = nn.Sequential(blocks)
        self.flatten = nn.Flatten()
        flat = prev * out_h * out_w
        self.fc1 = nn.Linear(flat, hidden) if hidden else None
        self.act = nn.ReLU() if hidden else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden or flat, num_classes)
        self.in_channels = in_channels
        self.image_size = (h, w)
        self.channels = tuple(channels)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.features(x))
        if self.fc1 is not None:
            x = self.act(self.fc1(x))
        return self.head(self.drop(x))


# ----------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` Linear projections."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # B x N x D -> B x H x N x D/H
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """The block's MLP: ``fc1`` - GELU - dropout - ``fc2``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small vision transformer: conv patch embedding, class token, learned positions, pre-norm blocks.

    Modules: ``patch_embed`` (Conv2d, stride = patch), ``blocks.<i>.attn.{q,k,v,out}``,
    ``blocks.<i>.mlp.{fc1,fc2}``, ``norm``, ``head`` (on the class token). ``patch_size`` must
    divide ``image_size`` and ``heads`` must divide ``dim``.

    References
    ----------
    Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv:2010.11929.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        h, w = _pair("image_size", image_size)
        _check_int("patch_size", patch_size)
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        _check_int("dim", dim)
        _check_int("depth", depth)
        _check_int("heads", heads)
        dropout = _check_prob("dropout", dropout)
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"patch_size={patch_size} must divide image_size=({h}, {w}) "
                f"(the patches tile the image without overlap)"
            )
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim} (each head gets dim / heads channels)")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)):
            raise TypeError(f"mlp_ratio must be a number, got {type(mlp_ratio).__name__}")
        if not math.isfinite(mlp_ratio) or dim * mlp_ratio > MAX_SIZE:
            raise ValueError(f"mlp_ratio={mlp_ratio} must be finite with dim * mlp_ratio <= {MAX_SIZE}")
        mlp_hidden = int(round(dim * mlp_ratio))
        if mlp_hidden < 1:
            raise ValueError(
                f"mlp_ratio={mlp_ratio} gives an MLP width of {mlp_hidden}; need dim * mlp_ratio >= 1"
            )
        n_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_hidden, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.image_size = (h, w)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.mlp_ratio = float(mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B x N x D
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------- specs


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
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(r))
        for r in rows
    ]
    return "\n".join(lines)
