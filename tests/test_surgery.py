"""plan / apply / compress: planted ranks, exactness, re-cut, skips, bad input, restore on failure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune import CompressionConfig, LowRankConv2d, LowRankLinear
from rmtprune._validate import check_number
from rmtprune.errors import InvalidWeightsError, RmtpruneError
from rmtprune.spectral import RULES, RankDecision, RankRule, RuleParam, fit_censored, register_rule
from rmtprune.surgery import (
    LayerHandler,
    LinearHandler,
    Plan,
    TransposedLinearHandler,
    handler_for,
    register_handler,
)

SIGMA = 0.02


def planted(m: int, n: int, r: int, seed: int, sigma: float = SIGMA) -> torch.Tensor:
    """sigma * Gaussian noise plus r spikes at 3-6x the MP edge ``sigma (sqrt(m) + sqrt(n))``."""
    g = torch.Generator().manual_seed(seed)
    W = sigma * torch.randn(m, n, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(3.0, 6.0, r, dtype=torch.float64) * sigma * (math.sqrt(m) + math.sqrt(n))
    return (W + U @ torch.diag(s) @ V.T).float()


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(32 * 4 * 4, 60)
        self.head = nn.Linear(60, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(torch.relu(self.fc(x)))


def planted_mlp(ranks=(6, 4), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 150), nn.ReLU(), nn.Linear(150, 10))
    with torch.no_grad():
        net[0].weight.copy_(planted(200, 300, ranks[0], seed + 1))
        net[2].weight.copy_(planted(150, 200, ranks[1], seed + 2))
    return net


def planted_cnn(rank=5, seed=0) -> TinyCNN:
    torch.manual_seed(seed)
    net = TinyCNN()
    with torch.no_grad():
        net.conv2.weight.copy_(planted(32, 144, rank, seed + 3).reshape(32, 16, 3, 3))
        net.fc.weight.copy_(planted(60, 512, rank + 2, seed + 4))
    return net


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snap: dict) -> bool:
    sd = model.state_dict()
    return set(sd) == set(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


# ---------------------------------------------------------------------- the default rule finds planted ranks
# The Tracy-Widom margin is the (1 - beta) quantile of the top noise value: at the default beta=0.1
# one noise value crosses the edge in ~10% of layers, so the default rule may keep planted + 1; at
# beta=0.01 the planted rank is found exactly.
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_rule_cuts_mlp_to_planted_rank(seed: int) -> None:
    net = planted_mlp((6, 4), seed)
    p = rmtprune.plan(net)
    for name, r in (("0", 6), ("2", 4)):
        assert p[name].action == "factor" and r <= p[name].rank <= r + 1
        assert p[name].rank == p[name].n_spikes
    strict = rmtprune.plan(net, CompressionConfig(beta=0.01))
    assert (strict["0"].rank, strict["2"].rank) == (6, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_rule_cuts_cnn_to_planted_rank(seed: int) -> None:
    net = planted_cnn(5, seed)
    p = rmtprune.plan(net)
    assert p["conv2"].action == "factor" and 5 <= p["conv2"].rank <= 6
    assert p["fc"].action == "factor" and 7 <= p["fc"].rank <= 8
    assert p["head"].action == "keep" and "too small" in p["head"].reason
    strict = rmtprune.plan(net, CompressionConfig(beta=0.01))
    assert (strict["conv2"].rank, strict["fc"].rank) == (5, 7)


# ---------------------------------------------------------------------- plan is read-only, serializable
def test_plan_does_not_modify_model_and_round_trips() -> None:
    net = planted_cnn()
    snap = snapshot(net)
    net.train()
    p = rmtprune.plan(net, example_input=torch.randn(2, 3, 16, 16), keep_svd=True)
    assert same_state(net, snap) and net.training and isinstance(net.conv2, nn.Conv2d)
    q = Plan.from_json(p.to_json())
    assert q.to_dict() == p.to_dict()
    assert [lp.name for lp in q] == ["conv1", "conv2", "fc", "head"]
    assert p["conv2"].macs_before == 32 * 144 * 8 * 8  # 16x16 -> stride 2, dilation 2 -> 8x8
    assert p["conv2"].macs_after == 5 * (32 + 144) * 8 * 8
    assert p.model_params_after < p.model_params_before
    assert "conv2" in p.table() and "| conv2 |" in p.to_markdown()


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_compress_reproduces_outputs(dtype: torch.dtype) -> None:
    net = planted_cnn().to(dtype)
    x = torch.randn(3, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        y = net(x)
    cfg = CompressionConfig(rule="fixed", ratio=1.0, factor_only_if_smaller=False, ks_max=math.inf)
    _, report = rmtprune.compress(net, cfg)
    assert [lp.action for lp in report] == ["factor"] * 3 + ["keep"]  # head: p=5 is too small
    assert isinstance(net.conv2, LowRankConv2d) and net.conv2.first.weight.dtype == dtype
    assert net.conv2.stride == (2, 2) and net.conv2.dilation == (2, 2) and net.conv2.padding == (2, 2)
    with torch.no_grad():
        err = (net(x) - y).abs().max().item()
    assert err <= (1e-4 if dtype == torch.float32 else 1e-10) * y.abs().max().item()


def test_after_compress_forward_backward_and_step_work() -> None:
    net = planted_mlp()
    _, rep = rmtprune.compress(net)
    assert isinstance(net[0], LowRankLinear) and net[0].rank == rep["0"].rank >= 6
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 300), torch.randint(0, 10, (8,))
    before = net[0].first.weight.detach().clone()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert not torch.equal(before, net[0].first.weight)
    assert torch.isfinite(net(x)).all()


def test_weight_error_is_frobenius_tail_through_compress() -> None:
    net = planted_mlp()
    W = net[2].weight.detach().double().clone()
    s = torch.linalg.svdvals(W)
    rmtprune.compress(net, rule="fixed", rank=9, include=["2"])
    err = torch.linalg.matrix_norm(net[2].dense_weight().double() - W).item()
    assert err == pytest.approx(s[9:].square().sum().sqrt().item(), rel=1e-5)


# ---------------------------------------------------------------------- re-cut
def test_recut_is_consistent_with_direct_cut() -> None:
    a, b = planted_mlp(), planted_mlp()
    rmtprune.compress(a, rule="fixed", rank=12, include=["0", "2"])
    _, rep = rmtprune.compress(a, rule="fixed", rank=5)
    rmtprune.compress(b, rule="fixed", rank=5)
    assert rep["0"].layer_type == "LowRankLinear" and rep["0"].rank_before == 12 and rep["0"].rank == 5
    assert rep["4"].action == "keep" and "protect_last" in rep["4"].reason
    for name in ("0", "2"):
        wa, wb = a.get_submodule(name).dense_weight(), b.get_submodule(name).dense_weight()
        assert torch.allclose(wa, wb, atol=1e-5)


def test_compressing_twice_with_the_default_rule_is_stable() -> None:
    net = planted_mlp()
    _, first = rmtprune.compress(net)
    x = torch.randn(4, 300)
    with torch.no_grad():
        y = net(x)
    _, rep = rmtprune.compress(net)
    assert all(lp.action == "keep" for lp in rep)
    assert net[0].rank == first["0"].rank and net[2].rank == first["2"].rank
    with torch.no_grad():
        assert torch.equal(net(x), y)


def test_recut_with_shrinking_bulk_fraction_refits_the_bulk() -> None:
    net = planted_mlp()
    _, first = rmtprune.compress(net, keep_bulk=0.4, beta=0.01)
    assert first["0"].rank == 6 + math.floor(0.4 * 194)
    _, second = rmtprune.compress(net, keep_bulk=0.2, beta=0.01)
    lp = second["0"]
    assert lp.action == "factor" and lp.n_spikes == 6 and lp.rank == 6 + math.floor(0.2 * 194)
    assert lp.sigma2 == pytest.approx(first["0"].sigma2, rel=0.05)  # censored refit of the same bulk
    assert net[0].rank == lp.rank


def test_censored_fit_equals_plain_fit_when_nothing_in_window_was_cut() -> None:
    s = torch.linalg.svdvals(planted(100, 200, 3, 5).double()).numpy()
    full = rmtprune.fit_bulk(s, (100, 200))
    cut = fit_censored(s[:80], (100, 200), 0.25, 0.1)  # p - k = 20 < ceil(0.25 p)
    assert cut.sigma2 == pytest.approx(full.sigma2, rel=1e-12) and cut.n_spikes == full.n_spikes
    assert fit_censored(s[:4], (100, 200), 0.25, 0.1) is None


# ---------------------------------------------------------------------- actions and skips
def test_dense_truncate_or_keep_when_factoring_does_not_pay() -> None:
    net = planted_mlp()
    cfg = dict(rule="fixed", ratio=0.9, include=["0"])
    p = rmtprune.plan(net, CompressionConfig(**cfg))
    assert p["0"].action == "keep" and "would not save parameters" in p["0"].reason
    _, rep = rmtprune.compress(net, CompressionConfig(**cfg, dense_truncate=True))
    assert rep["0"].action == "dense-truncate" and isinstance(net[0], nn.Linear)
    s = torch.linalg.svdvals(net[0].weight.detach().double())
    assert s[179] > 1e-3 * s[0] and s[180] < 1e-5 * s[0]
    assert rep["2"].action == "skip" and "include" in rep["2"].reason


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 20)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)
        self.attn = nn.MultiheadAttention(20, 2)
        self.fc = nn.Linear(20, 30)
        self.conv3 = nn.Conv3d(2, 3, 2)


def test_unsupported_layers_are_skipped_with_a_reason() -> None:
    p = rmtprune.plan(Odd(), CompressionConfig(exclude=["fc"]))
    reasons = {lp.name: (lp.action, lp.reason) for lp in p}
    assert reasons["emb"] == ("skip", "unsupported layer type Embedding")
    assert reasons["grouped"][0] == "skip" and "groups=2" in reasons["grouped"][1]
    assert reasons["attn"][0] == "skip" and "MultiheadAttention" in reasons["attn"][1]
    assert "attn.out_proj" not in reasons
    assert reasons["fc"] == ("skip", "excluded by pattern 'fc'")
    assert reasons["conv3"] == ("skip", "unsupported layer type Conv3d")


def _parametrize(module: nn.Module, kind: str) -> nn.Module:
    import warnings

    from torch.nn.utils import parametrizations, prune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old-style hooks are deprecated
        if kind == "weight_norm":
            return parametrizations.weight_norm(module)
        if kind == "spectral_norm":
            return parametrizations.spectral_norm(module)
        if kind == "old_weight_norm":
            return torch.nn.utils.weight_norm(module)
        if kind == "old_spectral_norm":
            return torch.nn.utils.spectral_norm(module)
        prune.l1_unstructured(module, "weight", 0.3)
        return module


@pytest.mark.parametrize(
    "kind,words",
    [
        ("weight_norm", "parametrized weight (weight: weight_norm): remove the parametrization first"),
        ("spectral_norm", "parametrized weight (weight: spectral_norm)"),
        ("old_weight_norm", "weight_norm hook on 'weight': call torch.nn.utils.remove_weight_norm"),
        ("old_spectral_norm", "spectral_norm hook on 'weight'"),
        ("prune", "pruned with torch.nn.utils.prune: call prune.remove"),
    ],
)
def test_parametrized_layers_are_skipped_not_stripped(kind: str, words: str) -> None:
    net = planted_mlp()
    net[0] = _parametrize(net[0], kind)
    keys = set(net[0].state_dict())
    params = {k: v.detach().clone() for k, v in net[0].named_parameters()}
    model, rep = rmtprune.compress(net)
    assert rep["0"].action == "skip" and words in rep["0"].reason
    assert rep["2"].action == "factor"  # the plain layers are still cut
    assert model[0] is net[0] and not isinstance(model[0], LowRankLinear)
    # Still parametrized, its own tensors untouched (spectral_norm's power-iteration buffers move
    # whenever the weight is read in train mode, so only the parameters are compared).
    assert set(model[0].state_dict()) == keys
    after = dict(model[0].named_parameters())
    assert after.keys() == params.keys() and all(torch.equal(params[k], after[k]) for k in params)


def test_parametrized_factor_of_a_low_rank_layer_is_skipped() -> None:
    net = planted_mlp()
    rmtprune.compress(net)
    assert isinstance(net[0], LowRankLinear)
    net[0].first = _parametrize(net[0].first, "weight_norm")
    p = rmtprune.plan(net)
    assert p["0"].action == "skip" and p["0"].reason.startswith(
        "factor ParametrizedLinear: parametrized weight"
    )


def test_apply_refuses_a_plan_made_before_the_layer_was_parametrized() -> None:
    net = planted_mlp()
    p = rmtprune.plan(net)
    assert p["0"].action == "factor"
    net[0] = _parametrize(net[0], "old_weight_norm")  # same type name: only the hook differs
    with pytest.raises(
        ValueError, match="the plan does not match the model: layer '0' has a weight_norm hook"
    ):
        rmtprune.apply(net, p)
    assert not isinstance(net[0], LowRankLinear) and not isinstance(net[2], LowRankLinear)


def test_patterns_matching_nothing_warn() -> None:
    with pytest.warns(UserWarning) as record:
        p = rmtprune.plan(planted_mlp(), CompressionConfig(include=["0", "nope"], overrides={"zz": {}}))
    expected = ["include pattern 'nope' matches no layer", "override pattern 'zz' matches no layer"]
    assert p.warnings == expected and [str(w.message) for w in record] == expected


# ---------------------------------------------------------------------- bad input
def test_nan_weights_name_the_layer_and_leave_the_model() -> None:
    net = planted_mlp()
    with torch.no_grad():
        net[2].weight[3, 4] = float("nan")
    snap = snapshot(net)
    with pytest.raises(InvalidWeightsError, match="layer '2' has NaN or Inf"):
        rmtprune.compress(net)
    assert isinstance(net[0], nn.Linear) and isinstance(net[2], nn.Linear)
    sd = net.state_dict()
    assert all(torch.allclose(sd[k], snap[k], equal_nan=True) for k in snap)


def test_rank_larger_than_possible_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"rank=250 must be in \[1, 200\].*layer '0'"):
        rmtprune.plan(planted_mlp(), CompressionConfig(rule="fixed", rank=250))


def test_model_without_prunable_layer() -> None:
    with pytest.raises(RmtpruneError, match="has no prunable layer"):
        rmtprune.plan(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="unknown config field"):
        rmtprune.compress(planted_mlp(), keepbulk=0.3)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        rmtprune.plan("model")  # type: ignore[arg-type]


def test_apply_restores_every_layer_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    net = planted_cnn()
    snap = snapshot(net)
    p = rmtprune.plan(net)
    changed = [lp.name for lp in p if lp.changes]
    assert "conv2" in changed and changed[-1] == "fc"
    orig = LinearHandler.build

    def boom(self, module, A, B):  # fails on the second layer to cut (fc), after conv2 was replaced
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(LinearHandler, "build", boom)
    with pytest.raises(RuntimeError, match="simulated failure"):
        rmtprune.apply(net, p)
    assert isinstance(net.conv2, nn.Conv2d) and same_state(net, snap) and not p.applied
    monkeypatch.setattr(LinearHandler, "build", orig)
    rmtprune.apply(net, p)
    assert isinstance(net.conv2, LowRankConv2d) and p.applied
    with pytest.raises(ValueError, match="already applied"):
        rmtprune.apply(net, p)


def test_apply_rejects_a_plan_for_another_model() -> None:
    p = rmtprune.plan(planted_mlp())
    other = nn.Sequential(nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 150), nn.ReLU(), nn.Linear(150, 10))
    with pytest.raises(ValueError, match="layer '0' has matrix"):
        rmtprune.apply(other, p)
    with pytest.raises(ValueError, match="layer '0' is missing"):
        rmtprune.apply(nn.Sequential(), p)


def test_apply_recomputes_the_svd_when_weights_changed_after_plan() -> None:
    net = planted_mlp()
    p = rmtprune.plan(net, keep_svd=True)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    W = net[0].weight.detach().double().clone()
    rmtprune.apply(net, p)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    k = p["0"].rank
    ref = (U[:, :k] * s[:k]) @ Vh[:k]
    assert torch.allclose(net[0].dense_weight().double(), ref, atol=1e-4)


def test_trainability_and_mode_are_carried_over() -> None:
    net = planted_mlp()
    net[0].weight.requires_grad_(False)
    net.eval()
    rmtprune.compress(net)
    assert not net[0].first.weight.requires_grad and net[0].second.bias.requires_grad
    assert net[2].first.weight.requires_grad and not net[0].training


# ---------------------------------------------------------------------- registry, transposed weights
class FakeConv1D(nn.Module):
    """Mimics transformers' Conv1D: weight stored ``in x out``, ``y = x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_registered_transposed_linear_is_compressed() -> None:
    register_handler(FakeConv1D, TransposedLinearHandler())
    layer = FakeConv1D(120, 200)
    with torch.no_grad():
        layer.weight.copy_(planted(120, 200, 5, 9).T)
        layer.bias.normal_()
    net = nn.Sequential(layer)
    x = torch.randn(3, 200)
    _, rep = rmtprune.compress(net, protect_last=False)
    assert rep["0"].matrix_shape == (120, 200) and rep["0"].rank == 5
    assert isinstance(net[0], LowRankLinear) and net[0].original_type == "FakeConv1D"
    with torch.no_grad():
        y = layer(x)
    full = nn.Sequential(layer)
    rmtprune.compress(
        full, rule="fixed", ratio=1.0, factor_only_if_smaller=False, ks_max=math.inf, protect_last=False
    )
    with torch.no_grad():
        assert torch.allclose(full(x), y, atol=1e-4)
    with pytest.raises(TypeError, match="must be an nn.Module subclass"):
        register_handler(int, LayerHandler())


def test_transformers_conv1d_when_installed() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(60, 40)
    assert isinstance(handler_for(layer), TransposedLinearHandler)


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 30)
        self.fc = nn.Linear(30, 30)
        self.again = self.fc  # the same module under a second name
        self.out = nn.Linear(30, 40, bias=False)
        self.out.weight = self.emb.weight  # tied to the embedding
        self.last = nn.Linear(40, 12)


def test_shared_weights_and_modules_are_skipped_not_untied() -> None:
    p = rmtprune.plan(TiedHead(), CompressionConfig(rule="fixed", rank=2))
    assert (
        p["out"].action == "skip"
        and p["out"].reason == "weight is tied to 'emb'; cutting it would untie them"
    )
    assert p["fc"].action == "skip" and "registered under several names ('fc', 'again')" in p["fc"].reason
    assert p["last"].action == "keep" and "protect_last" in p["last"].reason


def test_float32_svd_gives_the_same_ranks() -> None:
    a, b = planted_mlp(), planted_mlp()
    _, r64 = rmtprune.compress(a)
    _, r32 = rmtprune.compress(b, svd_dtype="float32")
    assert [lp.rank for lp in r64] == [lp.rank for lp in r32]
    assert torch.allclose(a[0].dense_weight(), b[0].dense_weight(), atol=1e-4)


# ---------------------------------------------------------------------- the resolved config is on the plan
def test_plan_records_the_resolved_svd_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    net = planted_mlp()
    p = rmtprune.plan(net, CompressionConfig(overrides={"2": {"svd_dtype": "float32"}}))
    assert (p["0"].svd_dtype, p["2"].svd_dtype, p["4"].svd_dtype) == ("float64", "float32", "float64")
    q = Plan.from_json(p.to_json())
    assert q.to_dict() == p.to_dict() and q["2"].svd_dtype == "float32"

    def boom(self, name):
        raise AssertionError("apply went back to the config")

    monkeypatch.setattr(CompressionConfig, "for_layer", boom)
    rmtprune.apply(net, q)
    assert isinstance(net[2], LowRankLinear) and net[2].rank == p["2"].rank


# ---------------------------------------------------------------------- a rule of one's own, end to end
class TopShare(RankRule):
    """Keep the top ``share`` of the singular values (a rule with a parameter that is no config field)."""

    parameters = {"share": RuleParam(0.5, lambda name, v: check_number(name, v, 0.0, 1.0, lo_open=True))}

    def select(self, s, shape, fit=None) -> RankDecision:
        p = min(shape)
        rank = max(1, int(self.share * p))
        return RankDecision(self.name, rank, p, params=self.params(), reason=f"top {self.share:g} of p={p}")


def test_a_registered_rule_compresses_a_model() -> None:
    register_rule("top_share", TopShare)
    try:
        cfg = CompressionConfig(
            rule="top_share", rule_params={"share": 0.25}, overrides={"2": {"rule_params": {"share": 0.1}}}
        )
        assert CompressionConfig.from_json(cfg.to_json()) == cfg
        net = planted_mlp()
        _, rep = rmtprune.compress(net, cfg)
        assert (net[0].rank, net[2].rank) == (50, 15) and rep["4"].action == "keep"
        assert rep["0"].decision["params"] == {"share": 0.25} and rep["0"].reason == "top 0.25 of p=200"
        with pytest.raises(ValueError, match=r"share=2 must be in \(0, 1\]"):
            CompressionConfig(rule="top_share", rule_params={"share": 2})
        with pytest.raises(TypeError, match="bad parameters for rule 'top_share'"):
            CompressionConfig(rule="top_share", rule_params={"shar": 0.5})
    finally:
        RULES.pop("top_share", None)


# ---------------------------------------------------------------------- the output layer
def test_protect_last_follows_the_output_layer_rule_of_hugging_face_models() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    bert = dict(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(**bert))
    p = rmtprune.plan(base, CompressionConfig(rule="fixed", rank=2))
    # A base model has no output layer: its unused pooler is an ordinary layer, not "(logits) kept".
    assert p["pooler.dense"].action == "factor" and "protect_last" not in p["pooler.dense"].reason
    head = transformers.BertForSequenceClassification(transformers.BertConfig(**bert, num_labels=12))
    q = rmtprune.plan(head, CompressionConfig(rule="fixed", rank=2))
    assert q["classifier"].action == "keep"
    assert q["classifier"].reason == "fixed rank 2; last prunable layer (logits) kept: protect_last=True"
    assert q["classifier"].fit is not None and q["classifier"].decision["rank"] == 2  # analysed, reported
    assert q["bert.pooler.dense"].action == "factor"


# ---------------------------------------------------------------------- the inverse and the check
def test_densify_undoes_factoring_with_the_same_outputs_and_types() -> None:
    net = planted_cnn()
    types = {name: type(m) for name, m in net.named_modules()}
    net.conv2.weight.requires_grad_(False)
    net.eval()
    assert not rmtprune.is_compressed(net)
    rmtprune.compress(net, rule="fixed", ratio=0.5, factor_only_if_smaller=False, ks_max=math.inf)
    assert rmtprune.is_compressed(net) and isinstance(net.conv2, LowRankConv2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = net(x)
    assert rmtprune.densify(net) is net
    assert not rmtprune.is_compressed(net)
    assert {name: type(m) for name, m in net.named_modules()} == types
    assert net.conv2.stride == (2, 2) and net.conv2.dilation == (2, 2) and net.conv2.padding == (2, 2)
    assert not net.conv2.weight.requires_grad and net.conv2.bias.requires_grad and not net.conv2.training
    with torch.no_grad():
        assert torch.allclose(net(x), y, atol=1e-5)


def test_densify_rebuilds_a_registered_transposed_type_and_shared_modules() -> None:
    register_handler(FakeConv1D, TransposedLinearHandler())
    layer = FakeConv1D(40, 30)
    with torch.no_grad():
        layer.weight.normal_()
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(40, 40))
    net.again = net[2]  # one module under two names
    rmtprune.compress(net, rule="fixed", rank=3, protect_last=False)
    assert isinstance(net[0], LowRankLinear) and net[0].original_type == "FakeConv1D"
    x = torch.randn(5, 30)
    with torch.no_grad():
        y = net(x)
    rmtprune.densify(net)
    assert type(net[0]) is FakeConv1D and tuple(net[0].weight.shape) == (30, 40)
    with torch.no_grad():
        assert torch.allclose(net(x), y, atol=1e-5)


def test_densify_removes_masks_and_refuses_what_it_cannot_rebuild() -> None:
    from rmtprune.masks import set_mask

    net = planted_mlp()
    set_mask(net[0], net[0].weight.abs() > 0.01)
    assert rmtprune.is_compressed(net)
    rmtprune.densify(net)
    assert not rmtprune.is_compressed(net) and (net[0].weight == 0).any()
    odd = nn.Sequential(LowRankLinear(20, 10, 2))
    odd[0].original_type = "Bilinear"
    with pytest.raises(ValueError, match="layer '0' replaced a Bilinear, which densify cannot rebuild"):
        rmtprune.densify(odd)
    assert isinstance(odd[0], LowRankLinear)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        rmtprune.is_compressed("model")  # type: ignore[arg-type]
