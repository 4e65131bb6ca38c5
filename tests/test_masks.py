"""Masks: attached as non-persistent buffers, frozen through optimizer steps, removable."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from rmtprune.masks import (
    MASK_BUFFER,
    apply_masks,
    count_nonzeros,
    freeze_masks,
    get_mask,
    is_sparsified,
    mask_gradients,
    masks_of,
    prunable_layers,
    remove_masks,
    restore_masks,
    set_mask,
)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Conv1d(1, 1, 1), nn.Linear(8, 3))


def _half_mask(w: torch.Tensor) -> torch.Tensor:
    return (torch.arange(w.numel()) % 2 == 0).reshape(w.shape)


def test_set_mask_zeroes_and_keeps_state_dict_keys():
    net = _net()
    keys = set(net.state_dict())
    set_mask(net[0], _half_mask(net[0].weight))
    assert set(net.state_dict()) == keys  # non-persistent: loads into a plain copy
    assert torch.all(net[0].weight[~get_mask(net[0])] == 0)
    assert is_sparsified(net) and list(masks_of(net)) == ["0.weight"]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_pruned_entries_stay_zero_through_steps(opt_cls):
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    kwargs = {"momentum": 0.9, "weight_decay": 0.1} if opt_cls is torch.optim.SGD else {"weight_decay": 0.1}
    opt = opt_cls(net.parameters(), lr=0.1, **kwargs)
    x = torch.randn(16, 6)
    # build momentum before pruning, so the optimizer state would revive pruned entries
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    mask = _half_mask(net[0].weight)
    set_mask(net[0], mask)
    handle = freeze_masks(net, opt)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        mask_gradients(net)
        assert torch.all(net[0].weight.grad[~mask] == 0)
        opt.step()
        assert torch.all(net[0].weight[~mask] == 0)
    handle.remove()


def test_remove_and_restore():
    net = _net()
    mask = _half_mask(net[3].weight)
    set_mask(net[3], mask)
    saved = masks_of(net)
    assert remove_masks(net) == 1 and not is_sparsified(net)
    assert torch.all(net[3].weight[~mask] == 0)  # zeros stay
    restore_masks(net, saved)
    assert torch.equal(get_mask(net[3]), mask)
    with pytest.raises(KeyError, match="names no layer"):
        restore_masks(net, {"nope.weight": mask})


def test_apply_masks_rezeroes():
    net = _net()
    set_mask(net[0], _half_mask(net[0].weight))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    apply_masks(net)
    assert int((net[0].weight == 0).sum()) == net[0].weight.numel() // 2


def test_count_nonzeros():
    net = _net()
    total = sum(p.numel() for p in net.parameters())
    set_mask(net[0], _half_mask(net[0].weight))
    counts = count_nonzeros(net)
    assert counts == {"total": total, "stored": total - 24, "masked_layers": 1}


def test_prunable_layers_and_errors():
    net = _net()
    assert [n for n, _ in prunable_layers(net)] == ["0", "2", "3"]
    with pytest.raises(ValueError, match="mask shape"):
        set_mask(net[0], torch.ones(3, 3, dtype=torch.bool))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match="prune.remove"):
        list(prunable_layers(net))
    with pytest.raises(TypeError, match="nn.Module"):
        list(prunable_layers("net"))
    assert MASK_BUFFER == "rmtprune_mask"


def test_prunable_types_is_a_deprecated_view_of_the_registry():
    import rmtprune.masks as masks
    from rmtprune.layers import supported_types

    with pytest.warns(DeprecationWarning, match="layer registry"):
        types = masks.PRUNABLE_TYPES
    assert {nn.Linear, nn.Conv1d, nn.Conv2d} <= set(types) <= set(supported_types())


def test_prunable_layers_reach_the_factors_of_a_low_rank_layer():
    from rmtprune.lowrank import LowRankLinear

    net = nn.Sequential(
        LowRankLinear.from_factors(torch.randn(8, 2), torch.randn(2, 6), None), nn.Linear(8, 3)
    )
    assert [n for n, _ in prunable_layers(net)] == ["0.first", "0.second", "1"]
