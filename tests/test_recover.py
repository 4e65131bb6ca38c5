"""Recovery after compression (:func:`rmtprune.finetune.recover`): distillation from the dense model.

Small models, a few dozen steps: the distillation loss and the held-out output error to the teacher
go down, only the factored / sparse layers move, zeros stay zero, the teacher and the model's modes
and ``requires_grad`` are left as they were, bad arguments are refused by name.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.finetune import distill_loss, recover
from rmtprune.lowrank import LowRankModule
from rmtprune.masks import get_mask, set_mask


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 10))


def _inputs(n: int, seed: int, dim: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, dim, generator=g) for _ in range(n)]


@torch.no_grad()
def _rel_error(model: nn.Module, teacher: nn.Module, xs: list[torch.Tensor]) -> float:
    """``sum ||s - t||^2 / sum ||t||^2`` of the outputs over ``xs``: measured here, not by recover."""
    num = den = 0.0
    for x in xs:
        s, t = model(x), teacher(x)
        num += float((s - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return num / den


def _same(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _report(what: str, out: dict, before: float, after: float) -> None:
    loss = f"loss {out['loss_start']:.5f} -> {out['loss_end']:.5f}"
    print(f"\n{what}: {loss}, held-out {before:.5f} -> {after:.5f}")


def _compressed_mlp() -> tuple[nn.Module, nn.Module]:
    teacher = _mlp().eval()
    model, plan = rmtprune.compress(copy.deepcopy(teacher), rule="fixed", ratio=0.3)
    assert {lp.name for lp in plan.by_action("factor")} == {"0", "2"}  # "4", the output layer, stays dense
    return model, teacher


def test_recovery_lowers_loss_and_held_out_error_only_factors_move() -> None:
    model, teacher = _compressed_mlp()
    teacher_state, dense_before = _state(teacher), _state(model[4])
    factors_before = [p.detach().clone() for p in model[2].parameters()]
    held = _inputs(4, seed=99)
    before = _rel_error(model, teacher, held)
    out = recover(model, teacher, _inputs(8, seed=1), steps=120, lr=3e-3)
    after = _rel_error(model, teacher, held)
    _report("MLP, mse", out, before, after)
    assert out["steps"] == 120 and out["loss"] == "mse" and out["window"] == 10 and len(out["losses"]) == 120
    assert out["loss_end"] < 0.5 * out["loss_start"] and after < 0.5 * before
    assert out["trainable_params"] == sum(p.numel() for m in (model[0], model[2]) for p in m.parameters())
    assert _same(dense_before, model[4])  # not factored, not sparse: frozen
    assert not any(torch.equal(a, b) for a, b in zip(factors_before, model[2].parameters(), strict=True))
    assert _same(teacher_state, teacher)


class _Two(nn.Module):
    """Takes two inputs, for the tuple form ``model(*x)`` and the mapping form ``model(**x)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a + b)


def test_kl_on_a_classifier_and_the_batch_forms() -> None:
    model, teacher = _compressed_mlp()
    held = _inputs(3, seed=98)

    @torch.no_grad()
    def kl() -> float:
        return sum(float(distill_loss(model(x), teacher(x), "kl")) for x in held) / len(held)

    before = kl()
    halves = [(x / 2, x / 2) for x in _inputs(6, seed=2)]
    batches = halves[:3] + [{"a": a, "b": b} for a, b in halves[3:]]
    out = recover(_Two(model), _Two(teacher), batches, steps=60, lr=3e-3, loss="kl")
    after = kl()
    _report("MLP, kl", out, before, after)
    assert out["loss"] == "kl" and out["loss_end"] < 0.5 * out["loss_start"] and after < 0.5 * before
    with pytest.raises(TypeError, match="expected a tensor, tuple or dict"):
        recover(model, teacher, [[held[0]]], steps=1)


def test_distill_loss_values_and_padding() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ref = nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none")
    ref = ref.sum(-1)
    assert torch.allclose(distill_loss(s, t, "kl"), ref.mean(), atol=1e-6)
    assert float(distill_loss(t, t, "kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(torch.zeros_like(t), t, "mse")) == pytest.approx(1.0)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding: whatever the student says there does not count
    s2 = s.clone()
    s2[1, 3:] += 10.0 * torch.arange(7.0)  # not a constant shift: that leaves a softmax alone
    for kind in ("kl", "mse"):
        assert torch.allclose(distill_loss(s, t, kind, mask), distill_loss(s2, t, kind, mask))
        assert not torch.allclose(distill_loss(s, t, kind), distill_loss(s2, t, kind))
    assert torch.allclose(distill_loss(s, t, "kl", mask), ref[mask.bool()].mean(), atol=1e-6)
    kept = mask.bool()
    mse = (s - t)[kept].pow(2).sum() / t[kept].pow(2).sum()
    assert torch.allclose(distill_loss(s, t, "mse", mask), mse)
    with pytest.raises(ValueError, match="student output"):
        distill_loss(s[:1], t, "mse")


def test_sparse_layers_keep_their_zeros() -> None:
    teacher = _mlp().eval()
    model = copy.deepcopy(teacher)
    w = model[2].weight
    set_mask(model[2], w.abs() > w.abs().median())  # a masked layer: trained, zeros kept
    mask = get_mask(model[2]).clone()
    frozen = model[0].weight.detach().clone()
    held = _inputs(3, seed=97)
    before = _rel_error(model, teacher, held)
    out = recover(model, teacher, _inputs(6, seed=3), steps=60, lr=3e-3, weight_decay=0.1)
    after = _rel_error(model, teacher, held)
    _report("MLP, 50% masked middle layer, mse", out, before, after)
    assert torch.equal(get_mask(model[2]), mask) and bool((model[2].weight[~mask] == 0).all())
    assert bool((model[2].weight[mask] != 0).all()) and after < 0.7 * before
    assert torch.equal(model[0].weight, frozen)  # dense and unmasked: frozen under trainable="factors"

    # plain zeros (one-shot pruning without masks): kept only with keep_zeros=True
    for keep_zeros in (True, False):
        m = copy.deepcopy(teacher)
        with torch.no_grad():
            for layer in (m[0], m[2]):
                layer.weight.mul_(layer.weight.abs() > layer.weight.abs().median())
        zeros = [layer.weight == 0 for layer in (m[0], m[2])]
        recover(m, teacher, _inputs(2, seed=4), steps=5, lr=1e-2, trainable="all", keep_zeros=keep_zeros)
        kept = all(bool((layer.weight[z] == 0).all()) for layer, z in zip((m[0], m[2]), zeros, strict=True))
        assert kept is keep_zeros


def test_modes_requires_grad_and_teacher_restored() -> None:
    model, teacher = _compressed_mlp()
    model.train()
    model[1].eval()  # mixed modes come back as they were, module by module
    teacher.train()
    model[4].bias.requires_grad_(False)
    teacher[0].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    t_flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    t_state = _state(teacher)
    bias = model[4].bias.detach().clone()
    recover(model, teacher, _inputs(2, seed=5), steps=4, lr=1e-2, trainable="all")
    assert not torch.equal(model[4].bias, bias)  # "all": every parameter trains, a frozen one too
    assert model.training and not model[1].training and model[0].training and teacher.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == t_flags
    assert all(p.grad is None for p in [*model.parameters(), *teacher.parameters()])
    assert _same(t_state, teacher)


class _HiddenOnly(nn.Module):
    """Returns ``{"last_hidden_state": ...}`` like an encoder: no logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": self.net(x)}


def test_bad_arguments() -> None:
    model, teacher = _compressed_mlp()
    xs = _inputs(1, seed=6)
    state = _state(model)
    out = recover(model, teacher, [], steps=0)  # returns at once: no batch needed, nothing moves
    assert out["steps"] == 0 and out["losses"] == []
    with pytest.raises(ValueError, match="steps=-1"):
        recover(model, teacher, xs, steps=-1)
    with pytest.raises(TypeError, match="steps=2.5"):
        recover(model, teacher, xs, steps=2.5)
    with pytest.raises(ValueError, match="lr=0"):
        recover(model, teacher, xs, steps=1, lr=0)
    with pytest.raises(ValueError, match="'lora'"):
        recover(model, teacher, xs, steps=1, trainable="lora")
    with pytest.raises(ValueError, match="'ce'"):
        recover(model, teacher, xs, steps=1, loss="ce")
    with pytest.raises(ValueError, match="teacher is model"):
        recover(model, model, xs, steps=1)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        recover(model, None, xs, steps=1)
    with pytest.raises(ValueError, match="at least one batch"):
        recover(model, teacher, iter([]), steps=1)
    with pytest.raises(ValueError, match="no factored or sparse layer"):
        recover(copy.deepcopy(teacher), teacher, xs, steps=1)
    shallow = nn.Sequential(*teacher)  # the teacher's own layers: training would change the teacher
    with pytest.raises(ValueError, match="shared with the teacher"):
        recover(shallow, teacher, xs, steps=1, trainable="all")
    with pytest.raises(TypeError, match="needs logits"):
        recover(_HiddenOnly(model), _HiddenOnly(teacher), xs, steps=1, loss="kl")
    assert _same(state, model)


def test_transformer_encoder_layer_mse() -> None:
    torch.manual_seed(0)
    teacher = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.1, batch_first=True).eval()
    model, plan = rmtprune.compress(copy.deepcopy(teacher), rule="fixed", ratio=0.3, protect_last=False)
    factored = [lp.name for lp in plan.by_action("factor")]
    assert factored and all(isinstance(model.get_submodule(n), LowRankModule) for n in factored)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 12, 64, generator=g) for _ in range(6)]
    held = [torch.randn(8, 12, 64, generator=g) for _ in range(2)]
    before = _rel_error(model, teacher, held)
    out = recover(model, teacher, xs, steps=80, lr=3e-3)
    after = _rel_error(model, teacher, held)
    _report(f"TransformerEncoderLayer, factored {factored}, mse", out, before, after)
    assert out["loss"] == "mse" and out["loss_end"] < 0.7 * out["loss_start"] and after < 0.7 * before


def test_llama_causal_lm_kl_with_padding() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.05,  # 2.5x the default: logits far enough from uniform to measure a KL
    )
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    model, plan = rmtprune.compress(copy.deepcopy(teacher), rule="fixed", ratio=0.3)
    assert len(plan.by_action("factor")) >= 7
    g = torch.Generator().manual_seed(1)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (8, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 10:] = 0  # right padding on one row
        return {"input_ids": ids, "attention_mask": mask}

    train, held = [batch() for _ in range(16)], [batch() for _ in range(2)]  # fewer over-fit the batches

    @torch.no_grad()
    def kl() -> float:
        per = [distill_loss(model(**b).logits, teacher(**b).logits, "kl", b["attention_mask"]) for b in held]
        return float(sum(per)) / len(per)

    embed = model.model.embed_tokens.weight.detach().clone()
    before = kl()
    out = recover(model, teacher, train, steps=40, lr=2e-3)
    after = kl()
    _report("LlamaForCausalLM (tiny), kl", out, before, after)
    assert out["loss"] == "kl" and out["loss_end"] < 0.7 * out["loss_start"] and after < 0.7 * before
    assert torch.equal(model.model.embed_tokens.weight, embed)
