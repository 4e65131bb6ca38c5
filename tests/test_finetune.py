"""Masked fine-tuning: regulariser values, step counts, frozen masks, evaluation, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rmtprune.errors import RmtpruneError
from rmtprune.finetune import DivergedError, evaluate, finetune, lr_factor, regularizer
from rmtprune.masks import get_mask, set_mask


def _problem(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 2))


def test_regularizer_value():
    net = _net()
    w0, w1 = net[0].weight.detach(), net[2].weight.detach()
    expect = sum(0.1 * w.abs().sum() + 0.2 * w.pow(2).sum() + 0.3 * w.norm(dim=1).sum() for w in (w0, w1))
    got = regularizer(net, l1=0.1, l2=0.2, group_lasso=0.3)
    assert math.isclose(float(got.detach()), float(expect), rel_tol=1e-5)
    assert float(regularizer(net)) == 0.0
    with pytest.raises(ValueError, match="l1=-1"):
        regularizer(net, l1=-1)


def test_finetune_steps_masks_and_mode():
    net = _net()
    set_mask(net[0], torch.rand(net[0].weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    net.eval()
    data = _problem()
    res = finetune(net, data, epochs=2.5, lr=1e-2, l1=1e-3, l2=1e-3, group_lasso=1e-3)
    assert res.steps == 10 and res.mean_reg > 0 and math.isfinite(res.mean_loss)
    assert torch.all(net[0].weight[~get_mask(net[0])] == 0)
    assert not net.training
    assert finetune(net, data, steps=3).steps == 3
    assert finetune(net, lambda: iter(data), steps=7).steps == 7  # callable, cycled past one pass


def test_finetune_learns():
    net = _net()
    data = _problem(n=256)
    before = evaluate(net, data)
    finetune(net, data, epochs=5, lr=1e-2)
    after = evaluate(net, data)
    assert after["loss"] < before["loss"] and after["n"] == 256


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": -1}, "steps=-1"),
        ({"epochs": -1.0}, "epochs=-1"),
        ({"epochs": math.inf}, "epochs=inf"),
        ({"lr": 0.0}, "lr=0"),
        ({"lr": math.inf}, "lr=inf"),
        ({"lr": math.nan}, "lr=nan"),
        ({"lr": 1e308}, r"lr=1e\+308 must be <= 3.4e\+38, the largest float32"),
        ({"weight_decay": math.inf}, "weight_decay=inf"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        finetune(_net(), _problem(), **kwargs)


def test_empty_data():
    with pytest.raises(ValueError, match="no batches"):
        finetune(_net(), [], steps=2)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(_net(), [])


def test_lr_factor_warmup_then_cosine():
    f = lr_factor(10, "cosine", warmup=0.2)
    vals = [f(i) for i in range(10)]
    assert vals[:2] == [0.5, 1.0]  # ceil(0.2 * 10) = 2 warmup steps
    assert vals[2] == 1.0 and all(a > b for a, b in zip(vals[2:-1], vals[3:], strict=True))  # decaying
    assert 0 < vals[-1] < 0.05  # never exactly zero: the last step still moves the weights
    assert [lr_factor(5)(i) for i in range(5)] == [1.0] * 5  # default: constant, no warmup


def test_finetune_applies_schedule(monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    finetune(_net(), _problem(), steps=8, lr=1e-2, schedule="cosine", warmup=0.25)
    expected = [1e-2 * lr_factor(8, "cosine", 0.25)(i) for i in range(8)]
    assert seen == pytest.approx(expected)
    assert seen[0] < seen[1] and seen[-1] < seen[2]


@pytest.mark.parametrize(
    "kwargs, match", [({"schedule": "step"}, "schedule='step'"), ({"warmup": 1.0}, "warmup=1.0")]
)
def test_finetune_rejects_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        finetune(_net(), _problem(), steps=2, **kwargs)


def test_divergence_is_a_one_line_user_error_naming_the_step():
    net = _net()
    with pytest.raises(DivergedError) as info:
        finetune(net, _problem(), steps=6, lr=1e30)
    msg = str(info.value)
    assert isinstance(info.value, RmtpruneError) and isinstance(info.value, FloatingPointError)
    assert "\n" not in msg and "fine-tuning diverged at step" in msg and "lower the learning rate" in msg
    assert "1e+30" in msg


def test_finetune_with_another_optimizer_matches_a_plain_loop():
    """``optimizer=`` runs the same loop with, e.g., SGD: the weights equal a hand-written SGD loop's."""
    data = _problem()
    ours, ref = _net(), _net()
    finetune(ours, data, epochs=2, lr=0.05, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in data:
            loss = nn.functional.cross_entropy(ref(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer"):
        finetune(_net(), data, steps=1, optimizer=lambda ps: "sgd")
