"""rmtprune.calibration: streamed input second moments per layer, the held-out slice, whitening."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmtprune.calibration import collect, token_windows, whitening_factor


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 20),
        nn.ReLU(),
        nn.Linear(20, 5),
    )


def test_second_moments_match_a_direct_computation() -> None:
    net = _net()
    xs = [torch.randn(4, 3, 6, 6) for _ in range(8)]
    cal = collect(net, xs, held_out=0.25, matmul_dtype=torch.float64)
    assert cal.samples == 24 and cal.held_out_samples == 8
    fit_x = torch.cat(xs[:6]).double()
    cols = F.unfold(fit_x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    assert cal["0"].rows == cols.shape[0]
    torch.testing.assert_close(cal["0"].xtx, cols.T @ cols)
    h = net[:3](torch.cat(xs[:6])).double()
    torch.testing.assert_close(cal["3"].second_moment, h.T @ h / 24, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cal["3"].l2_norm, h.norm(dim=0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cal["3"].mean_abs, h.abs().mean(0), rtol=1e-9, atol=1e-9)
    h_out = net[:3](torch.cat(xs[6:])).double()
    torch.testing.assert_close(cal.held_out["3"].xtx, h_out.T @ h_out, rtol=1e-9, atol=1e-9)
    # the model's mode is restored and its weights are untouched
    assert net.training


def test_conv_rows_reproduce_the_convolution() -> None:
    """The unfolded rows times W^T are the convolution's output: the columns are in weight order."""
    conv = nn.Conv1d(4, 6, 3, padding=2, dilation=2, bias=False)
    from rmtprune.layers import handler_for

    x = torch.randn(2, 4, 11)
    rows = handler_for(conv).input_rows(conv, x)
    y = rows @ conv.weight.reshape(6, -1).T
    torch.testing.assert_close(y, conv(x).transpose(1, 2).reshape(-1, 6), rtol=1e-5, atol=1e-5)


def test_padding_rows_are_left_out() -> None:
    class Tok(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lin(self.emb(input_ids))

    m = Tok()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = (ids != 0).long()
    cal = collect(m, [{"input_ids": ids, "attention_mask": mask}], held_out=0)
    assert cal["lin"].rows == 5
    x = m.emb(ids[mask.bool()]).double()
    torch.testing.assert_close(cal["lin"].xtx, x.T @ x, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named() -> None:
    net = _net()
    with pytest.raises(ValueError, match="at least one batch"):
        collect(net, [])
    with pytest.raises(ValueError, match="held_out"):
        collect(net, [torch.randn(1, 3, 6, 6)], held_out=1.0)
    with pytest.raises(ValueError, match="'nope'"):
        collect(net, [torch.randn(1, 3, 6, 6)], layers=["nope"])
    with pytest.raises(TypeError, match="calibration batch 0"):
        collect(net, ["text"])


def test_whitening_factor_damps_a_singular_covariance() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)  # 3 rows, 6 features: rank 3
    C = x.T @ x / 3
    S, lam = whitening_factor(C, damping=1e-2)
    assert lam == pytest.approx(1e-2 * float(torch.diagonal(C).mean()))
    torch.testing.assert_close(S @ S.T, C + lam * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(S, torch.tril(S))


def test_token_windows() -> None:
    class FakeTok:
        def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) for c in text]}

    w = token_windows(FakeTok(), "abcdefghij", samples=5, seq_len=3)
    assert len(w) == 3 and w[0]["input_ids"].tolist() == [[97, 98, 99]]
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(FakeTok(), "ab", samples=1, seq_len=3)
