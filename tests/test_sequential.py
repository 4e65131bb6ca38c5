"""Sequential application of a calibrated plan (rmtprune.sequential): the closed-form refit per block."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.calibration import collect, whitening_factor
from rmtprune.cli import main
from rmtprune.sequential import _block_of, _group, stages
from rmtprune.surgery import _refit, apply_sequential


class _Block(nn.Module):
    def __init__(self, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        with torch.no_grad():
            for lin in (self.up, self.down):
                m, n = lin.weight.shape
                U = torch.linalg.qr(torch.randn(m, 6, generator=g))[0]
                V = torch.linalg.qr(torch.randn(n, 6, generator=g))[0]
                noise = torch.randn(m, n, generator=g) / math.sqrt(n)
                lin.weight.copy_(noise + U @ torch.diag(torch.linspace(1.5, 4, 6)) @ V.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class _Net(nn.Module):
    """A residual stack of blocks (``blocks.0.up``, ...) with a head, like a small transformer."""

    def __init__(self, d: int = 40, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(30, d)
        self.blocks = nn.ModuleList(_Block(d, g) for _ in range(depth))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _inputs(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(30, 30, generator=g) * torch.logspace(0, -1.5, 30)  # the same distribution
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 30, generator=g) @ mix.T for _ in range(n)]


def _rel_err(net: nn.Module, dense: nn.Module, xs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        num = sum(float((net(x) - dense(x)).pow(2).sum()) for x in xs)
        den = sum(float(dense(x).pow(2).sum()) for x in xs)
    return math.sqrt(num / den)


def test_stages_follow_the_blocks_in_call_order() -> None:
    net = _Net(depth=3)
    names = ["head", "blocks.1.down", "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.2.up", "inp"]
    got = stages(net, names, _inputs(1, 1))
    assert got == [
        ["inp"],
        ["blocks.0.up", "blocks.0.down"],
        ["blocks.1.up", "blocks.1.down"],
        ["blocks.2.up"],
        ["head"],
    ]


def test_the_least_squares_second_factor_is_the_whitened_one() -> None:
    """Given A = U_k sqrt(s), argmin_B tr((W - A B) C (W - A B)^T) = (A^T A)^-1 A^T W is the
    whitened truncation's own B: a one-shot least-squares update would change nothing."""
    xs = _inputs(6, 2)
    net = _Net(depth=1)
    W = net.inp.weight.detach().double().clone()
    cal = collect(net, xs, layers=["inp"], held_out=0, matmul_dtype=torch.float64)
    rmtprune.compress(net, target=0.5, allocation="uniform", include=["inp"], calibration=cal)
    A, B = (t.detach().double() for t in net.inp.factors())
    B_ls = torch.linalg.solve(A.T @ A, A.T @ W)
    torch.testing.assert_close(B, B_ls, rtol=1e-4, atol=1e-6)


def test_refit_is_the_whitened_truncation_on_the_given_moment() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 12, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -1, 12, dtype=torch.float64)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) * scale
    C = X.T @ X / 200

    class _LP:
        rank = 5

    U, s, Vh = _refit(_LP(), W, C, 1e-2)
    S, _ = whitening_factor(C, 1e-2)
    U0, s0, Vh0 = torch.linalg.svd(W @ S, full_matrices=False)
    ref = (U0[:, :5] * s0[:5]) @ Vh0[:5] @ torch.linalg.inv(S)
    torch.testing.assert_close((U * s) @ Vh, ref, rtol=1e-8, atol=1e-10)


def test_each_block_is_truncated_on_the_cut_models_inputs() -> None:
    """Block 2's first layer, cut after blocks 0-1 and ``inp``: its factors are the whitened
    truncation of its dense weight on the second moment of the inputs the *cut* model gives it."""
    dense = _Net(depth=3)
    calib = _inputs(8, 5)
    cut = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    nets, plans = {}, {}
    for seq in (False, True):
        net = copy.deepcopy(dense)
        _, plans[seq] = rmtprune.compress(net, target=0.45, include=cut, calibration=calib, sequential=seq)
        nets[seq] = net
    assert {lp.name: lp.rank for lp in plans[True]} == {lp.name: lp.rank for lp in plans[False]}
    assert plans[True].params_after == plans[False].params_after
    assert plans[True].budget["truncation"] == "whitened, sequential"
    assert plans[True]["blocks.2.up"].truncation == "whitened-sequential"
    net = nets[True]
    C = collect(net, calib, layers=["blocks.2.up"], held_out=0)["blocks.2.up"].second_moment
    k = plans[True]["blocks.2.up"].rank
    W = dense.blocks[2].up.weight.detach().double()
    S, _ = whitening_factor(C, plans[True].config.damping)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    ref = (U[:, :k] * s[:k]) @ Vh[:k] @ torch.linalg.inv(S)
    A, B = net.blocks[2].up.factors()
    torch.testing.assert_close((A @ B).double(), ref, rtol=1e-4, atol=1e-5)
    # ... which is not the one-shot truncation (its inputs changed)
    A1, B1 = nets[False].blocks[2].up.factors()
    assert float((A1 @ B1 - A @ B).norm()) > 1e-3 * float((A @ B).norm())


def test_sequential_at_a_heavy_cut_lowers_the_output_error() -> None:
    """At 30% kept, errors compound through the blocks and the refit pays (measured: 0.541 vs 0.580
    on the calibration inputs, 0.562 vs 0.593 on unseen ones; at 45-80% kept the two are within 1%)."""
    dense = _Net()
    calib, unseen = _inputs(16, 5), _inputs(8, 99)
    cut = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    nets = {}
    for seq in (False, True):
        nets[seq] = copy.deepcopy(dense)
        rmtprune.compress(nets[seq], target=0.3, include=cut, calibration=calib, sequential=seq)
    for xs in (calib, unseen):
        one, seq = _rel_err(nets[False], dense, xs), _rel_err(nets[True], dense, xs)
        assert seq < 0.97 * one, (one, seq)


def test_sequential_conv_and_padding_masks() -> None:
    """Convolution rows (unfolded patches) pair up between the dense and the cut model."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 4),
    )
    dense = copy.deepcopy(net)
    xs = [torch.randn(4, 3, 8, 8) for _ in range(6)]
    rmtprune.compress(net, target=0.6, include=["0", "2"], calibration=xs, sequential=True)
    assert _rel_err(net, dense, xs) < 1.0


def test_errors_are_named_and_the_model_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _Net(depth=2)
    xs = _inputs(4, 1)
    net = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="needs the calibration batches themselves"):
        rmtprune.compress(net, target=0.5, sequential=True)
    with pytest.raises(ValueError, match="not a collected Calibration"):
        rmtprune.compress(net, target=0.5, sequential=True, calibration=collect(net, xs))
    with pytest.raises(ValueError, match="as a list, not a generator"):
        rmtprune.compress(net, target=0.5, sequential=True, calibration=(x for x in xs))
    p = rmtprune.plan(net, rmtprune.CompressionConfig(target=0.5))
    with pytest.raises(ValueError, match="needs a plan made with calibration data"):
        apply_sequential(net, p, xs)
    # a failure half way puts every layer back
    import rmtprune.surgery as seq

    calls = {"n": 0}
    real = seq._refit

    def failing(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(seq, "_refit", failing)
    with pytest.raises(RuntimeError, match="boom"):
        rmtprune.compress(net, target=0.5, sequential=True, calibration=xs)
    assert not rmtprune.is_compressed(net)
    for (n1, p1), (_, p2) in zip(net.state_dict().items(), dense.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    # ... and a plan whose sequential application failed half way can still be applied one-shot
    calls["n"] = 0
    p = rmtprune.plan(net, rmtprune.CompressionConfig(target=0.5), calibration=xs, keep_svd=True)
    with pytest.raises(RuntimeError, match="boom"):
        apply_sequential(net, p, xs)
    assert not p.applied and all(lp.truncation == "whitened" for lp in p if lp.changes)
    rmtprune.apply(net, p)
    assert rmtprune.is_compressed(net)
    for bad in (-0.5, 1.5, True, "x"):
        q = rmtprune.plan(dense, rmtprune.CompressionConfig(target=0.5), calibration=xs, keep_svd=True)
        with pytest.raises(ValueError, match="held_out"):
            apply_sequential(copy.deepcopy(dense), q, xs, held_out=bad)


def test_config_round_trip_and_bad_value() -> None:
    cfg = rmtprune.CompressionConfig(target=0.5, sequential=True)
    assert rmtprune.CompressionConfig(**json.loads(json.dumps(cfg.to_dict()))).sequential is True
    with pytest.raises((TypeError, ValueError), match="sequential"):
        rmtprune.CompressionConfig(sequential="yes")


def test_cli_sequential(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    base = ["compress", "--model", "mlp:64", "--dataset", "mnist", "--target", "0.5", "--no-progress"]
    rc = main([*base, "--sequential", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--sequential needs --calibration" in err and not list(tmp_path.iterdir())
    rc = main([*base, "--sequential", "--calibration", "mnist", "--calibration-samples", "96", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["budget"]["truncation"] == "whitened, sequential"
    assert report["config"]["sequential"] is True


def test_block_names_and_interleaved_blocks() -> None:
    assert _block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert _block_of("0.2") == "0" and _block_of("net.0") == "net.0" and _block_of("head") == "head"
    # a block interrupted by another block's layer is split there (each stage after all before it)
    assert _group(["enc.0.a", "dec.0.b", "enc.0.c"]) == [["enc.0.a"], ["dec.0.b"], ["enc.0.c"]]


def test_train_mode_is_kept_and_the_replacements_follow_it() -> None:
    net = _Net(depth=2)
    net.train()
    rmtprune.compress(net, target=0.5, calibration=_inputs(4, 1), sequential=True)
    assert rmtprune.is_compressed(net)
    assert all(m.training for m in net.modules())


def test_a_layer_some_batches_skip_is_measured_on_the_others() -> None:
    """A data-dependent branch (an MoE expert, say) that the first batches do not reach."""

    class Cond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.ModuleList([nn.Linear(16, 32), nn.Linear(16, 32)])
            self.out = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.a[1](x) if x.shape[0] > 16 else self.a[0](x))

    batches = [torch.randn(8, 16) for _ in range(4)] + [torch.randn(32, 16) for _ in range(4)]
    for seq in (False, True):
        net = Cond()
        _, p = rmtprune.compress(net, target=0.6, calibration=batches, sequential=seq)
        assert p.budget["kept"] <= 0.6


def test_apply_warns_when_the_config_asks_for_sequential() -> None:
    net = _Net(depth=1)
    p = rmtprune.plan(net, rmtprune.CompressionConfig(target=0.5, sequential=True), calibration=_inputs(4, 1))
    with pytest.warns(UserWarning, match="apply_sequential"):
        rmtprune.apply(net, p)
