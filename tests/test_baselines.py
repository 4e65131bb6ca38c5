"""The real-model harness's compression baselines (``benchmarks/_baselines.py``), on tiny models.

Every model is built here (torch layers, or randomly initialised ``transformers`` configs);
nothing is downloaded.
"""

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

from rmtprune.lowrank import LowRankLinear  # noqa: E402

transformers = pytest.importorskip("transformers")

LOW_RANK = ["uniform_rank", "svd_llm", "asvd"]


# ------------------------------------------------------------------------------------------------
# tiny models


def mlp(seed: int = 0) -> nn.Sequential:
    """Three linear layers; the last one has a single output, where factoring never pays."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 1)).eval()


MLP_NAMES = ["0", "2", "4"]


def correlated_inputs(t: int, n: int, seed: int = 1) -> torch.Tensor:
    """``t x n`` inputs with a strongly anisotropic, correlated second moment."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[None, :]
    return torch.randn(t, n, generator=g) @ mix.T + 0.3


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def linear_names(model: nn.Module) -> list[str]:
    kinds = (nn.Linear, transformers.pytorch_utils.Conv1D)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and not n.endswith("lm_head")]


def token_batches(n_batches: int = 3, size: int = 4, length: int = 12, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, 60, (size, length), generator=g),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
        }
        for _ in range(n_batches)
    ]


def matrix(model: nn.Module, name: str) -> torch.Tensor:
    """The ``out x in`` weight of a layer, dense or factored (float64)."""
    mod = model.get_submodule(name)
    if isinstance(mod, LowRankLinear):
        return mod.dense_weight().detach().double()
    w = mod.weight.detach().double()
    return w if isinstance(mod, nn.Linear) else w.T


# ------------------------------------------------------------------------------------------------
# budgets


@pytest.mark.parametrize(
    "shapes",
    [
        [(40, 24), (16, 40), (1, 16)],
        [(96, 32), (32, 32), (128, 32), (32, 128)] * 2,
        [(7, 5), (300, 11), (64, 64), (2, 2)],
    ],
)
@pytest.mark.parametrize("keep", [0.15, 0.4, 0.7, 0.95])
def test_allocate_ranks_meets_the_budget_within_one_rank_step(shapes, keep):
    ranks = B.allocate_ranks(shapes, keep)
    target = keep * sum(m * n for m, n in shapes)
    cost = sum(m * n if r is None else r * (m + n) for (m, n), r in zip(shapes, ranks, strict=True))
    steps = [m + n for (m, n), r in zip(shapes, ranks, strict=True) if r is not None]
    assert cost <= target + 1e-9
    assert target - cost < max(steps)
    for (m, n), r in zip(shapes, ranks, strict=True):
        if m + n >= m * n:  # a single output / input, or 2 x 2: rank 1 stores as much as dense
            assert r is None
        else:
            assert r >= 1 and r * (m + n) < m * n


def test_allocate_ranks_is_the_uniform_rule_when_every_layer_factors():
    shapes = [(64, 32), (32, 32), (128, 32)]
    ranks = B.allocate_ranks(shapes, 0.5)
    for (m, n), r in zip(shapes, ranks, strict=True):  # floor(keep m n / (m + n)), at most one rank more
        assert math.floor(0.5 * m * n / (m + n)) <= r <= math.floor(0.5 * m * n / (m + n)) + 1


def test_allocate_ranks_edges():
    assert B.allocate_ranks([(64, 32), (1, 16)], 1.0) == [None, None]
    with pytest.raises(ValueError, match="too small"):
        B.allocate_ranks([(64, 32)], 0.01)
    with pytest.raises(ValueError, match="too small"):
        B.allocate_ranks([(1, 16)], 0.5)


@pytest.mark.filterwarnings("ignore:svd_llm")  # BERT's pooler sees 12 rows for 32 inputs: damped
@pytest.mark.parametrize("method", list(B.METHODS))
@pytest.mark.parametrize("keep", [0.35, 0.8])
@pytest.mark.parametrize("make", ["mlp", "bert", "gpt2", "llama"])
def test_stored_params_match_the_budget(method, keep, make):
    if make == "mlp":
        model, names = mlp(), MLP_NAMES
        batches = [correlated_inputs(64, 24)]
    else:
        model = {"bert": bert, "gpt2": gpt2, "llama": llama}[make]()
        names = linear_names(model)
        batches = token_batches()
        if make == "llama":  # as the harness calls it: token windows, no attention mask
            batches = [{"input_ids": b["input_ids"]} for b in batches]
    calib = B.collect_calibration(model, names, batches)
    dense = B.stored_params(model, names)
    assert dense == sum(B.dense_counts(model, names))
    target = B.budget(model, names, keep)
    B.METHODS[method](model, keep, names, calib)
    got = B.stored_params(model, names)
    if method == "magnitude":
        assert got == target
    elif method == "wanda":  # each row keeps round(keep * n): within half a weight per row
        rows = sum(matrix(model, n).shape[0] for n in names)
        assert abs(got - target) <= rows / 2
    else:
        step = max(sum(matrix(model, n).shape) for n in names)
        assert target - step < got <= target
        assert any(isinstance(model.get_submodule(n), LowRankLinear) for n in names)
    assert got < dense


# ------------------------------------------------------------------------------------------------
# calibration


def test_calibration_is_the_same_in_one_batch_or_many():
    model = mlp().double()  # float64 forward: deeper activations agree across batch sizes to rounding
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-8, 9, (60, 24), generator=g).double()  # integers: every float64 sum is exact
    one = B.collect_calibration(model, MLP_NAMES, [x])
    many = B.collect_calibration(model, MLP_NAMES, list(x.split([7, 20, 1, 32])))
    first, second = one["0"], many["0"]
    assert first.tokens == second.tokens == 60
    assert torch.equal(first.xtx, second.xtx) and torch.equal(first.abs_sum, second.abs_sum)
    assert torch.equal(first.xtx, x.double().T @ x.double())
    for name in MLP_NAMES[1:]:
        assert one[name].tokens == many[name].tokens == 60
        torch.testing.assert_close(one[name].xtx, many[name].xtx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one[name].abs_sum, many[name].abs_sum, rtol=1e-12, atol=1e-12)


def test_calibration_statistics_are_the_definitions():
    model = mlp()
    x = correlated_inputs(50, 24)
    stats = B.collect_calibration(model, ["2"], [x[:20], x[20:]])["2"]
    h = torch.relu(model[0](x)).double()
    torch.testing.assert_close(stats.xtx, h.T @ h)
    torch.testing.assert_close(stats.second_moment, h.T @ h / 50)
    torch.testing.assert_close(stats.l2_norm, h.norm(dim=0))
    torch.testing.assert_close(stats.mean_abs, h.abs().mean(0))
    fast = B.collect_calibration(model, ["2"], [x], matmul_dtype=torch.float32)["2"]
    torch.testing.assert_close(fast.xtx, stats.xtx, rtol=1e-5, atol=1e-4)


def test_calibration_leaves_padding_out():
    model = bert()
    name = "encoder.layer.0.attention.self.query"  # its input is per-token: embeddings + LayerNorm
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(1, 60, (1, 9), generator=g), torch.randint(1, 60, (1, 5), generator=g)
    padded = {
        "input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)]),
        "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4]),
    }
    alone = [{"input_ids": a, "attention_mask": torch.ones_like(a)}, {"input_ids": b}]
    one, two = B.collect_calibration(model, [name], [padded]), B.collect_calibration(model, [name], alone)
    assert one[name].tokens == two[name].tokens == 14
    torch.testing.assert_close(one[name].xtx, two[name].xtx, rtol=1e-6, atol=1e-6)
    with_pad = B.collect_calibration(model, [name], [{"input_ids": padded["input_ids"]}])
    assert with_pad[name].tokens == 18


def test_calibration_shares_one_product_between_layers_with_the_same_input():
    model = bert()
    names = [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    calib = B.collect_calibration(model, names, token_batches(1))
    assert torch.equal(calib[names[0]].xtx, calib[names[2]].xtx)
    assert calib[names[0]].xtx is not calib[names[1]].xtx  # separate accumulators
    assert model.training is False


# ------------------------------------------------------------------------------------------------
# methods


def test_wanda_per_row_sparsity_is_exact_and_keeps_the_highest_scores():
    model = gpt2()
    names = linear_names(model)
    calib = B.collect_calibration(model, names, token_batches())
    before = {n: matrix(model, n) for n in names}
    B.wanda(model, 0.4, names, calib)
    for name in names:
        W0, W = before[name], matrix(model, name)
        m, n = W.shape
        assert torch.equal((W != 0).sum(1), torch.full((m,), round(0.4 * n)))
        assert torch.equal(W[W != 0], W0[W != 0])  # kept weights unchanged
        score = W0.abs() * calib[name].l2_norm[None, :]
        kept = torch.where(W != 0, score, torch.inf).min(1).values
        dropped = torch.where(W == 0, score, -torch.inf).max(1).values
        assert bool((kept >= dropped).all())


def test_wanda_is_not_magnitude_when_activations_differ():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(100, 8) * torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 0.01])
    calib = B.collect_calibration(model, ["0"], [x])
    B.wanda(model, 0.5, ["0"], calib)
    W = model[0].weight
    assert bool((W[:, 0] != 0).all()) and bool((W[:, 7] == 0).all())


def test_magnitude_prunes_the_smallest_weights_globally():
    model = mlp()
    names = MLP_NAMES
    flat = torch.cat([matrix(model, n).flatten() for n in names]).abs()
    B.magnitude(model, 0.3, names)
    after = torch.cat([matrix(model, n).flatten() for n in names])
    kept = flat[after != 0]
    assert int((after != 0).sum()) == round(0.3 * flat.numel())
    assert float(kept.min()) >= float(flat[after == 0].max())
    assert not hasattr(model[0], "weight_orig") and not model[0]._forward_pre_hooks  # prune.remove'd


def output_error(W: torch.Tensor, Wc: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - Wc) @ X.T).norm())


def single(n_in: int = 24, n_out: int = 20, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out)).double().eval()


def test_svd_llm_is_the_optimal_output_error_and_beats_plain_svd():
    X = correlated_inputs(200, 24).double()
    dense = single()
    W = matrix(dense, "0")
    calib = B.collect_calibration(dense, ["0"], [X])
    errors = {}
    for method in LOW_RANK:
        model = copy.deepcopy(dense)
        B.METHODS[method](model, 0.4, ["0"], calib)
        assert model[0].rank == B.allocate_ranks([(20, 24)], 0.4)[0]
        errors[method] = output_error(W, matrix(model, "0"), X)
    r = model[0].rank
    S = torch.linalg.cholesky(X.T @ X)
    optimum = float(torch.linalg.svdvals(W @ S)[r:].norm())
    assert errors["svd_llm"] == pytest.approx(optimum, rel=1e-8)
    assert errors["svd_llm"] < 0.9 * errors["uniform_rank"]
    assert errors["svd_llm"] < errors["asvd"]


def test_svd_llm_equals_plain_svd_for_white_inputs():
    Q = torch.linalg.qr(torch.randn(64, 24, dtype=torch.float64))[0] * 3.0  # X^T X = 9 I
    dense = single()
    calib = B.collect_calibration(dense, ["0"], [Q])
    torch.testing.assert_close(calib["0"].xtx, 9 * torch.eye(24, dtype=torch.float64))
    plain, whitened = copy.deepcopy(dense), copy.deepcopy(dense)
    B.uniform_rank(plain, 0.5, ["0"])
    B.svd_llm(whitened, 0.5, ["0"], calib)
    torch.testing.assert_close(matrix(whitened, "0"), matrix(plain, "0"), rtol=1e-9, atol=1e-12)


def test_svd_llm_damps_a_singular_second_moment():
    X = correlated_inputs(10, 24).double()  # 10 tokens < 24 inputs: X^T X is singular
    dense = single()
    calib = B.collect_calibration(dense, ["0"], [X])
    model = copy.deepcopy(dense)
    with pytest.warns(UserWarning, match="damping"):
        B.svd_llm(model, 0.5, ["0"], calib)
    assert bool(torch.isfinite(matrix(model, "0")).all())
    S, lam = B.whitening(calib["0"].xtx)
    assert lam > 0 and bool(torch.isfinite(S).all())


def test_asvd_scales_columns_by_mean_abs_activation():
    X = correlated_inputs(200, 24).double()
    dense = single()
    calib = B.collect_calibration(dense, ["0"], [X])
    unscaled, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    B.asvd(unscaled, 0.5, ["0"], calib, alpha=0.0)  # S = 1: plain truncated SVD
    B.uniform_rank(plain, 0.5, ["0"])
    torch.testing.assert_close(matrix(unscaled, "0"), matrix(plain, "0"))
    model = copy.deepcopy(dense)
    B.asvd(model, 0.5, ["0"], calib)
    s = X.abs().mean(0).sqrt()
    W = matrix(dense, "0")
    U, sv, Vh = torch.linalg.svd(W * s[None, :], full_matrices=False)
    r = model[0].rank
    expected = (U[:, :r] * sv[:r]) @ Vh[:r] / s[None, :]
    torch.testing.assert_close(matrix(model, "0"), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", LOW_RANK)
def test_low_rank_is_lossless_at_keep_one_and_on_low_rank_weights(method):
    x = correlated_inputs(64, 24)
    model = mlp()
    ref = model(x)
    calib = B.collect_calibration(model, MLP_NAMES, [x])
    B.METHODS[method](model, 1.0, MLP_NAMES, calib)  # factoring cannot pay at the full budget
    assert torch.equal(model(x), ref)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in MLP_NAMES)

    model = mlp()  # every factored layer of true rank 3, below the rank the budget gives
    with torch.no_grad():
        for name in ("0", "2"):
            w = model.get_submodule(name).weight
            w.copy_(torch.randn(w.shape[0], 3) @ torch.randn(3, w.shape[1]) / 3)
    ref = model(x)
    calib = B.collect_calibration(model, MLP_NAMES, [x])
    B.METHODS[method](model, 0.6, MLP_NAMES, calib)
    assert isinstance(model[0], LowRankLinear) and model[0].rank >= 3
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", LOW_RANK)
def test_gpt2_conv1d_is_factored_as_its_transposed_weight(method):
    model = gpt2()
    names = linear_names(model)
    ids = token_batches(1)[0]["input_ids"]
    calib = B.collect_calibration(model, names, token_batches())
    dense = {n: matrix(model, n) for n in names}
    B.METHODS[method](model, 0.999, names, calib)  # highest rank: the output barely moves
    for name in names:
        mod = model.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.original_type == "Conv1D"
    out = model(ids).logits
    assert out.shape == (4, 12, 60) and bool(torch.isfinite(out).all())
    if method == "uniform_rank":
        name = names[0]
        r = model.get_submodule(name).rank
        U, s, Vh = torch.linalg.svd(dense[name], full_matrices=False)
        torch.testing.assert_close(matrix(model, name), (U[:, :r] * s[:r]) @ Vh[:r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(B.METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_methods_keep_the_dtype(method, dtype):
    model = mlp().to(dtype)
    x = correlated_inputs(64, 24).to(dtype)
    calib = B.collect_calibration(model, MLP_NAMES, [x])
    B.METHODS[method](model, 0.5, MLP_NAMES, calib)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model(x).dtype == dtype


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("method", list(B.METHODS))
@pytest.mark.parametrize(
    ("keep", "error", "match"),
    [
        (0.0, ValueError, r"keep_fraction=0\.0 must be in \(0, 1\]"),
        (1.5, ValueError, "must be in"),
        (float("nan"), ValueError, "must be in"),
        (-0.2, ValueError, "must be in"),
        (True, TypeError, "must be a number"),
        ("0.5", TypeError, "must be a number"),
    ],
)
def test_bad_keep_fraction(method, keep, error, match):
    model = mlp()
    calib = B.collect_calibration(model, MLP_NAMES, [correlated_inputs(32, 24)])
    with pytest.raises(error, match=match):
        B.METHODS[method](model, keep, MLP_NAMES, calib)


@pytest.mark.parametrize("method", list(B.METHODS))
def test_bad_layer_names(method):
    model = gpt2()
    names = linear_names(model)
    calib = B.collect_calibration(model, names, token_batches(1))
    fn = B.METHODS[method]
    with pytest.raises(ValueError, match="'transformer.h.9.mlp' is not in the model"):
        fn(model, 0.5, ["transformer.h.9.mlp"], calib)
    with pytest.raises(ValueError, match="'transformer.ln_f' is a LayerNorm, not a linear layer"):
        fn(model, 0.5, ["transformer.ln_f"], calib)
    with pytest.raises(ValueError, match="'lm_head' cannot be compressed: weight is tied"):
        fn(model, 0.5, ["lm_head"], calib)
    with pytest.raises(ValueError, match="named twice"):
        fn(model, 0.5, names[:1] * 2, calib)


@pytest.mark.parametrize("method", sorted(B.NEEDS_CALIB))
def test_calibrated_methods_need_calibration_and_leave_the_model_unchanged(method):
    model = mlp()
    x = correlated_inputs(32, 24)
    ref = model(x)
    with pytest.raises(ValueError, match=f"{method} needs calibration statistics"):
        B.METHODS[method](model, 0.5, MLP_NAMES, None)
    partial = B.collect_calibration(model, MLP_NAMES[:2], [x])
    with pytest.raises(ValueError, match="no calibration statistics for layer '4'"):
        B.METHODS[method](model, 0.5, MLP_NAMES, partial)
    assert torch.equal(model(x), ref) and all(
        isinstance(model.get_submodule(n), nn.Linear) for n in MLP_NAMES
    )


def test_calibration_errors():
    model = mlp()
    with pytest.raises(ValueError, match="batches is empty"):
        B.collect_calibration(model, MLP_NAMES, [])
    with pytest.raises(ValueError, match="'1' is a ReLU, not a linear layer"):
        B.collect_calibration(model, ["1"], [torch.randn(2, 24)])
    with pytest.raises(TypeError, match="batch 0 is a list"):
        B.collect_calibration(model, MLP_NAMES, [[1, 2]])
    unused = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    unused.forward = lambda x: unused["a"](x)
    with pytest.raises(ValueError, match="'b' saw no calibration tokens"):
        B.collect_calibration(unused, ["a", "b"], [torch.randn(3, 4)])
