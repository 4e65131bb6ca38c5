"""Tests of rmtprune.zoo.models: forward passes, parameter counts, spec parsing, errors, prunability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmtprune.zoo import models as M
from rmtprune.zoo.data import FastLoader, load_dataset, seed_everything

MNIST = (1, 28, 28)
DIGITS = (1, 8, 8)


def _mlp_count(widths: list[int]) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def _vit_count(dim: int, depth: int, patch: int, n_patches: int, mlp: int, c: int = 1, k: int = 10) -> int:
    block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return (
        (c * patch * patch * dim + dim) + dim + (n_patches + 1) * dim + depth * block + 2 * dim + dim * k + k
    )


# ----------------------------------------------------------------------------- forward and counts


@pytest.mark.parametrize(
    ("spec", "shape", "params"),
    [
        ("mlp", MNIST, _mlp_count([784, 1000, 10])),
        ("mlp:1000", MNIST, 795010),
        ("mlp:300,100", MNIST, _mlp_count([784, 300, 100, 10])),
        ("mlp:3000x4,500", MNIST, _mlp_count([784, 3000, 3000, 3000, 3000, 500, 10])),
        ("mlp:64", DIGITS, _mlp_count([64, 64, 10])),
        # conv (no bias) + bn, conv + bn, fc1 on 64 x 7 x 7, head
        ("cnn", MNIST, 1 * 32 * 9 + 64 + 32 * 64 * 9 + 128 + (3136 * 128 + 128) + (128 * 10 + 10)),
        ("cnn:16,hidden=0", DIGITS, 16 * 9 + 32 + (16 * 16 * 10 + 10)),
        ("vit", MNIST, _vit_count(64, 4, 7, 16, 128)),
        ("vit:dim=32,depth=2,heads=2,patch=4,mlp_ratio=4", MNIST, _vit_count(32, 2, 4, 49, 128)),
        ("vit:dim=16,depth=1", DIGITS, _vit_count(16, 1, 4, 4, 32)),
    ],
)
def test_forward_and_parameter_count(spec: str, shape: tuple[int, ...], params: int) -> None:
    torch.manual_seed(0)
    model = M.build_model(spec, shape, 10)
    assert M.count_parameters(model) == params
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    model.eval()
    assert model(torch.randn(1, *shape)).shape == (1, 10)


def test_count_trainable_only() -> None:
    model = M.MLP(4, [3], 2)
    model.fc1.weight.requires_grad_(False)
    assert M.count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    assert M.count_parameters(model, trainable_only=True) == 3 + 3 * 2 + 2
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        M.count_parameters("mlp")  # type: ignore[arg-type]


def test_mlp_layout_and_no_logit_activation() -> None:
    model = M.MLP(784, [1000], 10, activation="gelu", dropout=0.1)
    names = [n for n, _ in model.named_children()]
    assert names == ["flatten", "fc1", "act1", "drop1", "head"]
    assert isinstance(model.head, nn.Linear) and list(model.children())[-1] is model.head
    assert isinstance(model.act1, nn.GELU)
    # logits are unconstrained (no ReLU/softmax at the end): some are negative
    assert (model.eval()(torch.randn(8, 1, 28, 28)) < 0).any()


def test_mlp_input_mismatch_is_clear() -> None:
    model = M.MLP(784, [10], 10)
    with pytest.raises(ValueError, match="has 64 features per sample but the MLP expects in_features=784"):
        model(torch.randn(2, 1, 8, 8))


def test_vit_attention_matches_torch_mha() -> None:
    torch.manual_seed(0)
    attn = M.Attention(16, heads=4).eval()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        mha.out_proj.weight.copy_(attn.out.weight)
        mha.out_proj.bias.copy_(attn.out.bias)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_vit_named_projections() -> None:
    model = M.build_model("vit:depth=2", MNIST, 10)
    linear = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    for i in range(2):
        assert {f"blocks.{i}.attn.{p}" for p in ("q", "k", "v", "out")} <= linear
        assert {f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"} <= linear
    assert "head" in linear and type(model.patch_embed) is nn.Conv2d
    assert model.patch_embed.stride == (7, 7)


class _Factored(nn.Module):
    """A stand-in for a low-rank layer: two factors, no ``.weight`` attribute."""

    def __init__(self, layer: nn.Module, rank: int) -> None:
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.a = nn.Linear(layer.in_features, rank, bias=False)
            self.b = nn.Linear(rank, layer.out_features)
        else:
            self.a = nn.Conv2d(
                layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False
            )
            self.b = nn.Conv2d(rank, layer.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("spec", ["mlp:32,16", "cnn:8,16,hidden=32", "vit:dim=16,depth=2,heads=2"])
def test_every_weight_layer_can_be_replaced(spec: str) -> None:
    """Swapping each Linear/Conv2d for a factored module keeps the forward pass working."""
    torch.manual_seed(0)
    model = M.build_model(spec, MNIST, 10)
    targets = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _Factored(getattr(parent, child), rank=2))
    assert targets and all(isinstance(model.get_submodule(n), _Factored) for n in targets)
    out = model(torch.randn(2, *MNIST))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", ["cnn:8", "vit:dim=16,depth=1,heads=2,dropout=0.1"])
def test_backward_reaches_every_parameter(spec: str) -> None:
    torch.manual_seed(0)
    model = M.build_model(spec, MNIST, 10).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, *MNIST)), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mlp_learns_digits(one_thread: None) -> None:
    """End to end on real data: a small MLP trained for a few epochs beats 90% on the held-out split."""
    gen = seed_everything(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = M.build_model("mlp:128", train.input_shape, train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(8):
        for x, y in FastLoader(train, 64, shuffle=True, generator=gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert acc > 0.9


def test_describe() -> None:
    text = M.describe(M.build_model("mlp:20", DIGITS, 10))
    lines = text.splitlines()
    assert lines[0].split() == ["module", "type", "weight", "params"]
    assert any(line.split()[:3] == ["fc1", "Linear", "20x64"] for line in lines)
    assert lines[-1].split() == ["total", f"{64 * 20 + 20 + 20 * 10 + 10:,}"]


# ----------------------------------------------------------------------------- specs and errors


def test_model_families() -> None:
    assert tuple(M.MODEL_FAMILIES) == ("mlp", "cnn", "vit")


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ("mlp", lambda m: isinstance(m, M.MLP) and m.widths == (1000,)),
        ("MLP:3000,3000", lambda m: m.widths == (3000, 3000)),
        (" mlp : 10 , 20 ", lambda m: m.widths == (10, 20)),
        ("mlp:5x3", lambda m: m.widths == (5, 5, 5)),
        ("mlp:10,activation=tanh,dropout=0.2", lambda m: isinstance(m.act1, nn.Tanh) and m.drop1.p == 0.2),
        ("cnn", lambda m: isinstance(m, M.CNN) and m.channels == (32, 64) and m.fc1.out_features == 128),
        ("cnn:16,32,64,hidden=0", lambda m: m.channels == (16, 32, 64) and m.fc1 is None),
        ("vit", lambda m: (m.dim, m.depth, m.heads, m.patch_size, m.mlp_ratio) == (64, 4, 4, 7, 2.0)),
        (
            "vit:dim=48,depth=1,heads=3,patch=14,mlp_ratio=1.5",
            lambda m: m.blocks[0].mlp.fc1.out_features == 72,
        ),
    ],
)
def test_build_model_specs(spec: str, check) -> None:  # noqa: ANN001
    assert check(M.build_model(spec, MNIST, 10))


@pytest.mark.parametrize(
    ("spec", "shape", "error", "match"),
    [
        ("resnet", MNIST, ValueError, "unknown model family 'resnet'.*valid: mlp, cnn, vit"),
        ("", MNIST, ValueError, "unknown model family ''"),
        ("mlp:10,abc", MNIST, ValueError, "bad token 'abc'.*expected int"),
        ("mlp:1.5", MNIST, ValueError, "bad token '1.5'"),
        ("mlp:0", MNIST, ValueError, "bad token '0'.*must be >= 1"),
        ("mlp:10x0", MNIST, ValueError, "bad token '10x0'"),
        ("mlp:10,,20", MNIST, ValueError, "empty token"),
        ("mlp:10,activation=swish", MNIST, ValueError, "activation='swish' is unknown; valid: relu"),
        ("mlp:10,dropout=1", MNIST, ValueError, r"dropout=1.0 must be in \[0, 1\)"),
        ("mlp:10,width=3", MNIST, ValueError, "unknown option 'width' for mlp.*valid: activation, dropout"),
        ("cnn:8,8,8,8,8", MNIST, ValueError, "5 conv blocks halve image_size=.*at most 4 blocks"),
        ("cnn:8,8,8,8", DIGITS, ValueError, "at most 3 blocks"),
        ("cnn:8,hidden=x", MNIST, ValueError, "bad token 'x'"),
        ("cnn", (784,), ValueError, r"cnn needs input_shape=\(C, H, W\)"),
        ("vit:patch=5", MNIST, ValueError, r"patch_size=5 must divide image_size=\(28, 28\)"),
        ("vit:patch=3", DIGITS, ValueError, "patch_size=3 must divide"),
        ("vit:heads=3", MNIST, ValueError, "heads=3 must divide dim=64"),
        ("vit:dim=64,dim=32", MNIST, ValueError, "option 'dim' given twice"),
        ("vit:64", MNIST, ValueError, "bad token '64'.*key=value"),
        ("vit:depth=0", MNIST, ValueError, "depth=0 must be >= 1"),
        ("vit:mlp_ratio=0", MNIST, ValueError, "mlp_ratio=0.0 gives an MLP width of 0"),
        ("vit:layers=2", MNIST, ValueError, "unknown option 'layers' for vit.*valid: dim, depth"),
        ("mlp", (1, 0, 28), ValueError, "input_shape=.* must be positive ints"),
    ],
)
def test_build_model_errors(spec: str, shape: tuple[int, ...], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        M.build_model(spec, shape, 10)


def test_constructor_type_errors() -> None:
    with pytest.raises(TypeError, match="model spec must be a string"):
        M.build_model(None, MNIST, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="widths must be a sequence of ints"):
        M.MLP(784, 1000, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"widths\[1\]=2.5 must be an int"):
        M.MLP(784, [10, 2.5], 10)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="num_classes=0 must be >= 1"):
        M.build_model("mlp", MNIST, 0)
    with pytest.raises(ValueError, match=r"image_size=\(28, 28, 1\) must be an int or a pair"):
        M.ViT(image_size=(28, 28, 1))
