"""Layer safety: factoring at full rank is exact for every accepted layer type, layers whose forward
differs from their registered base (subclasses, instance patches, hooks) are skipped with the
reason, and compressed models survive ``.to(dtype)``, ``half``/``bfloat16`` and ``torch.compile``."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rmtprune
from rmtprune import layers
from rmtprune.layers import changed_forward, handler_for, hooked, register_handler
from rmtprune.lowrank import LowRankModule
from rmtprune.masks import apply_masks, get_mask

FULL = {"rule": "fixed", "ratio": 1.0, "factor_only_if_smaller": False, "protect_last": False}


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A type a test registers is dropped after it."""
    monkeypatch.setattr(layers, "_REGISTRY", dict(layers._REGISTRY))


# ---------------------------------------------------------------- layers that change the forward
class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input size at run time (as timm's ``Conv2dSame``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        (ph, pw) = pads
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardisation at every forward pass (as timm's ``StdConv2d``, arXiv:1903.10520)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / (std + 1e-6), self.bias)


class GainConv2d(nn.Conv2d):
    """Overrides only ``_conv_forward`` (a learned gain on the weight): a changed forward too."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, 2.0 * weight, bias)


class TracedLinear(nn.Linear):
    """Overrides ``forward`` but computes exactly what ``nn.Linear`` does (it counts its calls)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        TracedLinear.calls += 1
        return super().forward(x)


class PresetConv2d(nn.Conv2d):
    """Changes only ``__init__`` (defaults): the forward path is ``nn.Conv2d``'s, so it is accepted."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, stride=2, padding=1, padding_mode="reflect")


def test_changed_forward_names_the_override() -> None:
    assert changed_forward(nn.Conv2d(3, 4, 3)) == ""
    assert changed_forward(PresetConv2d(3, 4)) == ""
    assert changed_forward(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)) == ""
    assert changed_forward(nn.Embedding(4, 4)) == ""  # not a registered type at all
    why = changed_forward(Conv2dSame(3, 4, 3))
    assert why.startswith("Conv2dSame overrides forward (in Conv2dSame, a subclass of Conv2d); factoring")
    assert "would change its function" in why and "register_handler(Conv2dSame)" in why
    assert changed_forward(GainConv2d(3, 4, 3)).startswith("GainConv2d overrides _conv_forward")
    assert handler_for(Conv2dSame(3, 4, 3)) is None and handler_for(PresetConv2d(3, 4)) is not None
    patched = nn.Linear(4, 4)
    patched.forward = functools.partial(lambda self, x: 2 * F.linear(x, self.weight, self.bias), patched)
    assert "has its own forward on the instance" in changed_forward(patched)
    assert handler_for(patched) is None


def test_register_handler_without_handler_uses_the_base_one() -> None:
    assert handler_for(TracedLinear(4, 4)) is None
    register_handler(TracedLinear)
    assert handler_for(TracedLinear(4, 4)) is layers._REGISTRY[nn.Linear]
    assert changed_forward(TracedLinear(4, 4)) == ""

    class Free(nn.Module):
        pass

    with pytest.raises(TypeError, match=r"layer_type=Free derives from no registered type .*Linear"):
        register_handler(Free)


def _mixed_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Conv2dSame(3, 16, 3, stride=2),  # "0"
        nn.ReLU(),
        StdConv2d(16, 16, 3, padding=1),  # "2"
        nn.ReLU(),
        GainConv2d(16, 16, 3, padding=1),  # "4"
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),  # "6"
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),  # "8"
        nn.ReLU(),
        nn.Linear(32, 10),  # "10"
    ).eval()


REJECTED = {
    "0": "Conv2dSame overrides forward",
    "2": "StdConv2d overrides forward",
    "4": "GainConv2d overrides _conv_forward",
}


def test_plan_analyze_and_compress_skip_subclasses_that_change_the_forward() -> None:
    model = _mixed_model()
    x = torch.randn(2, 3, 7, 7)  # odd size, stride 2: Conv2dSame pads asymmetrically
    before = model(x)
    report = rmtprune.plan(model, rmtprune.CompressionConfig(**FULL))
    rows = {lp.name: lp for lp in report.layers}
    for name, why in REJECTED.items():
        assert rows[name].action == "skip" and rows[name].reason.startswith(why), rows[name].reason
    assert {rows[n].action for n in ("6", "8", "10")} == {"factor"}
    analysis = rmtprune.analyze(model)
    for name, why in REJECTED.items():
        assert analysis[name].verdict == "skip" and analysis[name].message.startswith(why)
    model, _ = rmtprune.compress(model, **FULL)
    assert [type(model[i]).__name__ for i in (0, 2, 4)] == ["Conv2dSame", "StdConv2d", "GainConv2d"]
    assert isinstance(model[6], LowRankModule)
    assert torch.allclose(model(x), before, atol=1e-5)


def test_sparsify_skips_subclasses_that_change_the_forward() -> None:
    model = _mixed_model()
    kept = {n: model.get_submodule(n).weight.detach().clone() for n in REJECTED}
    _, report = rmtprune.sparsify(
        model, rmtprune.SparsifyConfig(target=0.5, budget="global", protect_last=False), show_progress=False
    )
    names = [r.name for r in report.layers]
    assert names == ["6", "8", "10"]
    for name, why in REJECTED.items():
        hits = [w for w in report.warnings if w.startswith(f"layer {name!r} skipped: {why}")]
        assert len(hits) == 1, report.warnings
        assert torch.equal(model.get_submodule(name).weight, kept[name])
        assert get_mask(model.get_submodule(name)) is None
    # The reason it matters: zeros in a standardised weight do not stay zeros.
    std = model[2]
    w = std.weight.detach().clone()
    w[:, :, 0] = 0
    standardised = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
    assert bool((standardised[:, :, 0] != 0).all())


def test_registered_subclass_is_accepted_everywhere() -> None:
    register_handler(TracedLinear)
    torch.manual_seed(0)
    model = nn.Sequential(TracedLinear(20, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    assert rmtprune.plan(model, rmtprune.CompressionConfig(**FULL)).layers[0].action == "factor"
    _, report = rmtprune.sparsify(
        copy.deepcopy(model), rmtprune.SparsifyConfig(target=0.3, budget="uniform"), show_progress=False
    )
    assert report.layers[0].name == "0" and report.layers[0].nnz_after < 20 * 16


def _hooked_model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    if kind == "forward":
        model[0].register_forward_hook(lambda _m, _i, out: 2 * out)
    else:
        model[0].register_forward_pre_hook(lambda _m, args: (args[0].flip(-1),))
    return model


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooked_layer_is_not_factored_but_is_masked(kind: str) -> None:
    model = _hooked_model(kind)
    x = torch.randn(3, 20)
    before = model(x)
    label = "forward hook" if kind == "forward" else "forward pre-hook"
    assert label in hooked(model[0]) and hooked(model[2]) == ""
    report = rmtprune.plan(model, rmtprune.CompressionConfig(**FULL))
    assert report.layers[0].action == "skip"
    assert report.layers[0].reason.startswith(f"1 {label} (")
    assert "factoring replaces the module and would drop them" in report.layers[0].reason
    assert rmtprune.analyze(model)["0"].verdict == "skip"
    rmtprune.compress(model, **FULL)
    assert type(model[0]) is nn.Linear and isinstance(model[2], LowRankModule)
    assert torch.allclose(model(x), before, atol=1e-5)  # the hook still acts
    # Masking keeps the module and its hooks: sparsification prunes it.
    sparse = _hooked_model(kind)
    _, rep = rmtprune.sparsify(
        sparse, rmtprune.SparsifyConfig(target=0.5, budget="uniform"), show_progress=False
    )
    assert "0" in [r.name for r in rep.layers] and get_mask(sparse[0]) is not None
    assert len(sparse[0]._forward_hooks) + len(sparse[0]._forward_pre_hooks) == 1


def test_legacy_weight_norm_pre_hook_is_skipped() -> None:
    model = _hooked_model("none")
    with pytest.warns(FutureWarning):
        model[0] = nn.utils.weight_norm(model[0])
    lp = rmtprune.plan(model, rmtprune.CompressionConfig(**FULL)).layers[0]
    assert lp.action == "skip" and "weight_norm hook" in lp.reason


# ---------------------------------------------------------------- full rank is exact
def _conv1d_transformers() -> nn.Module:
    transformers_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = transformers_utils.Conv1D(14, 20)  # nf=14 outputs, nx=20 inputs
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


_Quantizable = nn.modules.linear.NonDynamicallyQuantizableLinear
CASES = {
    "linear": (lambda: nn.Linear(20, 12), (5, 20)),
    "linear-no-bias-3d-input": (lambda: nn.Linear(12, 20, bias=False), (2, 5, 12)),
    "linear-subclass-mha-out-proj": (lambda: _Quantizable(16, 16), (3, 16)),
    "conv1d": (lambda: nn.Conv1d(6, 12, 3), (2, 6, 17)),
    "conv1d-stride-pad-dilation": (lambda: nn.Conv1d(6, 12, 5, stride=2, padding=3, dilation=2), (2, 6, 19)),
    "conv1d-same-even-kernel": (lambda: nn.Conv1d(6, 12, 4, padding="same"), (2, 6, 13)),
    "conv1d-circular": (lambda: nn.Conv1d(6, 12, 3, padding=2, padding_mode="circular"), (2, 6, 11)),
    "conv1d-no-bias": (lambda: nn.Conv1d(6, 12, 3, bias=False), (2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 12, 3), (2, 3, 9, 9)),
    "conv2d-stride-padding": (lambda: nn.Conv2d(4, 12, 3, stride=2, padding=1), (2, 4, 9, 10)),
    "conv2d-non-square": (
        lambda: nn.Conv2d(4, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (2, 4, 9, 11),
    ),
    "conv2d-same-dilated": (lambda: nn.Conv2d(4, 12, (4, 3), padding="same", dilation=(1, 2)), (2, 4, 8, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(4, 12, 3, padding=1, padding_mode="reflect"), (2, 4, 8, 8)),
    "conv2d-circular": (
        lambda: nn.Conv2d(4, 12, (3, 5), padding=(1, 2), padding_mode="circular"),
        (2, 4, 7, 8),
    ),
    "conv2d-replicate-stride": (
        lambda: nn.Conv2d(4, 12, 3, stride=2, padding=2, padding_mode="replicate"),
        (2, 4, 9, 9),
    ),
    "conv2d-no-bias": (lambda: nn.Conv2d(4, 12, 3, bias=False), (2, 4, 6, 6)),
    "conv2d-subclass-init-only": (lambda: PresetConv2d(4, 12), (2, 4, 8, 8)),
    "transformers-conv1d": (_conv1d_transformers, (2, 5, 20)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_factoring_reproduces_the_dense_output(case: str, dtype: torch.dtype) -> None:
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(factory()).to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    before = model(x).detach()
    _, report = rmtprune.compress(model, **FULL)
    lp = report.layers[0]
    assert lp.action == "factor" and lp.rank == min(lp.matrix_shape), (lp.action, lp.reason)
    assert isinstance(model[0], LowRankModule)
    assert model[0].first.weight.dtype == dtype
    after = model(x).detach()
    assert after.shape == before.shape
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    scale = before.abs().max().item()
    assert (after - before).abs().max().item() <= tol * max(scale, 1.0)


def test_registered_subclass_with_own_forward_is_exact_at_full_rank() -> None:
    register_handler(TracedLinear)
    torch.manual_seed(0)
    model = nn.Sequential(TracedLinear(20, 12)).double().eval()
    x = torch.randn(4, 20, dtype=torch.float64)
    before = model(x).detach()
    _, report = rmtprune.compress(model, **FULL)
    assert report.layers[0].action == "factor" and report.layers[0].layer_type == "TracedLinear"
    assert torch.allclose(model(x), before, atol=1e-12)


# ---------------------------------------------------------------- dtypes and torch.compile
def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 48),
        nn.ReLU(),
        nn.Linear(48, 10),
    ).eval()


HALF_CUT = {"rule": "fixed", "ratio": 0.5, "factor_only_if_smaller": False, "protect_last": False}
HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bfloat16", "float16"]
#: Relative error of one rounding, and a margin for the few layers and sums of the tiny CNN.
_EPS = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, mult: float = 16) -> bool:
    return (a.float() - b.float()).abs().max().item() <= mult * _EPS[dtype] * b.float().abs().max().item()


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_compressed_and_sparsified_models_cast_to_half_precision(dtype: torch.dtype) -> None:
    x = torch.randn(4, 3, 8, 8)
    model, _ = rmtprune.compress(_cnn(), **HALF_CUT)
    rmtprune.sparsify(model, rmtprune.SparsifyConfig(target=0.3, budget="uniform"), show_progress=False)
    ref = model(x).detach()
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if get_mask(m) is not None}
    assert masks
    casts = {
        "to": lambda m: m.to(dtype),
        "method": lambda m: m.bfloat16() if dtype == torch.bfloat16 else m.half(),
    }
    for how, cast in casts.items():
        low = cast(copy.deepcopy(model))
        assert {p.dtype for p in low.parameters()} == {dtype}, how
        for name, mask in masks.items():
            mod = low.get_submodule(name)
            assert get_mask(mod).dtype == torch.bool and torch.equal(get_mask(mod), mask)
            assert bool((mod.weight[~mask] == 0).all())
        out = low(x.to(dtype))
        assert out.dtype == dtype and _close(out, ref, dtype), how
        apply_masks(low)  # the masks still work on the cast weights


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_compressing_a_half_precision_model_decomposes_in_float64(dtype: torch.dtype) -> None:
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    dense = _cnn().to(dtype)
    before = dense(x).detach()
    model, report = rmtprune.compress(copy.deepcopy(dense), **FULL)
    assert all(lp.action == "factor" for lp in report.layers)
    for name in ("0", "2", "5", "7"):
        layer = model.get_submodule(name)
        assert layer.first.weight.dtype == dtype and layer.second.weight.dtype == dtype
        A, B = layer.factors()
        W = dense.get_submodule(name).weight.detach().double().reshape(A.shape[0], -1)
        # Factors of the float64 SVD rounded once each: the product is W to a few roundings.
        err = (A.double() @ B.double() - W).abs().max().item()
        assert err <= 8 * _EPS[dtype] * W.abs().max().item() * math.sqrt(A.shape[1])
    assert _close(model(x), before, dtype, mult=32)
    # Below full rank the factors are the float64 SVD's, cast once: the same as those of the
    # float32 copy of the same weights, to one rounding.
    cut, _ = rmtprune.compress(copy.deepcopy(dense), rule="fixed", ratio=0.5, protect_last=False)
    ref, _ = rmtprune.compress(copy.deepcopy(dense).float(), rule="fixed", ratio=0.5, protect_last=False)
    for (name, p), (_, q) in zip(cut.named_parameters(), ref.named_parameters(), strict=True):
        assert p.dtype == dtype
        assert (p.float() - q).abs().max().item() <= 2 * _EPS[dtype] * q.abs().max().item(), name


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_sparsifying_a_half_precision_model(dtype: torch.dtype) -> None:
    model = _cnn().to(dtype)
    config = rmtprune.SparsifyConfig(target=0.4, budget="uniform")
    _, report = rmtprune.sparsify(model, config, show_progress=False)
    assert abs(report.achieved - 0.4) < 0.01
    assert {p.dtype for p in model.parameters()} == {dtype}
    for mod in model.modules():
        if get_mask(mod) is not None:
            assert bool((mod.weight[~get_mask(mod)] == 0).all())
    assert torch.isfinite(model(torch.randn(2, 3, 8, 8, dtype=dtype)).float()).all()


# Inductor compiles here too (a C++ compiler is installed) but takes ~50 s for this model on 2
# cores; "aot_eager" runs the same Dynamo capture and AOTAutograd graph in seconds.
BACKEND = "aot_eager"


def test_torch_compile_runs_compressed_and_sparsified_models() -> None:
    torch._dynamo.reset()
    x = torch.randn(4, 3, 8, 8)
    model, _ = rmtprune.compress(_cnn(), **HALF_CUT)
    rmtprune.sparsify(model, rmtprune.SparsifyConfig(target=0.3, budget="uniform"), show_progress=False)
    eager = model(x).detach()
    compiled = torch.compile(model, backend=BACKEND)
    assert torch.allclose(compiled(x), eager, atol=1e-6)
    low = copy.deepcopy(model).to(torch.bfloat16)
    assert torch.allclose(torch.compile(low, backend=BACKEND)(x.bfloat16()), low(x.bfloat16()), atol=1e-2)


def test_compressing_an_already_compiled_model_recompiles() -> None:
    torch._dynamo.reset()
    x = torch.randn(4, 3, 8, 8)
    model = _cnn()
    compiled = torch.compile(model, backend=BACKEND)
    dense_out = compiled(x).detach()
    _, report = rmtprune.compress(compiled, **{**HALF_CUT, "ratio": 0.25})
    assert any(lp.action == "factor" for lp in report.layers)
    assert isinstance(model[0], LowRankModule)  # the surgery reached the wrapped model
    out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-6)
    assert not torch.allclose(out, dense_out, atol=1e-3)  # not a stale graph of the dense model


# ---------------------------------------------------------------- code that reads layer.weight
class ReadsWeightDtype(nn.Module):
    """Casts its input to the projection's ``weight.dtype`` as transformers' ViT does in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.head = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.to(self.proj.weight.dtype)).flatten(2).mean(-1)
        return F.linear(x, self.head.weight, self.head.bias)  # computes with the weight itself


def test_factored_layers_give_their_dense_weight_to_code_that_reads_it() -> None:
    torch.manual_seed(0)
    model = ReadsWeightDtype().double().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x).detach()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("proj", "head")}
    rmtprune.compress(model, **FULL)
    assert isinstance(model.proj, LowRankModule) and isinstance(model.head, LowRankModule)
    for name, w in dense.items():
        got = model.get_submodule(name).weight
        assert got.shape == w.shape and got.dtype == w.dtype and torch.allclose(got, w, atol=1e-12)
    assert torch.allclose(model(x), before, atol=1e-12)
    with pytest.raises(AttributeError):
        model.head.weight = torch.zeros(12, 16, dtype=torch.float64)
    with pytest.raises(KeyError, match="already exists"):
        model.head.weight = nn.Parameter(torch.zeros(12, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask the factors"):
        rmtprune.masks.set_mask(model.head, torch.ones(12, 16, dtype=torch.bool))


def test_factored_conv1d_weight_keeps_the_transposed_layout() -> None:
    layer = _conv1d_transformers()  # weight stored in x out: 20 x 14
    model = nn.Sequential(layer).double()
    w = layer.weight.detach().clone()
    rmtprune.compress(model, **FULL)
    assert model[0].transposed and torch.allclose(model[0].weight, w, atol=1e-12)
    rmtprune.compress(model, rule="fixed", ratio=0.5, protect_last=False)  # a re-cut keeps it
    assert model[0].transposed and model[0].rank == 7 and model[0].weight.shape == (20, 14)
