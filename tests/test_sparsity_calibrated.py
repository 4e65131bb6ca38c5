"""sparsify with calibration: Wanda's score per output row, and the layerwise allocators (uniform,
OWL, AlphaPruning, RMT) that meet the global target exactly; the report says why each layer got its share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rmtprune.calibration import collect
from rmtprune.lowrank import LowRankLinear
from rmtprune.masks import get_mask, masks_of, set_mask
from rmtprune.sparsity import (
    SparsifyConfig,
    block_of,
    esd_alpha,
    plan_sparsity,
    shifted_counts,
    sparsify,
)
from rmtprune.sparsity.scores import row_counts


def _spiked(m: int, n: int, rank: int, strength: float, seed: int) -> torch.Tensor:
    """Noise of entry std 1/sqrt(n) plus ``rank`` spikes ``strength`` times the MP edge."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / math.sqrt(n)
    if rank:
        u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
        w = w + strength * (1 + math.sqrt(m / n)) * u @ v.T
    return w


class Block(nn.Module):
    def __init__(self, d: int, rank: int, seed: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        with torch.no_grad():
            self.q.weight.copy_(_spiked(d, d, rank, 4.0, seed))
            self.up.weight.copy_(_spiked(2 * d, d, 0, 0.0, seed + 1))
            self.down.weight.copy_(_spiked(d, 2 * d, rank, 3.0, seed + 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.q(x))))


class Net(nn.Module):
    """Two transformer-like blocks (``layers.0.*``, ``layers.1.*``): block 0 spiked, block 1 noise."""

    def __init__(self, d: int = 48) -> None:
        super().__init__()
        torch.manual_seed(0)  # the biases: two Nets are the same model
        self.layers = nn.ModuleList([Block(d, 6, 0), Block(d, 0, 10)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def _batches(d: int = 48, n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Inputs whose features have very different scales, so Wanda's score differs from ``|W|``."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d, generator=g))
    return [torch.randn(16, d, generator=g) * scale for _ in range(n)]


NAMES = [f"layers.{i}.{p}" for i in range(2) for p in ("q", "up", "down")]


def _calib(model: nn.Module):
    return collect(model, _batches(), held_out=0.0)


def _pruned(model: nn.Module) -> int:
    return sum(int((~m).sum()) for m in masks_of(model).values())


def _total(model: nn.Module) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in NAMES)


# ----------------------------------------------------------------------------- config


def test_config_fields_checked_and_round_trip():
    cfg = SparsifyConfig(
        budget="rmt", score="wanda", budget_range=0.15, allocation="block", rmt_metric="spike_mass"
    )
    assert SparsifyConfig.from_json(cfg.to_json()) == cfg
    assert SparsifyConfig().score == "auto" and SparsifyConfig().budget_range is None
    for bad, match in [
        ({"score": "taylor"}, "score"),
        ({"budget_range": 1.5}, "budget_range"),
        ({"budget_range": -0.1}, "budget_range"),
        ({"allocation": "row"}, "allocation"),
        ({"rmt_metric": "entropy"}, "rmt_metric"),
        ({"outlier_m": 0}, "outlier_m"),
        ({"alpha_fit": "mle"}, "alpha_fit"),
        ({"budget": "owl2"}, "budget"),
    ]:
        with pytest.raises(ValueError, match=match):
            SparsifyConfig(**bad)


def test_block_of():
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("encoder.layer.0.attention.self.query") == "encoder.layer.0"
    assert block_of("fc1") == "fc1" and block_of("0") == "0" and block_of("features.0") == "features.0"


# ----------------------------------------------------------------------------- Wanda within a layer


def _reference_wanda(w: torch.Tensor, norm: torch.Tensor, per_row: int) -> torch.Tensor:
    """Wanda as the paper's code: per output row, the ``per_row`` smallest ``|W| * ||X||`` pruned."""
    score = w.abs().double() * norm.double()[None, :]
    drop = torch.sort(score, dim=1, stable=True).indices[:, :per_row]
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, drop, False)
    return keep


def test_uniform_wanda_is_wanda():
    model = Net()
    calib = _calib(model)
    _, report = sparsify(
        model, SparsifyConfig(target=0.5, budget="uniform", sv_sparsify=False), calibration=calib
    )
    assert report.score == "wanda" and "within-layer score wanda" in report.summary()
    for name in NAMES:  # every layer's width is even: exactly half of each row, as Wanda's code
        mod = model.get_submodule(name)
        n = mod.weight.shape[1]
        ref = _reference_wanda(mod.weight.detach(), calib[name].l2_norm, n // 2)
        assert torch.equal(get_mask(mod), ref), name
    magnitude = Net()
    sparsify(magnitude, SparsifyConfig(target=0.5, budget="uniform", sv_sparsify=False, n_cycles=1))
    assert not torch.equal(get_mask(magnitude.layers[0].up), get_mask(model.layers[0].up))


@pytest.mark.parametrize("budget", ["uniform", "owl", "alphapruning", "rmt", "signal", "global"])
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_one_shot_wanda_meets_target_exactly_and_rows_even(budget, target):
    model = Net()
    _, report = sparsify(
        model,
        SparsifyConfig(target=target, budget=budget, sv_sparsify=False, n_cycles=3),
        calibration=_calib(model),
    )
    assert _pruned(model) == round(target * _total(model))
    assert report.achieved == pytest.approx(target, abs=0.5 / _total(model))
    assert len(report.cycles) == 1  # one-shot: no data, so no cycles
    for name in NAMES:
        per_row = (~get_mask(model.get_submodule(name))).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1, name  # Wanda's per-output comparison group


def test_calibration_from_batches_equals_calibration_object():
    a, b = Net(), Net()
    cfg = SparsifyConfig(target=0.6, budget="owl", sv_sparsify=False)
    sparsify(a, cfg, calibration=_calib(a))
    sparsify(b, cfg, calibration=_batches())
    assert all(torch.equal(get_mask(a.get_submodule(n)), get_mask(b.get_submodule(n))) for n in NAMES)


def test_wanda_errors():
    model = Net()
    with pytest.raises(ValueError, match="score='wanda' needs calibration"):
        sparsify(model, SparsifyConfig(score="wanda"))
    partial = collect(model, _batches(), layers=NAMES[:3], held_out=0.0)
    with pytest.raises(ValueError, match="no statistics for layer 'layers.1.q'"):
        sparsify(model, SparsifyConfig(target=0.5), calibration=partial)
    with pytest.raises(TypeError, match="calibration must be"):
        sparsify(model, SparsifyConfig(target=0.5), calibration="data.txt")
    assert masks_of(model) == {}  # nothing changed on any error
    factored = nn.Sequential(LowRankLinear.from_factors(torch.randn(8, 4), torch.randn(4, 8), None))
    with pytest.raises(ValueError, match="factor of low-rank layer"):
        sparsify(factored, SparsifyConfig(target=0.5, sv_sparsify=False), calibration=[torch.randn(4, 8)])


def test_masks_only_grow_under_wanda():
    model = Net()
    old = torch.rand(model.layers[0].up.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.2
    set_mask(model.layers[0].up, old)
    sparsify(
        model, SparsifyConfig(target=0.6, budget="uniform", sv_sparsify=False), calibration=_calib(model)
    )
    new = get_mask(model.layers[0].up)
    assert not bool((new & ~old).any())  # everything pruned before is still pruned
    assert _pruned(model) == round(0.6 * _total(model))


def test_row_counts_water_filling():
    assert row_counts(torch.tensor([0, 0, 0]), 7, 10).tolist() == [2, 2, 2]
    assert row_counts(torch.tensor([5, 0, 0]), 9, 10).tolist() == [5, 2, 2]
    assert row_counts(torch.tensor([0, 0]), 40, 10).tolist() == [10, 10]


def test_wanda_on_a_convolution_masks_in_the_weight_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    batches = [torch.randn(2, 3, 10, 10) for _ in range(3)]
    _, report = sparsify(
        model, SparsifyConfig(target=0.5, budget="uniform", sv_sparsify=False), calibration=batches
    )
    for conv in (model[0], model[2]):
        mask = get_mask(conv)
        assert mask.shape == conv.weight.shape
        per_out = (~mask).reshape(mask.shape[0], -1).sum(1)
        assert int(per_out.max() - per_out.min()) <= 1
    assert report.achieved == pytest.approx(0.5, abs=1e-3)


def test_plan_with_calibration_is_what_sparsify_applies():
    model = Net()
    plan = plan_sparsity(
        model, SparsifyConfig(target=0.6, budget="rmt", sv_sparsify=False), calibration=_calib(model)
    )
    assert plan.score == "wanda" and plan.report().score == "wanda"
    _, report = sparsify(model, plan)
    assert [r.nnz_after for r in report.layers] == [r.nnz_after for r in plan.layers]


# ----------------------------------------------------------------------------- the allocators


def _by_layer(report) -> dict[str, float]:
    return {r.name: r.sparsity for r in report.layers}


def test_owl_gives_the_outlier_block_less_sparsity_within_lambda():
    model = Net()
    with torch.no_grad():  # a few huge weights in block 0: many scores above 5x the block's mean
        model.layers[0].up.weight[:, :3] *= 40
    cfg = SparsifyConfig(target=0.5, budget="owl", sv_sparsify=False)
    _, report = sparsify(model, cfg, calibration=_calib(model))
    s = _by_layer(report)
    blocks = [[s[n] for n in NAMES if n.startswith(f"layers.{i}.")] for i in range(2)]
    # two equal blocks: D min-max normalised to 0 and 1, so t + lam and t - lam exactly (to rounding)
    assert all(v == pytest.approx(0.5 - 0.08, abs=2e-3) for v in blocks[0])
    assert all(v == pytest.approx(0.5 + 0.08, abs=2e-3) for v in blocks[1])
    rows = {r.name: r for r in report.layers}
    assert rows["layers.0.q"].metric > rows["layers.1.q"].metric
    assert "outlier ratio D=" in rows["layers.0.q"].allocation and "why" in report.table()
    assert "why" in report.to_markdown() and report.to_dict()["layers"][0]["allocation"]


def test_owl_per_layer_and_magnitude_score():
    model = Net()
    cfg = SparsifyConfig(target=0.5, budget="owl", allocation="layer", budget_range=0.1, sv_sparsify=False)
    _, report = sparsify(model, cfg)  # no calibration: OWL's outliers of |W|, data-free
    s = _by_layer(report)
    assert report.score == "magnitude" and len({round(v, 3) for v in s.values()}) > 2
    assert max(s.values()) - min(s.values()) <= 0.2 + 1e-3
    assert _pruned(model) == round(0.5 * _total(model))


def test_esd_alpha_recovers_a_power_law():
    rng = np.random.default_rng(0)
    for alpha in (2.5, 4.0):
        x = (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # pdf ~ x**-alpha above 1
        assert esd_alpha(x, "hill") == pytest.approx(alpha, rel=0.08)
        assert esd_alpha(x, "peak") == pytest.approx(alpha, rel=0.08)
    with pytest.raises(ValueError, match="fit="):
        esd_alpha(x, "mle")
    with pytest.raises(ValueError, match="two positive"):
        esd_alpha(np.array([1.0, 0.0]))


def test_alphapruning_prunes_the_light_tailed_layer_more():
    torch.manual_seed(0)
    heavy = nn.Linear(128, 128, bias=False)
    noise = nn.Linear(128, 128, bias=False)
    with torch.no_grad():  # heavy-tailed spectrum: singular values spread over decades
        u, _ = torch.linalg.qr(torch.randn(128, 128))
        v, _ = torch.linalg.qr(torch.randn(128, 128))
        heavy.weight.copy_(u @ torch.diag(torch.logspace(1, -1, 128)) @ v.T)
        noise.weight.copy_(_spiked(128, 128, 0, 0.0, 3))
    model = nn.Sequential(heavy, noise)
    cfg = SparsifyConfig(target=0.5, budget="alphapruning", sv_sparsify=False, n_cycles=1)
    _, report = sparsify(model, cfg)
    rows = {r.name: r for r in report.layers}
    assert rows["0"].metric < rows["1"].metric  # the heavy tail has the smaller exponent
    # two layers, z = 0 and 1: ratios 0.7 and 1.3, scaled to mean 1: sparsities 0.35 and 0.65
    assert rows["0"].sparsity == pytest.approx(0.35, abs=1e-3)
    assert rows["1"].sparsity == pytest.approx(0.65, abs=1e-3)
    assert "alpha_peak=" in rows["0"].allocation


@pytest.mark.parametrize("metric", ["bulk_energy", "bulk_fraction", "spike_mass"])
def test_rmt_gives_the_noise_layer_more_sparsity(metric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 96, bias=False), nn.Linear(96, 96, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(_spiked(96, 96, 8, 4.0, 1))
        model[1].weight.copy_(_spiked(96, 96, 0, 0.0, 2))
    cfg = SparsifyConfig(
        target=0.5, budget="rmt", rmt_metric=metric, budget_range=0.2, sv_sparsify=False, n_cycles=1
    )
    _, report = sparsify(model, cfg)
    rows = {r.name: r for r in report.layers}
    assert rows["0"].verdict == rows["1"].verdict == "fit"
    assert rows["0"].sparsity == pytest.approx(0.3, abs=1e-3)  # [t - eps, t + eps]
    assert rows["1"].sparsity == pytest.approx(0.7, abs=1e-3)
    assert rows["0"].metric < rows["1"].metric and f"rmt: {metric}=" in rows["0"].allocation


def test_rmt_refused_fits_take_the_mean_and_still_count():
    model = Net()
    # Geometric spectra (0.8**k): no MP bulk, refused at any size (ks_max -> 0 is the pure test now).
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                u, s, vh = torch.linalg.svd(mod.weight, full_matrices=False)
                mod.weight.copy_(u @ torch.diag(s[0] * 0.8 ** torch.arange(s.numel())) @ vh)
    cfg = SparsifyConfig(target=0.5, budget="rmt", ks_max=1e-9, sv_sparsify=False, n_cycles=1)
    _, report = sparsify(model, cfg)  # every fit refused by the gate: each takes the (empty) mean
    assert all("no accepted fit" in r.allocation for r in report.layers)
    assert len({round(r.sparsity, 3) for r in report.layers}) == 1
    assert _pruned(model) == round(0.5 * _total(model))


def test_rmt_block_allocation_is_one_sparsity_per_block():
    model = Net()
    cfg = SparsifyConfig(target=0.5, budget="rmt", allocation="block", sv_sparsify=False)
    _, report = sparsify(model, cfg, calibration=_calib(model))
    s = _by_layer(report)
    for i in range(2):
        vals = [s[n] for n in NAMES if n.startswith(f"layers.{i}.")]
        assert max(vals) - min(vals) < 2e-3
    assert s["layers.0.q"] < 0.5 < s["layers.1.q"]  # block 0 carries the spikes
    assert _pruned(model) == round(0.5 * _total(model))


def test_layerwise_budgets_respect_caps_and_protected_layers():
    model = Net()
    cfg = SparsifyConfig(
        target=0.9,
        budget="rmt",
        budget_range=0.3,
        max_layer_sparsity=0.95,
        exclude=["layers.0.q"],
        sv_sparsify=False,
    )
    _, report = sparsify(model, cfg, calibration=_calib(model))
    assert max(r.sparsity for r in report.layers) <= 0.95 + 1e-9
    assert get_mask(model.layers[0].q) is None
    assert _pruned(model) == round(0.9 * sum(r.params for r in report.layers))


def test_shifted_counts():
    got = shifted_counts([100, 100, 200], [0, 0, 0], [95, 95, 190], [0.4, 0.6, 0.5], 200)
    assert got == [40, 60, 100]
    got = shifted_counts([100, 100], [0, 0], [60, 95], [0.2, 0.9], 120)  # cap binds: the shift fills
    assert sum(got) == 120 and got[1] == 95
    assert shifted_counts([10, 10], [3, 4], [9, 9], [0.5, 0.5], 2) == [3, 4]  # floors
    assert shifted_counts([10, 10], [0, 0], [9, 9], [0.5, 0.5], 30) == [9, 9]  # caps
