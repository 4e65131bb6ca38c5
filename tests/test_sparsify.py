"""sparsify(): config, the singular-vector step, budgets that meet the target exactly, masks, report."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import rmtprune.sparsity.core as core
from rmtprune.analysis import analyze_tensor
from rmtprune.errors import InvalidWeightsError
from rmtprune.finetune import DivergedError
from rmtprune.masks import count_nonzeros, get_mask, masks_of, set_mask
from rmtprune.sparse_format import encode_state_dict, stored_bytes, stored_nonzeros
from rmtprune.sparsity import (
    SparsifyConfig,
    SparsityPlan,
    budget_names,
    plan_sparsity,
    proportional_counts,
    singular_vector_thresholds,
    sparsify,
    sparsify_singular_vectors,
    threshold_counts,
)


def _spiked(m: int, n: int, rank: int, strength: float, seed: int) -> torch.Tensor:
    """Noise of entry std 1/sqrt(n) plus ``rank`` spikes of singular value ``strength * s_edge``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, n, generator=g) / math.sqrt(n)
    if rank == 0:
        return noise
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    edge = 1 + math.sqrt(m / n)
    return noise + strength * edge * u @ v.T


class Tiny(nn.Module):
    """Two fittable 64-wide layers (one pure noise, one with strong spikes) and an 8-wide head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.noise = nn.Linear(48, 64)
        self.signal = nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)
        with torch.no_grad():
            self.noise.weight.copy_(_spiked(64, 48, 0, 0.0, seed))
            self.signal.weight.copy_(_spiked(64, 64, 4, 4.0, seed + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.signal(torch.relu(self.noise(x)))))


def _data(n: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 48, generator=g)
    y = (x[:, :8].argmax(dim=1)).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _pruned(model: nn.Module) -> int:
    return sum(int((~m).sum()) for m in masks_of(model).values())


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip():
    cfg = SparsifyConfig(target=0.3, budget="bulk", include=["signal"], exclude=["head"], theta=2.0)
    assert SparsifyConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["c_min"] == pytest.approx(1 / 750)
    assert SparsifyConfig().q == 30.0
    with pytest.raises(ValueError, match="unknown SparsifyConfig field"):
        SparsifyConfig.from_dict({"target": 0.5, "targte": 0.1})


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"target": 1.0}, ValueError, r"target=1.0 must be in \[0, 1\)"),
        ({"target": -0.1}, ValueError, "target=-0.1"),
        ({"target": float("nan")}, ValueError, "target=nan"),
        ({"target": True}, TypeError, "target=True must be a number"),
        ({"target": "0.5"}, TypeError, "target='0.5' must be a number"),
        ({"budget": "random"}, ValueError, "budget='random'"),
        ({"n_cycles": 0}, ValueError, "n_cycles=0"),
        ({"theta": -1.0}, ValueError, "theta=-1.0"),
        ({"q": 0}, ValueError, "q=0"),
        ({"include": [""]}, TypeError, "non-empty pattern"),
        ({"storage": "coo"}, ValueError, "storage='coo'"),
        ({"refit": 1}, TypeError, "refit=1 must be a bool"),
        ({"schedule": "linear"}, ValueError, "schedule='linear'"),
        ({"warmup": 1.0}, ValueError, r"warmup=1.0 must be in \[0, 1\)"),
        ({"lr": float("inf")}, ValueError, r"lr=inf must be in \(0, inf\)"),
        ({"lr": float("nan")}, ValueError, "lr=nan"),
        ({"lr": 0.0}, ValueError, "lr=0.0"),
        ({"finetune_epochs": float("inf")}, ValueError, "finetune_epochs=inf"),
        ({"theta": float("inf")}, ValueError, "theta=inf"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparsifyConfig(**kwargs)


def test_sparsify_rechecks_a_mutated_config():
    cfg = SparsifyConfig()
    cfg.target = 1.5
    with pytest.raises(ValueError, match="target=1.5"):
        sparsify(Tiny(), cfg)


# ----------------------------------------------------------------------------- step 1


@pytest.mark.parametrize(
    "s,s_plus,theta,c_min,q,expected",
    [
        ([0.0], 1.0, 2.0, 1 / 750, 30, [2.0]),  # deep bulk: full threshold
        ([2.0], 1.0, 2.0, 1 / 750, 30, [2.0 / 750]),  # spike: the floor
        ([0.5], 1.0, 1.0, 0.0, 2, [0.25]),
        ([0.9], 1.0, 1.0, 1 / 750, 30, [1 / 750]),  # 0.1**30 is far below the floor
        ([0.1], 1.0, 1.0, 0.0, 30, [0.9**30]),
    ],
)
def test_threshold_formula(s, s_plus, theta, c_min, q, expected):
    got = singular_vector_thresholds(np.array(s), s_plus, theta, c_min, q)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_threshold_rejects_bad_edge():
    with pytest.raises(ValueError, match="s_plus=0"):
        singular_vector_thresholds([1.0], 0.0, 1.0)


def test_singular_vector_step_spares_spikes():
    w = _spiked(96, 64, 3, 5.0, seed=3)
    fit = analyze_tensor("w", w)
    new, info = sparsify_singular_vectors(w, fit.fit.s_plus, theta=1.0)
    assert new.shape == w.shape and new.dtype == w.dtype
    assert 0 < info["zeroed_u"] < 1 and 0 < info["rel_change"] < 0.5
    s_old = torch.linalg.svdvals(w.double())[:3]
    s_new = torch.linalg.svdvals(new.double())[:3]
    torch.testing.assert_close(s_new, s_old, rtol=0.02, atol=0)
    same, info0 = sparsify_singular_vectors(w, fit.fit.s_plus, theta=0.0)
    torch.testing.assert_close(same, w, rtol=0, atol=1e-5)
    assert info0["zeroed_u"] == 0.0


def test_singular_vector_step_on_conv_weight():
    w = torch.randn(16, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    new, info = sparsify_singular_vectors(w, s_plus=100.0, theta=1.0, q=1.0)
    assert new.shape == w.shape and new.dtype == torch.float64 and info["zeroed_v"] > 0


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "numels,floors,caps,weights,total",
    [
        ([100, 200, 300], [0, 0, 0], [95, 190, 285], [1, 1, 1], 300),
        ([100, 200, 300], [0, 0, 0], [95, 190, 285], [0.9, 0.1, 0.5], 333),
        ([100, 200, 300], [40, 0, 0], [95, 190, 285], [0.1, 1, 1], 101),
        ([7, 13, 29], [0, 0, 0], [7, 13, 29], [0.3, 0.7, 1.0], 17),
        ([64] * 5, [0] * 5, [60] * 5, [1, 2, 3, 4, 5], 250),
    ],
)
def test_proportional_counts_meet_total_exactly(numels, floors, caps, weights, total):
    got = proportional_counts(numels, floors, caps, weights, total)
    assert sum(got) == total
    assert all(f <= k <= c for k, f, c in zip(got, floors, caps, strict=True))


def test_proportional_counts_follow_weights_and_saturate():
    got = proportional_counts([100, 100], [0, 0], [90, 90], [1.0, 0.5], 90)
    assert got == [60, 30]
    assert proportional_counts([100, 100], [0, 0], [90, 90], [1.0, 0.0], 150) == [90, 0]
    assert proportional_counts([100, 100], [30, 0], [90, 90], [1.0, 1.0], 10) == [30, 0]


def test_threshold_counts_global_and_capped():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert threshold_counts([a, b], [4, 4], 5) == [4, 1]
    assert threshold_counts([a, b], [2, 4], 5) == [2, 3]
    c = torch.tensor([-math.inf, 5.0])
    assert threshold_counts([c, b], [2, 4], 1) == [1, 0]


# ----------------------------------------------------------------------------- sparsify end to end


@pytest.mark.parametrize("budget", ["energy", "signal", "noise", "bulk", "global", "uniform"])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5])
def test_target_is_met_exactly(budget, target):
    model = Tiny()
    selected = sum(m.weight.numel() for m in (model.noise, model.signal, model.head))
    _, report = sparsify(model, SparsifyConfig(target=target, budget=budget))
    assert _pruned(model) == round(target * selected)
    assert report.selected_params == selected
    assert report.achieved == pytest.approx(round(target * selected) / selected)
    for mod in (model.noise, model.signal, model.head):
        mask = get_mask(mod)
        if mask is not None:
            assert torch.all(mod.weight[~mask] == 0)
    assert report.stored_values == count_nonzeros(model)["stored"]


def test_layers_without_fit_are_left_dense_and_reported():
    model = Tiny()
    _, report = sparsify(model, SparsifyConfig(target=0.4))
    head = next(r for r in report.layers if r.name == "head")
    assert head.verdict == "too-small" and head.kind == "dense" and head.nnz_after == head.params
    assert "left dense" in head.reason
    assert any("left dense" in w and "head" in w for w in report.warnings)
    _, report = sparsify(Tiny(), SparsifyConfig(target=0.4, budget="global", sv_sparsify=False))
    assert next(r for r in report.layers if r.name == "head").verdict == "not-fitted"


@pytest.mark.parametrize("budget", ["noise", "energy"])
def test_rmt_budgets_prune_the_noisy_layer_harder(budget):
    model = Tiny()
    _, report = sparsify(model, SparsifyConfig(target=0.4, budget=budget, sv_sparsify=False))
    by = {r.name: r for r in report.layers}
    assert by["noise"].n_spikes == 0 and by["signal"].n_spikes >= 4
    assert by["noise"].sparsity > by["signal"].sparsity + 0.1


def test_signal_budget_prunes_the_spiky_layer_harder_than_global():
    # Same model, same target: "signal" moves pruning onto the layer with strong spikes and
    # away from the pure-noise one, i.e. the opposite way from "energy".
    runs = {}
    for budget in ("global", "signal", "energy"):
        _, report = sparsify(Tiny(), SparsifyConfig(target=0.4, budget=budget, sv_sparsify=False))
        runs[budget] = {r.name: r.sparsity for r in report.layers}
    assert runs["signal"]["signal"] > runs["global"]["signal"] + 0.05
    assert runs["signal"]["noise"] < runs["global"]["noise"] - 0.05
    assert runs["energy"]["signal"] < runs["global"]["signal"] < runs["signal"]["signal"]


@pytest.mark.parametrize("budget", ["energy", "signal"])
def test_energy_budget_is_global_magnitude_on_pure_noise(budget):
    torch.manual_seed(0)
    layers = [nn.Linear(64, 96), nn.Linear(96, 64)]
    with torch.no_grad():
        layers[1].weight.mul_(0.5)  # smaller scale: global magnitude prunes it harder
    a = nn.Sequential(*layers)
    b = copy.deepcopy(a)
    _, ra = sparsify(a, SparsifyConfig(target=0.5, budget=budget, sv_sparsify=False))
    _, rb = sparsify(b, SparsifyConfig(target=0.5, budget="global", sv_sparsify=False))
    got = [r.sparsity for r in ra.layers]
    assert got[1] > got[0] + 0.2
    assert got == pytest.approx([r.sparsity for r in rb.layers], abs=0.03)


def test_bulk_budget_follows_bulk_fraction():
    model = Tiny()
    _, report = sparsify(model, SparsifyConfig(target=0.4, budget="bulk", budget_power=4.0))
    by = {r.name: r for r in report.layers}
    assert by["noise"].sparsity >= by["signal"].sparsity


def test_resparsify_grows_masks():
    model = Tiny()
    sparsify(model, SparsifyConfig(target=0.3, budget="global"))
    first = {k: v.clone() for k, v in masks_of(model).items()}
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="global"))
    for key, old in first.items():
        new = masks_of(model)[key]
        assert not torch.any(new & ~old)  # the kept set only shrinks: masks grow
    assert report.achieved == pytest.approx(0.5, abs=1e-4)
    assert all(r.nnz_before <= r.params for r in report.layers)
    # asking for less than is already pruned keeps the masks and says so
    _, report = sparsify(model, SparsifyConfig(target=0.2, budget="global"))
    assert report.achieved == pytest.approx(0.5, abs=1e-4)
    assert any("already sparser" in w for w in report.warnings)


def test_mixed_dtypes_are_handled_per_layer():
    model = Tiny()
    model.signal.double()
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="noise"))
    by = {r.name: r for r in report.layers}
    assert by["signal"].dtype == "float64" and by["noise"].dtype == "float32"
    assert model.signal.weight.dtype == torch.float64 and by["signal"].sparsity > 0


def test_nan_weights_raise_and_leave_model_untouched():
    model = Tiny()
    with torch.no_grad():
        model.signal.weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="'signal'"):
        sparsify(model, SparsifyConfig())


def test_failure_half_way_restores_weights_and_masks(monkeypatch):
    model = Tiny()
    mask = torch.rand(model.noise.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.9
    set_mask(model.noise, mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def boom(weight, old, k):
        calls.append(k)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return orig(weight, old, k)

    orig = core._magnitude_mask
    monkeypatch.setattr(core, "_magnitude_mask", boom)
    with pytest.raises(RuntimeError, match="boom"):
        sparsify(model, SparsifyConfig(target=0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(masks_of(model)) == ["noise.weight"] and torch.equal(get_mask(model.noise), mask)


def test_include_exclude_and_nothing_selected():
    model = Tiny()
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="uniform", exclude=["head"]))
    assert [r.name for r in report.layers] == ["noise", "signal"]
    assert get_mask(model.head) is None
    with pytest.raises(ValueError, match="no prunable layer"):
        sparsify(Tiny(), SparsifyConfig(include=["nothing"]))
    with pytest.raises(TypeError, match="SparsifyConfig"):
        sparsify(Tiny(), {"target": 0.5})


def test_conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=4), nn.Flatten())
    _, report = sparsify(model, SparsifyConfig(target=0.5))
    by = {r.name: r for r in report.layers}
    assert by["0"].verdict == "fit" and by["2"].verdict == "grouped"
    assert by["2"].kind == "dense"
    model(torch.randn(1, 3, 8, 8))


def test_with_data_finetunes_with_frozen_masks():
    model = Tiny()
    data = _data()
    cfg = SparsifyConfig(
        target=0.5, n_cycles=2, cycle_steps=3, finetune_epochs=1.0, lr=1e-3, group_lasso=1e-4
    )
    _, report = sparsify(model, cfg, data=data, eval_data=data)
    assert [c["finetune"]["steps"] for c in report.cycles] == [3, 3]
    assert [c["target"] for c in report.cycles] == [0.25, 0.5]
    assert report.final_finetune["steps"] == len(data)
    assert report.eval_before is not None and 0 <= report.eval_after["accuracy"] <= 1
    for mod in (model.noise, model.signal):
        assert torch.all(mod.weight[~get_mask(mod)] == 0)
    md = report.to_markdown()
    assert "## Cycles" in md and "| 2 | 50.0% |" in md


def test_plan_leaves_model_untouched_and_matches_target():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = plan_sparsity(model, SparsifyConfig(target=0.5))
    assert report.dry_run and not masks_of(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.selected_params - report.selected_nnz == round(0.5 * report.selected_params)


def test_report_serialises():
    _, report = sparsify(Tiny(), SparsifyConfig(target=0.3))
    data = json.loads(report.to_json())
    assert data["budget"] == "signal" and len(data["layers"]) == 3
    assert data["layers"][0]["sparsity"] == pytest.approx(report.layers[0].sparsity)
    assert "noise" in report.table() and report.summary().startswith("budget=signal")


# ----------------------------------------------------------------------------- stored counts


def _written(model: nn.Module, fmt: str) -> tuple[dict, dict, dict[str, int], int]:
    """What the file format writes for ``model``: tensors, manifest, bytes per state-dict key, index bytes."""
    tensors, manifest = encode_state_dict(model.state_dict(), masks_of(model), fmt)
    per_key: dict[str, int] = {}
    index = 0
    for name, t in tensors.items():
        key, _, part = name.partition("@")
        per_key[key] = per_key.get(key, 0) + t.numel() * t.element_size()
        index += t.numel() * t.element_size() if part not in ("", "values") else 0
    return tensors, manifest, per_key, index


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "auto"])
@pytest.mark.parametrize("target", [0.5, 0.97])
def test_stored_bytes_are_what_the_file_format_writes(fmt, target):
    model = Tiny()
    _, report = sparsify(model, SparsifyConfig(target=target, budget="global", storage=fmt))
    tensors, manifest, per_key, index = _written(model, fmt)
    assert report.storage == fmt
    assert report.stored_bytes == stored_bytes(tensors)
    assert report.index_bytes == index > 0
    assert report.dense_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert report.stored_equiv == pytest.approx(report.stored_bytes / 4)  # float32: 4 bytes a value
    # stored_values keeps its meaning: values only, no index
    assert report.stored_values == stored_nonzeros(model.state_dict(), masks_of(model))
    assert report.stored_equiv > report.stored_values
    for r in report.layers:
        key = f"{r.name}.weight"
        assert r.storage == manifest[key]["format"]
        assert r.stored_bytes == per_key[key] and r.index_bytes == per_key[key] - 4 * r.nnz_after
        assert r.stored_equiv == pytest.approx(r.stored_bytes / 4)
    if fmt == "auto":  # per tensor, the smaller of the two patterns
        bitmask, csr = _written(model, "bitmask")[2], _written(model, "csr")[2]
        assert report.stored_bytes == sum(min(bitmask[k], csr[k]) for k in bitmask)
        formats = {r.storage for r in report.layers}
        assert formats == ({"bitmask"} if target == 0.5 else {"bitmask", "csr"})  # 0.97: layers differ


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "auto"])
def test_plan_counts_the_bytes_its_run_stores(fmt):
    cfg = SparsifyConfig(target=0.6, budget="signal", sv_sparsify=False, storage=fmt)
    model = Tiny()
    planned = plan_sparsity(model, cfg).report()
    _, done = sparsify(model, cfg)
    for name in ("stored_bytes", "index_bytes", "dense_bytes", "stored_equiv", "stored_values"):
        assert getattr(planned, name) == getattr(done, name), name
    assert [(r.storage, r.stored_bytes) for r in planned.layers] == [
        (r.storage, r.stored_bytes) for r in done.layers
    ]
    head = next(r for r in done.layers if r.name == "head")  # too small to fit: left dense, unmasked
    assert (head.storage, head.index_bytes, head.stored_bytes) == ("dense", 0, 4 * 8 * 64)
    assert done.stored_bytes == stored_bytes(_written(model, fmt)[0])


def test_report_says_which_count_is_which():
    _, report = sparsify(Tiny(), SparsifyConfig(target=0.5))
    data = json.loads(report.to_json())
    assert {"stored_values", "total_params", "selected_nnz"} <= set(data)  # the old keys stay
    assert {"stored_bytes", "index_bytes", "dense_bytes", "stored_equiv", "storage", "counts"} <= set(data)
    assert {"nnz_after", "storage", "index_bytes", "stored_bytes", "stored_equiv"} <= set(data["layers"][0])
    text = report.summary()
    assert f"nonzero values {report.stored_values:,} of {report.total_params:,} parameters" in text
    assert (
        f"stored incl. index bytes (auto): {report.stored_equiv:,.0f} parameter-equivalents, "
        f"{report.stored_bytes:,} bytes ({report.index_bytes:,} of them index)"
    ) in text
    assert "nonzero values" in report.table() and "stored incl. index" in report.table()
    assert "Counts: nonzero values: the entries kept" in report.to_markdown()
    assert report.saved_bytes == pytest.approx(1 - report.stored_bytes / report.dense_bytes)
    assert report.saved_bytes < report.saved  # the index costs


# ----------------------------------------------------------------------------- low rank + sparse


class Wide(nn.Module):
    """One 150x200 layer (noise + 4 spikes) worth factoring, and a small head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(200, 150)
        self.head = nn.Linear(150, 10)
        with torch.no_grad():
            self.fc.weight.copy_(_spiked(150, 200, 4, 4.0, seed=7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def test_factored_then_sparse_composes():
    from rmtprune.lowrank import LowRankLinear
    from rmtprune.surgery import compress

    model, _ = compress(Wide(), keep_bulk=0.5)
    assert isinstance(model.fc, LowRankLinear)
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0))
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="noise"))
    by = {r.name: r for r in report.layers}
    for name in ("fc.first", "fc.second"):
        assert by[name].kind == "factored+sparse" and by[name].verdict == "fit"
        assert "factor of low-rank layer 'fc'" in by[name].reason
        assert by[name].sv_zeroed_u is not None and by[name].sparsity > 0
    assert _pruned(model) == round(0.5 * report.selected_params)
    assert torch.isfinite(model(x)).all()
    assert "factored+sparse" in report.table()


def test_spikes_only_factors_are_left_dense():
    from rmtprune.surgery import compress

    model, _ = compress(Wide(), keep_bulk=0.0)
    _, report = sparsify(model, SparsifyConfig(target=0.3))
    by = {r.name: r for r in report.layers}
    assert by["fc.first"].verdict in ("spikes-only", "no-mp-bulk") and by["fc.first"].kind == "factored"
    assert "left dense" in by["fc.first"].reason
    # A fresh copy: whether the call above sparsified the small head (p = 10, its fit judged by the
    # size-calibrated gate, its weights drawn from the global RNG) must not move the global threshold.
    model, _ = compress(Wide(), keep_bulk=0.0)
    _, report = sparsify(model, SparsifyConfig(target=0.3, budget="global", sv_sparsify=False))
    assert {r.name: r for r in report.layers}["fc.first"].kind == "factored+sparse"


# ----------------------------------------------------------------------------- numeric edge cases


def test_lr_beyond_float32_is_refused_before_any_work():
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"lr=1e\+308 must be <= 3.4e\+38"):
        sparsify(
            model, SparsifyConfig(target=0.5, lr=1e308, cycle_steps=2), data=_data(), show_progress=False
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not masks_of(model)


def test_divergence_restores_the_model_and_names_the_step():
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        DivergedError, match=r"fine-tuning diverged at step \d+ of 3.*lower the learning rate"
    ):
        sparsify(model, SparsifyConfig(target=0.5, lr=1e30, cycle_steps=3), data=_data(), show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not masks_of(model)


# ----------------------------------------------------------------------------- parametrized layers


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_layers_are_skipped_with_a_reason(kind):
    import warnings

    from torch.nn.utils import parametrizations

    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style hook is deprecated
        if kind == "old_weight_norm":
            model.signal = torch.nn.utils.weight_norm(model.signal)
        else:
            model.signal = getattr(parametrizations, kind)(model.signal)
    x = _data()[0][0]
    out_before = model.eval()(x).detach()
    signal_before = copy.deepcopy(model.signal.state_dict())
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="global"), show_progress=False)
    names = [r.name for r in report.layers]
    assert "signal" not in names and "noise" in names
    skip = [w for w in report.warnings if w.startswith("layer 'signal' skipped")]
    assert len(skip) == 1
    assert ("weight_norm" if "weight_norm" in kind else "spectral_norm") in skip[0]
    assert get_mask(model.signal) is None
    if kind == "weight_norm":
        assert torch.nn.utils.parametrize.is_parametrized(model.signal)
    after = model.signal.state_dict()
    assert after.keys() == signal_before.keys()
    assert all(torch.equal(signal_before[k], after[k]) for k in after)  # weight_g/v, original0/1...
    assert not torch.equal(model.eval()(x).detach(), out_before)  # the other layers were pruned


def test_set_mask_refuses_a_parametrized_weight():
    from torch.nn.utils import parametrizations

    layer = parametrizations.weight_norm(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"parametrized weight \(weight: weight_norm\)"):
        set_mask(layer, torch.ones(4, 8, dtype=torch.bool))


def test_only_parametrized_layers_is_a_clear_error():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="no prunable layer.*layer '0' skipped: parametrized weight"):
        sparsify(model, SparsifyConfig(target=0.5, budget="global"), show_progress=False)


# ----------------------------------------------------------------------------- package, plan, registry


def test_top_level_config_then_function():
    # The documented example: touching rmtprune.SparsifyConfig once imported the submodule
    # rmtprune.sparsify, which then shadowed the function (TypeError: 'module' object is not callable).
    import importlib
    import sys

    import rmtprune

    cfg = rmtprune.SparsifyConfig(target=0.3, budget="global")
    model, report = rmtprune.sparsify(Tiny(), cfg)
    assert report.achieved == pytest.approx(0.3, abs=1e-3)
    sys.modules.pop("rmtprune.sparsify", None)
    with pytest.warns(DeprecationWarning, match="rmtprune.sparsity"):
        old = importlib.import_module("rmtprune.sparsify")
    assert old.SparsifyConfig is SparsifyConfig and old.BUDGETS == budget_names() == rmtprune.sparsity.BUDGETS
    assert callable(rmtprune.sparsify) and rmtprune.sparsify is sparsify
    # the old spelling `import rmtprune.sparsify as sp; sp.SparsifyConfig` keeps working this release
    import rmtprune.sparsify as sp

    assert sp is sparsify and sp.SparsifyConfig is SparsifyConfig and sp.plan_sparsity is plan_sparsity
    assert rmtprune.is_sparsified(model) and rmtprune.remove_masks(model) == 3


def test_plan_is_applied_by_sparsify():
    cfg = SparsifyConfig(target=0.5, budget="energy")
    model = Tiny()
    plan = plan_sparsity(model, cfg)
    assert isinstance(plan, SparsityPlan) and plan.dry_run and plan.config is cfg
    assert sum(plan.counts) == plan.wanted == round(0.5 * plan.selected_params)
    assert [r.nnz_after for r in plan.layers] == [
        r.params - k for r, k in zip(plan.layers, plan.counts, strict=True)
    ]
    report = plan.report()
    assert report.dry_run and report.table() == plan.table() and "planned=50.00%" in plan.summary()
    twin = copy.deepcopy(model)
    _, applied = sparsify(model, plan)
    _, direct = sparsify(twin, cfg)
    assert json.loads(applied.to_json()) == json.loads(direct.to_json())
    with pytest.raises(ValueError, match="stale"):
        sparsify(model, plan)  # the weights changed since the plan
    with pytest.raises(ValueError, match="another model"):
        sparsify(Tiny(), plan_sparsity(Tiny(), cfg))


@pytest.mark.parametrize("budget", ["global", "signal"])
def test_protect_last_keeps_the_output_layer_dense(budget):
    from rmtprune.layers import output_layer

    model = Tiny()
    assert output_layer(model)[0] == "head"
    _, report = sparsify(model, SparsifyConfig(target=0.4, budget=budget, protect_last=True))
    head = next(r for r in report.layers if r.name == "head")
    assert get_mask(model.head) is None and head.kind == "dense" and "protect_last" in head.reason
    assert _pruned(model) == round(0.4 * report.selected_params)  # the others absorb its share
    assert not any("head" in w for w in report.warnings)
    _, report = sparsify(Tiny(), SparsifyConfig(target=0.4, budget="global"))
    assert next(r for r in report.layers if r.name == "head").sparsity > 0  # default: pruned


def test_register_budget(monkeypatch):
    from rmtprune.sparsity import ThresholdBudget, budgets, register_budget

    monkeypatch.setattr(budgets, "_REGISTRY", dict(budgets._REGISTRY))

    class Squared(ThresholdBudget):
        capped = False

        def score(self, layer, magnitude):
            return magnitude**2  # same order as |w|: exactly global magnitude pruning

    register_budget("squared", Squared)
    assert "squared" in budget_names()
    a = Tiny()
    b = copy.deepcopy(a)
    sparsify(a, SparsifyConfig(target=0.5, budget="squared", sv_sparsify=False))
    sparsify(b, SparsifyConfig(target=0.5, budget="global", sv_sparsify=False))
    assert all(torch.equal(m, masks_of(b)[k]) for k, m in masks_of(a).items())
    with pytest.raises(ValueError, match="already registered"):
        register_budget("squared", type("Other", (ThresholdBudget,), {}))
    with pytest.raises(TypeError, match="Budget subclass"):
        register_budget("bad", object)
    with pytest.raises(ValueError, match="budget='cubed' must be one of noise, energy"):
        SparsifyConfig(budget="cubed")


def test_budgets_own_their_parameters():
    from rmtprune.sparsity import make_budget

    cfg = SparsifyConfig(budget_power=2.5)
    assert make_budget("signal", cfg).budget_power == 2.5
    assert make_budget("bulk", cfg).needs_fit and not make_budget("uniform", cfg).needs_fit
    assert not make_budget("global", cfg).capped and make_budget("noise", cfg).capped


def test_registered_layer_types_are_sparsified(monkeypatch):
    from rmtprune import layers

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(_spiked(64, 48, 2, 4.0, seed=5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))
    model = nn.Sequential(Dense(), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="no prunable layer"):
        sparsify(model, SparsifyConfig(include=["0"]))
    layers.register_handler(Dense, layers.LinearHandler())
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="noise"))
    assert [r.name for r in report.layers] == ["0", "2"] and report.layers[0].verdict == "fit"
    assert get_mask(model[0]) is not None


def test_multihead_attention_is_reported_not_silently_skipped():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4), "fc": nn.Linear(32, 32)})
    _, report = sparsify(model, SparsifyConfig(target=0.5, budget="global"))
    assert [r.name for r in report.layers] == ["fc"]
    assert any(w.startswith("layer 'attn' skipped: MultiheadAttention") for w in report.warnings)
