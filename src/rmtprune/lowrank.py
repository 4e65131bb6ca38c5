"""Factored layers: a dense ``m x n`` weight stored as ``A @ B`` with ``A`` ``m x k`` and ``B`` ``k x n``.

Each module holds two ordinary layers run one after the other, no activation in between
(METHOD.md section 6):

- :class:`LowRankLinear`: ``first = Linear(n -> k, no bias)`` (weight ``B``), then
  ``second = Linear(k -> m, bias)`` (weight ``A``).
- :class:`LowRankConv2d` / :class:`LowRankConv1d`: ``first = Conv(in -> k, same kernel, stride,
  padding, dilation, padding_mode, no bias)`` (weight ``B`` reshaped ``k x in x kh x kw``), then
  ``second = Conv(k -> out, kernel 1, bias)`` (weight ``A`` reshaped ``out x k x 1 x 1``).

The ``state_dict`` keys are therefore stable: ``first.weight``, ``second.weight`` and
``second.bias`` (when the original layer had a bias). :meth:`factors` gives ``(A, B)`` as matrices,
:meth:`to_dense` the equivalent dense layer, and :meth:`svd` the SVD of ``A @ B`` computed from QR
of the factors, at cost ``O((m + n) k**2)`` without forming the ``m x n`` product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LowRankLinear", "LowRankConv1d", "LowRankConv2d", "LowRankModule", "factored_svd"]


def factored_svd(
    A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, s, Vh`` of ``A @ B`` (``A`` ``m x k``, ``B`` ``k x n``) from QR of the factors.

    ``A = Qa Ra``, ``B^T = Qb Rb``, ``Ra Rb^T = U' S V'^T``, so ``A B = (Qa U') S (Qb V')^T``. Returns
    ``k`` triplets (``k <= min(m, n)``; with ``k > min(m, n)`` the QR is reduced to ``min(m, n)``),
    computed on the factors' device in ``dtype``.
    """
    A = A.detach().to(dtype)
    B = B.detach().to(dtype)
    Qa, Ra = torch.linalg.qr(A, mode="reduced")
    Qb, Rb = torch.linalg.qr(B.T, mode="reduced")
    Us, s, Vhs = torch.linalg.svd(Ra @ Rb.T, full_matrices=False)
    return Qa @ Us, s, Vhs @ Qb.T


class LowRankModule(nn.Module):
    """Base of the factored layers: two sub-layers ``first`` (``B``) and ``second`` (``A``)."""

    first: nn.Module
    second: nn.Module
    #: Name of the layer type this one replaced (``Linear``, ``Conv2d``, ``Conv1D`` ...), kept for
    #: the checkpoint manifest.
    original_type: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        """Number of kept singular triplets ``k``."""
        return int(self.first.weight.shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape ``(m, n)`` of the dense matrix ``A @ B`` this layer represents."""
        return int(self.second.weight.shape[0]), int(self.first.weight[0].numel())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as matrices, ``A`` ``m x k`` and ``B`` ``k x n`` (views of the parameters)."""
        A = self.second.weight.reshape(self.second.weight.shape[0], -1)
        B = self.first.weight.reshape(self.first.weight.shape[0], -1)
        return A, B

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``A @ B`` in the original layer's weight shape (forms the product)."""
        A, B = self.factors()
        return (A @ B).reshape(self._dense_weight_shape())

    def svd(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of ``A @ B`` via QR of the factors (:func:`factored_svd`)."""
        A, B = self.factors()
        return factored_svd(A, B, dtype)

    def singular_values(self) -> torch.Tensor:
        """The ``k`` singular values of ``A @ B`` (float64, descending), from QR of the factors."""
        A, B = self.factors()
        Ra = torch.linalg.qr(A.detach().to(torch.float64), mode="r")[1]
        Rb = torch.linalg.qr(B.detach().T.to(torch.float64), mode="r")[1]
        return torch.linalg.svdvals(Ra @ Rb.T)

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy matrices ``A`` (``m x k``) and ``B`` (``k x n``) into the parameters (shapes must match)."""
        with torch.no_grad():
            self.second.weight.copy_(A.reshape(self.second.weight.shape))
            self.first.weight.copy_(B.reshape(self.first.weight.shape))

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias of the layer (held by ``second``), or None."""
        return self.second.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``A @ B`` in the replaced layer's shape and layout, formed at each access.

        Read only (assigning raises), differentiable, not a parameter. It exists because model code
        reads a layer's ``.weight`` directly, most often for its dtype or device (transformers' ViT,
        CLIP and DINOv2 read their patch projection's ``weight.dtype`` in ``forward``, T5 its
        feed-forward's), and such code must keep working, with the right values if it computes
        with it. Each access costs the ``m x k x n`` product (do not read it in a hot path); the
        layer's own forward never forms it. A :class:`LowRankLinear` that replaced a layer storing
        its weight ``in x out`` (``transposed``: transformers' GPT-2 ``Conv1D``) gives that layout.
        """
        W = self.dense_weight()
        return W.T if getattr(self, "transposed", False) else W

    def _dense_weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        m, n = self.matrix_shape
        saved = 1.0 - self.rank * (m + n) / (m * n)
        return f"rank={self.rank}, matrix={m}x{n}, weight params saved={saved:.1%}"


class LowRankLinear(LowRankModule):
    """``Linear(in_features -> out_features)`` stored as ``Linear(in -> rank)`` then ``Linear(rank -> out)``.

    Parameters
    ----------
    in_features, out_features, rank : sizes; ``1 <= rank``.
    bias : whether ``second`` has a bias (the original layer's bias).
    device, dtype : of the parameters (left uninitialised-random like ``nn.Linear``).
    """

    #: True when the replaced layer stored its weight ``in x out`` (transformers' GPT-2 ``Conv1D``):
    #: :attr:`weight` then gives that layout. Set by the layer's handler when it builds this module.
    transposed: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        original_type: str = "Linear",
    ) -> None:
        super().__init__()
        _check_rank(rank)
        kw = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.original_type = original_type
        self.first = nn.Linear(self.in_features, int(rank), bias=False, **kw)
        self.second = nn.Linear(int(rank), self.out_features, bias=bias, **kw)

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None, original_type: str = "Linear"
    ) -> LowRankLinear:
        """Build from ``A`` (``m x k``) and ``B`` (``k x n``); device and dtype are those of ``A``."""
        m, k = A.shape
        layer = cls(B.shape[1], m, k, bias=bias is not None, device=A.device, dtype=A.dtype)
        layer.original_type = original_type
        layer.set_factors(A, B)
        if bias is not None:
            with torch.no_grad():
                layer.second.bias.copy_(bias)
        return layer

    def _dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same device and dtype)."""
        w = self.first.weight
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class _LowRankConvNd(LowRankModule):
    _conv: type[nn.Module]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        original_type: str | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank)
        kw = {"device": device, "dtype": dtype}
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.original_type = original_type or self._conv.__name__
        self.first = self._conv(
            self.in_channels,
            int(rank),
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            padding_mode=padding_mode,
            **kw,
        )
        self.second = self._conv(int(rank), self.out_channels, 1, bias=bias, **kw)

    @classmethod
    def from_conv(cls, conv: nn.Module, A: torch.Tensor, B: torch.Tensor) -> _LowRankConvNd:
        """Build from a conv (geometry, bias, device, dtype) and factors ``A`` ``out x k``, ``B``.

        ``conv`` is a dense ``nn.Conv1d``/``nn.Conv2d`` or a factored layer of the same kind (re-cut).
        """
        ref = next(conv.parameters())
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            A.shape[1],
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=ref.device,
            dtype=ref.dtype,
            original_type=getattr(conv, "original_type", type(conv).__name__),
        )
        layer.set_factors(A.to(ref.dtype), B.to(ref.dtype))
        if conv.bias is not None:
            with torch.no_grad():
                layer.second.bias.copy_(conv.bias)
        return layer

    # Geometry of the dense conv, read from ``first``.
    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.first.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.first.stride

    @property
    def padding(self) -> Any:
        return self.first.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.first.dilation

    @property
    def padding_mode(self) -> str:
        return self.first.padding_mode

    def _dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Module:
        """The equivalent dense conv (same geometry, device and dtype)."""
        w = self.first.weight
        dense = self._conv(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        geo = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if any(p != 0 for p in _as_tuple(self.padding)):
            geo += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            geo += f", dilation={self.dilation}"
        return geo + ", " + super().extra_repr()


class LowRankConv2d(_LowRankConvNd):
    """``Conv2d`` stored as ``Conv2d(in -> rank, same kernel/stride/padding/dilation)`` + ``Conv2d 1x1``."""

    _conv = nn.Conv2d


class LowRankConv1d(_LowRankConvNd):
    """``Conv1d`` stored as ``Conv1d(in -> rank, same kernel/stride/padding/dilation)`` + ``Conv1d k=1``."""

    _conv = nn.Conv1d


def _as_tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int")


def params_of(m: int, n: int, rank: int | None, bias: bool) -> int:
    """Parameters of an ``m x n`` layer, dense (``rank=None``) or factored at ``rank``."""
    w = m * n if rank is None else rank * (m + n)
    return w + (m if bias else 0)
