"""rmtprune.analyze(model): the analyze stage that plan, sparsify, the pruner and reports consume."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.analysis import ModelAnalysis, analyze, analyze_tensor
from rmtprune.config import CompressionConfig, FitConfig
from rmtprune.layers import collect_layers, output_layer


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 120), nn.ReLU(), nn.Linear(120, 5))


def test_analyze_matches_analyze_tensor_on_every_dense_layer() -> None:
    model = _mlp()
    res = analyze(model, method="gram")
    assert isinstance(res, ModelAnalysis) and len(res) == 3
    for la in res:
        ref = analyze_tensor(la.name, la.module.weight)
        assert la.verdict == ref.verdict and la.message == ref.message
        if ref.fit is not None:
            assert la.fit.n_spikes == ref.fit.n_spikes
            np.testing.assert_allclose(la.fit.sigma2, ref.fit.sigma2, rtol=1e-9)
    assert res["4"].verdict == "too-small" and res.output_layer == "4"


def test_analyze_fit_config_and_selection() -> None:
    model = _mlp()
    with torch.no_grad():  # column scales 0.5..1.5: no MP bulk under the pure test ks_max = 0 (gate.py)
        model[0].weight.mul_(torch.linspace(0.5, 1.5, 300))
        model[2].weight.mul_(torch.linspace(0.5, 1.5, 200))
    gated = analyze(model, FitConfig(ks_max=0.0))
    assert gated["0"].verdict == "no-mp-bulk" and "ks_max=0.0" in gated["0"].message
    part = analyze(model, include=["2"])
    assert [la.verdict for la in part] == ["skip", "fit", "skip"]
    assert "not matched by include" in part["0"].message
    cfg = CompressionConfig(exclude=["0"], overrides={"2": {"ks_max": 0.0}})
    per_layer = analyze(model, cfg)
    assert per_layer["0"].verdict == "skip" and per_layer["2"].verdict == "no-mp-bulk"
    assert per_layer.counts()["skip"] == 1


def test_analyze_reports_nan_layers_without_raising() -> None:
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    res = analyze(model)
    assert res["0"].verdict == "invalid" and "NaN" in res["0"].message
    assert res["2"].verdict == "fit"


def test_analyze_includes_factored_layers() -> None:
    model = _mlp()
    rmtprune.compress(model, rule="fixed", rank=40, protect_last=False)
    res = analyze(model)
    la = res["0"]
    assert la.factored and la.rank == 40 and la.matrix_shape == (200, 300)
    assert la.s.shape == (200,) and np.all(la.s[40:] == 0)  # cut values read as zeros
    assert la.verdict in ("fit", "no-mp-bulk")
    text = res.table()
    assert "LowRankLinear" in text and "200x300" in text


def test_analyze_skips_unsupported_and_is_readonly() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Embedding(100, 64))
    before = [p.clone() for p in model.parameters()]
    res = analyze(model)
    assert res["1"].verdict == "skip" and "unsupported layer type Embedding" in res["1"].message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert res.to_dict()["counts"]["skip"] == 1


class _HeadlessBase(nn.Module):
    """Shaped like a Hugging Face base model: no output head, an unused pooler last."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, 64)
        self.pooler = nn.Linear(64, 64)

    @property
    def base_model(self) -> nn.Module:
        return self

    def get_output_embeddings(self) -> nn.Module | None:
        return None


class _WithHead(_HeadlessBase):
    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(64, 100)
        self.extra = nn.Linear(64, 64)  # registered after the head: the head is still the output

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_output_layer_rule() -> None:
    assert output_layer(_mlp()) == ("4", "last prunable layer (logits)")
    name, why = output_layer(_HeadlessBase())
    assert name is None and "base model without a head" in why
    assert output_layer(_WithHead())[0] == "lm_head"
    entries = collect_layers(_WithHead())
    assert [e.name for e in entries] == ["encoder", "pooler", "lm_head", "extra"]


def test_no_public_function_is_shadowed_by_a_submodule() -> None:
    """Importing every submodule must leave each public name of ``rmtprune`` what it was."""
    for info in pkgutil.walk_packages(rmtprune.__path__, "rmtprune."):
        if info.name in ("rmtprune.__main__",):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:  # an optional extra that is not installed
            pytest.skip(f"{info.name}: {exc}")
    for name in rmtprune.__all__:
        value = getattr(rmtprune, name)
        assert not isinstance(value, type(rmtprune)), f"rmtprune.{name} is a module, not the public object"


def test_sparsify_config_then_sparsify_example() -> None:
    """The documented example that used to raise ``TypeError: 'module' object is not callable``."""
    cfg = rmtprune.SparsifyConfig(target=0.5)
    model = _mlp()
    rmtprune.sparsify(model, cfg)
    assert callable(rmtprune.sparsify)
