"""A parameter budget across layers: compress(target=...), the allocations, whitened truncation, the guard."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.allocation import Candidate, allocate, direction_scores
from rmtprune.calibration import collect
from rmtprune.cli import main
from rmtprune.config import ALLOCATIONS
from rmtprune.lowrank import LowRankLinear


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(60, 150),
        nn.ReLU(),
        nn.Linear(150, 120),
        nn.ReLU(),
        nn.Linear(120, 90),
        nn.ReLU(),
        nn.Linear(90, 10),
    )
    # structured weights: a few strong directions over a noise bulk, different scales per layer
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, lin in enumerate([net[0], net[2], net[4]]):
            m, n = lin.weight.shape
            U = torch.linalg.qr(torch.randn(m, 8, generator=g))[0]
            V = torch.linalg.qr(torch.randn(n, 8, generator=g))[0]
            noise = torch.randn(m, n, generator=g) / math.sqrt(n)
            lin.weight.copy_((noise + U @ torch.diag(torch.linspace(2, 6, 8)) @ V.T) * (i + 1))
    return net


def _inputs(n: int = 12, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(60, 60, generator=g) * torch.logspace(0, -2, 60)  # correlated, anisotropic inputs
    return [torch.randn(32, 60, generator=g) @ mix.T for _ in range(n)]


def _stored(model: nn.Module, names: list[str]) -> int:
    total = 0
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, LowRankLinear):
            m, n = mod.matrix_shape
            total += mod.rank * (m + n)
        else:
            total += mod.weight.numel()
        total += 0 if mod.bias is None else mod.bias.numel()
    return total


CUT = ["0", "2", "4"]


# ---------------------------------------------------------------------------------------- allocate
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_allocate_meets_the_budget_within_one_rank_step(allocation: str, fraction: float) -> None:
    rng = np.random.default_rng(7)
    shapes = [(100, 50), (64, 64), (30, 200), (300, 300)]
    cands = [
        Candidate(f"l{i}", np.sort(rng.gamma(2, 1 + i, min(m, n)))[::-1], m, n, edge=3.0 + i, n_spikes=4)
        for i, (m, n) in enumerate(shapes)
    ]
    budget = int(fraction * sum(c.dense for c in cands))
    a = allocate(cands, budget, allocation)
    assert a.cost <= budget
    assert budget - a.cost < max(c.unit for c in cands)  # within one rank step
    for c in cands:
        sc = direction_scores(c, allocation)
        assert np.all(np.diff(sc) <= 0)  # a layer keeps a prefix of its directions


def test_uniform_allocation_is_one_ratio() -> None:
    cands = [
        Candidate(f"l{i}", np.ones(min(m, n)), m, n) for i, (m, n) in enumerate([(200, 100), (300, 300)])
    ]
    a = allocate(cands, int(0.5 * sum(c.dense for c in cands)), "uniform")
    ratios = [a.ranks[c.name] * (c.m + c.n) / c.dense for c in cands]
    assert abs(ratios[0] - ratios[1]) < 0.02


def test_rmt_allocation_follows_the_edges() -> None:
    """Two identical spectra, one layer's noise edge twice the other's: the noisier layer keeps less."""
    s = np.linspace(10, 0.1, 100)
    cands = [Candidate("quiet", s, 100, 100, edge=2.0), Candidate("noisy", s, 100, 100, edge=4.0)]
    a = allocate(cands, int(0.3 * sum(c.dense for c in cands)), "rmt")
    assert a.ranks["quiet"] > a.ranks["noisy"]
    assert s[a.ranks["quiet"] - 1] / 2.0 >= a.threshold - 1e-12


# ---------------------------------------------------------------------------------------- compress
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_compress_target_keeps_that_fraction_as_stored(allocation: str) -> None:
    net = _net()
    before = _stored(net, CUT)
    _, p = rmtprune.compress(net, target=0.5, allocation=allocation, include=CUT)
    after = _stored(net, CUT)
    assert after <= 0.5 * before and 0.5 * before - after < 150 + 120  # one rank step of the widest
    assert p.budget["after"] == after and p.budget["before"] == before
    assert p.budget["allocation"] == allocation and p.budget["truncation"] == "svd"
    assert all(lp.rule == f"target:{allocation}" for lp in p if lp.name in CUT)
    assert "budget:" in p.table()


def test_whitened_truncation_beats_plain_svd_on_the_calibration_inputs() -> None:
    """At the same ranks, truncating W S minimises the output error on the calibration data (SVD-LLM)."""
    xs = _inputs()
    dense = _net()
    errs = {}
    for cal in (None, xs):
        net = copy.deepcopy(dense)
        rmtprune.compress(net, target=0.4, allocation="uniform", include=CUT, calibration=cal)
        errs[cal is None] = [float((net[:1](x) - dense[:1](x)).norm() / dense[:1](x).norm()) for x in xs]
        ranks = [net[0].rank]
    assert np.mean(errs[False]) < 0.8 * np.mean(errs[True])
    assert ranks[0] > 0


def test_whitened_factors_are_svd_llm() -> None:
    """W' = U_k s_k V_k^T S^-1 from the SVD of W S, S the damped Cholesky factor of E[x x^T]."""
    xs = _inputs()
    net = _net()
    W = net[0].weight.detach().double().clone()
    cal = collect(net, xs, layers=["0"], held_out=0, matmul_dtype=torch.float64)
    _, p = rmtprune.compress(
        net, target=0.4, allocation="uniform", include=["0"], calibration=cal, damping=1e-3
    )
    k = p["0"].rank
    C = cal["0"].second_moment
    S = torch.linalg.cholesky(C + 1e-3 * torch.diagonal(C).mean() * torch.eye(60, dtype=torch.float64))
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    ref = (U[:, :k] * s[:k]) @ Vh[:k] @ torch.linalg.inv(S)
    got = net[0].factors()[0].double() @ net[0].factors()[1].double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert p["0"].truncation == "whitened"
    assert p["0"].decision["edge_how"].startswith("generalized-MP edge")


def test_guard_gives_rank_back_and_reports_it() -> None:
    xs = _inputs(16)
    dense = _net()
    net = copy.deepcopy(dense)
    cal = collect(net, xs, layers=CUT, held_out=0.25)
    _, free = rmtprune.compress(copy.deepcopy(dense), target=0.3, include=CUT, calibration=cal)
    errs = {lp.name: lp for lp in free if lp.name in CUT}
    assert errs
    _, p = rmtprune.compress(net, target=0.3, include=CUT, calibration=cal, guard=0.05)
    assert p.budget["after"] <= p.budget["wanted"]  # the guard moves parameters, never breaks the target
    changes = p.budget["guard_changes"]
    assert changes, "a 5% tolerance at 30% of the parameters must make the guard act"
    for g in changes:
        assert g["error"] > 0.05 and g["new_rank"] > g["rank"]
        assert "guard:" in p[g["layer"]].reason
    assert any(line.startswith("guard:") for line in p.summary_lines())


def test_guard_is_ignored_without_calibration_and_off_with_none() -> None:
    _, p = rmtprune.compress(_net(), target=0.5, include=CUT)
    assert p.budget["guard"] is None and p.budget["guard_changes"] == []
    _, p = rmtprune.compress(_net(), target=0.5, include=CUT, calibration=_inputs(), guard=None)
    assert p.budget["guard"] is None
    _, p = rmtprune.compress(_net(), target=0.5, include=CUT, calibration=_inputs())
    assert p.budget["guard"] is None  # opt-in
    _, p = rmtprune.compress(_net(), target=0.5, include=CUT, calibration=_inputs(), guard=0.2)
    assert p.budget["guard"] == 0.2  # measured on the held-out eighth of the batches


def test_budget_plan_json_round_trip_and_whitened_reapply_refused() -> None:
    net = _net()
    p = rmtprune.plan(net, rmtprune.CompressionConfig(target=0.5, include=CUT), calibration=_inputs())
    q = rmtprune.Plan.from_json(p.to_json())
    assert q.budget == json.loads(p.to_json())["budget"]
    with pytest.raises(ValueError, match="plan again with calibration"):
        rmtprune.apply(net, q)
    rmtprune.apply(net, p)  # the in-memory plan holds the factors
    assert isinstance(net[0], LowRankLinear) or isinstance(net[2], LowRankLinear)


def test_bad_budget_arguments_are_named() -> None:
    net = _net()
    with pytest.raises(ValueError, match="target or target_macs"):
        rmtprune.CompressionConfig(target=0.5, target_macs=0.5)
    with pytest.raises(ValueError, match=r"target=1.5"):
        rmtprune.CompressionConfig(target=1.5)
    with pytest.raises(ValueError, match="allocation"):
        rmtprune.CompressionConfig(allocation="magic")
    with pytest.raises(ValueError, match="needs a budget"):
        rmtprune.compress(net, calibration=_inputs())
    conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    with pytest.raises(ValueError, match="example_input"):
        rmtprune.compress(conv, target_macs=0.5)
    assert isinstance(net[0], nn.Linear)  # nothing was changed by the refused calls


def test_target_macs_counts_conv_positions() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 10),
    )
    x = torch.randn(2, 8, 8, 8)
    _, p = rmtprune.compress(conv, target_macs=0.5, example_input=x, include=["0", "2"])
    assert p.budget["of"] == "macs"
    assert p.budget["after"] <= 0.5 * p.budget["before"]
    assert p.macs_after < p.macs_before


def test_conv_calibration_whitens_patches() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 10),
    )
    xs = [torch.randn(4, 8, 8, 8) for _ in range(4)]
    ref = conv(xs[0])
    _, p = rmtprune.compress(conv, target=0.6, include=["0", "2"], calibration=xs)
    assert p.budget["truncation"] == "whitened"
    assert torch.isfinite(conv(xs[0])).all() and conv(xs[0]).shape == ref.shape


# ---------------------------------------------------------------------------------------- CLI
def test_cli_target_with_a_dataset_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    rc = main(
        [
            "compress",
            "--model",
            "mlp:64",
            "--dataset",
            "mnist",
            "--target",
            "0.5",
            "--calibration",
            "mnist",
            "--calibration-samples",
            "96",
            "--guard",
            "0.9",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "budget: rmt allocation (whitened truncation)" in text
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["budget"]["kept"] <= 0.5


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--calibration", "mnist"], "needs a budget"),
        (["--target", "0.5", "--calibration", "nowhere.txt"], "neither a dataset"),
        (["--target", "0.5", "--recover-steps", "3"], "needs --calibration"),
        (["--target", "0.5", "--calibration", "mnist", "--calibration-samples", "0"], "calibration-samples"),
    ],
)
def test_cli_bad_calibration_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], msg: str
) -> None:
    out = tmp_path / "m.safetensors"
    rc = main(["compress", "--model", "mlp:64", "--dataset", "mnist", *argv, str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_sparsify_with_calibration_is_wanda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.safetensors"
    rc = main(
        [
            "sparsify",
            "--model",
            "mlp:64",
            "--input-shape",
            "1,28,28",
            "--num-classes",
            "10",
            "--target",
            "0.6",
            "--calibration",
            "mnist",
            "--calibration-samples",
            "128",
            "--budget",
            "rmt",
            str(out),
            "--no-progress",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "within-layer score wanda" in text and "achieved=60.00%" in text


def test_plot_budget(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rmtprune.plotting import plot_budget

    xs = _inputs(16)
    _, p = rmtprune.compress(_net(), target=0.3, include=CUT, calibration=xs, guard=0.05)
    out = plot_budget(p, tmp_path / "budget.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, free = rmtprune.compress(_net(), include=CUT)
    with pytest.raises(ValueError, match="target"):
        plot_budget(free, tmp_path / "no.png")


def test_layers_reading_one_input_share_its_whitening_correctly() -> None:
    """q/k/v-style layers reuse one Cholesky factor and covariance spectrum (the plan's memo); each
    still gets SVD-LLM's factors of its own weight, and the next input gets its own factor."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(60, 40), nn.Linear(60, 40), nn.Linear(60, 40)
            self.o = nn.Linear(120, 60)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.cat([self.q(x), self.k(x), torch.tanh(self.v(x))], -1))

    torch.manual_seed(0)
    net = Attn()
    xs = _inputs()
    dense = {n: m.weight.detach().double().clone() for n, m in net.named_children()}
    cal = collect(net, xs, held_out=0, matmul_dtype=torch.float64)
    _, p = rmtprune.compress(net, target=0.5, allocation="uniform", calibration=cal, protect_last=False)
    for name in ("q", "k", "v", "o"):
        k = p[name].rank
        C = cal[name].second_moment
        lam = p.config.damping * torch.diagonal(C).mean()
        S = torch.linalg.cholesky(C + lam * torch.eye(C.shape[0], dtype=torch.float64))
        U, s, Vh = torch.linalg.svd(dense[name] @ S, full_matrices=False)
        ref = (U[:, :k] * s[:k]) @ Vh[:k] @ torch.linalg.inv(S)
        A, B = getattr(net, name).factors()
        torch.testing.assert_close((A @ B).detach().double(), ref, rtol=1e-4, atol=1e-5)
