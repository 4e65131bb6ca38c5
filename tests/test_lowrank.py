"""Factored layers: exactness at full rank, the Frobenius tail at rank k, QR re-cut, keys, repr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmtprune.lowrank import LowRankConv1d, LowRankConv2d, LowRankLinear, factored_svd

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _factors(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    r = s[:k].sqrt()
    return (U[:, :k] * r).to(W.dtype), (r[:, None] * Vh[:k]).to(W.dtype), s


def _build(kind: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(24, 16, dtype=dtype), torch.randn(5, 24, generator=g, dtype=dtype)
    elif kind == "conv1d":
        layer = nn.Conv1d(6, 12, 3, stride=2, padding=2, dilation=2, dtype=dtype)
        x = torch.randn(2, 6, 19, generator=g, dtype=dtype)
    elif kind == "conv2d":
        layer = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), dtype=dtype)
        x = torch.randn(2, 3, 11, 13, generator=g, dtype=dtype)
    elif kind == "conv2d-reflect-nobias":
        layer = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False, dtype=dtype)
        x = torch.randn(2, 4, 7, 7, generator=g, dtype=dtype)
    elif kind == "conv2d-same":
        layer = nn.Conv2d(4, 6, 3, padding="same", dtype=dtype)
        x = torch.randn(1, 4, 6, 9, generator=g, dtype=dtype)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return layer, x


def _lowrank(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return LowRankLinear.from_factors(A, B, layer.bias)
    cls = LowRankConv2d if isinstance(layer, nn.Conv2d) else LowRankConv1d
    return cls.from_conv(layer, A, B)


KINDS = ["linear", "conv1d", "conv2d", "conv2d-reflect-nobias", "conv2d-same"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_reproduces_dense_output(kind: str, dtype: torch.dtype) -> None:
    layer, x = _build(kind, dtype)
    W = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    A, B, _ = _factors(W, min(W.shape))
    lr = _lowrank(layer, A, B)
    assert lr.first.weight.dtype == dtype and lr.second.weight.dtype == dtype
    with torch.no_grad():
        y, y_lr = layer(x), lr(x)
    assert y.shape == y_lr.shape
    scale = y.abs().max().item()
    assert (y - y_lr).abs().max().item() <= TOL[dtype] * max(scale, 1.0)
    dense = lr.to_dense()
    assert type(dense) is type(layer)
    with torch.no_grad():
        assert (dense(x) - y).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_rank_k_weight_error_is_frobenius_tail(kind: str, k: int) -> None:
    layer, _ = _build(kind, torch.float64)
    W = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    A, B, s = _factors(W, k)
    lr = _lowrank(layer, A, B)
    assert lr.rank == k
    err = torch.linalg.matrix_norm(lr.dense_weight().reshape(W.shape) - W).item()
    tail = s[k:].square().sum().sqrt().item()
    assert err == pytest.approx(tail, rel=1e-9)


@pytest.mark.parametrize(("m", "n", "k"), [(40, 30, 5), (30, 40, 30), (8, 50, 8), (50, 8, 3)])
def test_factored_svd_matches_svd_of_product(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(m, k, generator=g, dtype=torch.float64)
    B = torch.randn(k, n, generator=g, dtype=torch.float64)
    U, s, Vh = factored_svd(A, B)
    s_ref = torch.linalg.svdvals(A @ B)[:k]
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose((U * s) @ Vh, A @ B, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    lr = LowRankLinear.from_factors(A, B)
    assert torch.allclose(lr.singular_values(), s_ref, rtol=1e-10, atol=1e-10)


def test_state_dict_keys_are_stable() -> None:
    assert set(LowRankLinear(8, 4, 2).state_dict()) == {"first.weight", "second.weight", "second.bias"}
    assert set(LowRankConv2d(3, 4, 2, 3, bias=False).state_dict()) == {"first.weight", "second.weight"}
    conv = LowRankConv1d(3, 5, 2, 3)
    assert conv.first.weight.shape == (2, 3, 3) and conv.second.weight.shape == (5, 2, 1)


def test_geometry_repr_and_shapes() -> None:
    lr = LowRankConv2d(3, 8, 2, (3, 5), stride=2, padding=1, dilation=(1, 2))
    assert lr.kernel_size == (3, 5) and lr.stride == (2, 2) and lr.dilation == (1, 2)
    assert lr.matrix_shape == (8, 45)
    assert lr.original_type == "Conv2d"
    text = repr(lr)
    assert "rank=2" in text and "matrix=8x45" in text and "dilation=(1, 2)" in text
    assert "rank=4" in repr(LowRankLinear(10, 6, 4))


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_rank_raises(rank: object) -> None:
    with pytest.raises(ValueError, match="rank="):
        LowRankLinear(4, 4, rank)  # type: ignore[arg-type]


def test_backward_reaches_both_factors() -> None:
    lr = LowRankLinear(6, 4, 2)
    lr(torch.randn(3, 6)).sum().backward()
    assert lr.first.weight.grad is not None and lr.second.weight.grad is not None
