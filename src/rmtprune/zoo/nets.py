"""The reference networks of the experiments: an MLP, a small CNN and a small ViT.

Every weight that rmtprune may factor is a plain ``nn.Linear`` or ``nn.Conv2d`` called as a
sub-module (never through its ``.weight`` in ``forward``), so :mod:`rmtprune.surgery` can swap it
for a low-rank factorisation and the model keeps working. No model puts an activation on its
logits (METHOD.md section 7: the 2023 baseline did, and one class died). :mod:`.models` builds
them from spec strings.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int, check_number

__all__ = ["ACTIVATIONS", "CNN", "MAX_SIZE", "MLP", "ViT"]

#: Activation names accepted by :class:`MLP` and the ``activation=`` option of ``mlp`` specs.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


#: Largest width, depth, channel count... a reference spec may ask for (torch's sizes are int64,
#: and no real layer comes near it; beyond it torch fails with a C++ error instead of ours).
MAX_SIZE = 2**31 - 1


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    return check_int(name, value, minimum, MAX_SIZE)


def _check_prob(name: str, value: Any) -> float:
    return check_number(name, value, 0.0, 1.0, hi_open=True)


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
        check_number("mlp_ratio", mlp_ratio, allow_inf=True)  # the type; the range is checked below
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
