"""The pure parts of benchmarks/budget_small.py: data split, layer selection, counts, the sparse
references at the budget, paired differences, and the SVD memo giving the same compression."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _baselines as B  # noqa: E402
import budget_small as S  # noqa: E402

import rmtprune  # noqa: E402
from rmtprune.calibration import collect  # noqa: E402


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(36, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 5)
    ).eval()


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 6 * 6, 4),
    ).eval()  # fmt: skip


def test_split_indices_disjoint_seeded_and_checked() -> None:
    a = S.split_indices(100, [10, 20, 30], seed=3)
    assert [len(x) for x in a] == [10, 20, 30]
    allidx = torch.cat(a)
    assert len(set(allidx.tolist())) == 60 and int(allidx.max()) < 100
    b = S.split_indices(100, [10, 20, 30], seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(S.split_indices(100, [10], seed=4)[0], a[0])
    with pytest.raises(ValueError, match="need 101 samples"):
        S.split_indices(100, [50, 51], seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        S.split_indices(100, [-1], seed=0)


def test_hidden_layers_leave_out_the_output_layer() -> None:
    assert S.hidden_layers(_mlp()) == ["1", "3"]
    assert S.hidden_layers(_cnn()) == ["0", "2"]
    small = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Flatten(), nn.Linear(16 * 36, 20), nn.Linear(20, 3))
    assert S.hidden_layers(small) == ["2"]  # the 16 x 9 conv has no spectrum to fit
    assert S.hidden_layers(small, min_p=1) == ["0", "2"]
    with pytest.raises(ValueError, match="no layer to compress"):
        S.hidden_layers(nn.Sequential(nn.Linear(20, 3)))


def test_budget_and_magnitude_hit_the_library_budget() -> None:
    model = _mlp()
    names = S.hidden_layers(model)
    dense = S.stored_params(model, names)
    assert dense == 36 * 48 + 48 + 48 * 40 + 40
    for frac in (0.25, 0.6):
        n_keep = S.weight_budget(model, names, frac)
        m = copy.deepcopy(model)
        S.global_magnitude(m, names, n_keep)
        assert S.stored_params(m, names) == math.floor(frac * dense)
        assert not any(hasattr(m.get_submodule(n), "weight_orig") for n in names)  # prune.remove ran
        # the same count as the library's budget: compress lands at or below it
        c, rep = rmtprune.compress(copy.deepcopy(model), target=frac, allocation="uniform", include=names)
        assert S.stored_params(c, names) == rep.budget["after"] <= S.stored_params(m, names)
    with pytest.raises(ValueError, match="fraction"):
        S.weight_budget(model, names, 0.0)


def test_magnitude_on_convolutions_is_global() -> None:
    model = _cnn()
    names = S.hidden_layers(model)
    n_keep = S.weight_budget(model, names, 0.4)
    S.global_magnitude(model, names, n_keep)
    weights = torch.cat([model.get_submodule(n).weight.detach().abs().flatten() for n in names])
    assert int(torch.count_nonzero(weights)) == n_keep
    with pytest.raises(ValueError, match="n_keep"):
        S.global_magnitude(model, names, 10**9)


def test_wanda_matches_the_baseline_on_linear_layers_and_handles_convolutions() -> None:
    model = _mlp(1)
    names = S.hidden_layers(model)
    xs = [torch.randn(32, 36) for _ in range(4)]
    calib = collect(model, xs, layers=names, held_out=0, matmul_dtype=torch.float64)
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    mine, ref = copy.deepcopy(model), copy.deepcopy(model)
    S.wanda(mine, names, calib, round(0.5 * total))
    B.wanda(ref, 0.5, names, B.from_calibration(calib))
    for n in names:
        assert torch.equal(mine.get_submodule(n).weight, ref.get_submodule(n).weight)
    cnn = _cnn(2)
    cnames = S.hidden_layers(cnn)
    ccal = collect(cnn, [torch.randn(8, 3, 8, 8) for _ in range(3)], layers=cnames, held_out=0)
    S.wanda(cnn, cnames, ccal, S.weight_budget(cnn, cnames, 0.5))
    for n in cnames:  # every output row of a conv keeps the same share of its in*kh*kw inputs
        w = cnn.get_submodule(n).weight.detach().flatten(1)
        per_row = torch.count_nonzero(w, dim=1)
        assert int(per_row.min()) == int(per_row.max()) < w.shape[1]


def test_paired_and_pm() -> None:
    rows = [
        {"method": "a", "seed": 0, "acc": 0.9, "target": 0.4, "ft": False},
        {"method": "b", "seed": 0, "acc": 0.8, "target": 0.4, "ft": False},
        {"method": "a", "seed": 1, "acc": 0.75, "target": 0.4, "ft": False},
        {"method": "b", "seed": 1, "acc": 0.8, "target": 0.4, "ft": False},
        {"method": "a", "seed": 2, "acc": 0.7, "target": 0.4, "ft": False},  # no partner: left out
        {"method": "b", "seed": 0, "acc": 0.1, "target": 0.6, "ft": False},
    ]
    d = S.paired(rows, "a", "b", target=0.4, ft=False)
    assert d == pytest.approx([0.1, -0.05])
    assert S.pm(d, sign=True) == "+2.50 +- 10.61"
    assert S.pm([0.5]) == "50.00"
    assert S.pm([]) == "-"


def test_svd_memo_gives_the_same_compression() -> None:
    model = _mlp(3)
    names = S.hidden_layers(model)
    xs = [torch.randn(64, 36) for _ in range(4)]
    calib = collect(model, xs, layers=names, held_out=0)
    x = torch.randn(16, 36)
    originals = (torch.linalg.svd, torch.linalg.svdvals, torch.linalg.eigvalsh)
    plain = {}
    for alloc in ("rmt", "uniform"):
        for cal in (None, calib):
            m, _ = rmtprune.compress(
                copy.deepcopy(model), target=0.4, allocation=alloc, include=names, calibration=cal
            )
            plain[(alloc, cal is None)] = m(x)
    with S.svd_memo() as counts:
        for _ in range(2):
            for alloc in ("rmt", "uniform"):
                for cal in (None, calib):
                    m, _ = rmtprune.compress(
                        copy.deepcopy(model), target=0.4, allocation=alloc, include=names, calibration=cal
                    )
                    assert torch.equal(m(x), plain[(alloc, cal is None)])
    assert counts["hits"] > counts["misses"] > 0
    assert (torch.linalg.svd, torch.linalg.svdvals, torch.linalg.eigvalsh) == originals  # restored


def test_library_sparse_references_hit_the_count() -> None:
    model = _mlp(4)
    names = S.hidden_layers(model)
    calib = collect(model, [torch.randn(32, 36) for _ in range(2)], layers=names, held_out=0)
    n_keep = S.weight_budget(model, names, 0.4)
    for method in ("rmt-wanda", "rmt-magnitude"):
        pruned = S.sparse_copy(model, names, method, n_keep, calib)
        assert S.stored_params(pruned, names) == math.floor(0.4 * S.stored_params(model, names))
        assert not rmtprune.is_sparsified(pruned)  # masks dropped, zeros kept
    assert S.stored_params(model, names) == 36 * 48 + 48 + 48 * 40 + 40  # the dense model is untouched
    with pytest.raises(ValueError, match="unknown sparse method"):
        S.sparse_copy(model, names, "random", n_keep, calib)
