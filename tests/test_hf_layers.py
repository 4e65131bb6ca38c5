"""Tiny Hugging Face models built from configs (no downloads): which layers plan, compress and
sparsify handle, which they skip and why, and that full-rank factoring keeps the outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import rmtprune  # noqa: E402
from rmtprune.lowrank import LowRankLinear, LowRankModule  # noqa: E402
from rmtprune.masks import get_mask  # noqa: E402

FULL = rmtprune.CompressionConfig(rule="fixed", ratio=1.0, factor_only_if_smaller=False, protect_last=False)
TIED = "weight is tied to "
EMBEDDING = "unsupported layer type Embedding"


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return transformers.ViTModel(cfg)


def _tokens(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 120, (2, 9), generator=g)}


def _pixels(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)}


#: model, its input, what the projections are (name suffixes that must be factored), the layers
#: skipped and the start of their reason.
MODELS = {
    "bert": (
        _bert,
        _tokens,
        ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        {
            "embeddings.word_embeddings": EMBEDDING,
            "embeddings.position_embeddings": EMBEDDING,
            "embeddings.token_type_embeddings": EMBEDDING,
        },
    ),
    "llama": (
        _llama,
        _tokens,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        {"model.embed_tokens": EMBEDDING, "lm_head": TIED + "'model.embed_tokens'"},
    ),
    "gpt2": (
        _gpt2,
        _tokens,
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        {"transformer.wte": EMBEDDING, "transformer.wpe": EMBEDDING, "lm_head": TIED + "'transformer.wte'"},
    ),
    "vit": (
        _vit,
        _pixels,
        ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "patch_embeddings.projection"),
        {"embeddings": "unsupported layer type ViTEmbeddings"},
    ),
}


def _build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    factory, inputs, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    return model, inputs(torch.Generator().manual_seed(1))


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach()


def _owners_of_matrices(model: nn.Module) -> set[str]:
    """Every module that itself holds a >= 2-D parameter."""
    return {n for n, m in model.named_modules() if any(p.ndim >= 2 for p in m.parameters(recurse=False))}


@pytest.mark.parametrize("name", list(MODELS))
def test_plan_factors_projections_and_reports_every_other_matrix(name: str) -> None:
    model, _ = _build(name)
    _, _, projections, skipped = MODELS[name]
    report = rmtprune.plan(model, FULL)
    rows = {lp.name: lp for lp in report.layers}
    # Never silent: every module holding a matrix is a row of the plan.
    assert _owners_of_matrices(model) <= set(rows), _owners_of_matrices(model) - set(rows)
    for layer, why in skipped.items():
        row = rows[layer]
        assert row.action == "skip" and row.reason.startswith(why), (layer, row.reason)
    for suffix in projections:
        hits = [lp for n, lp in rows.items() if n.endswith(suffix)]
        assert hits and all(lp.action == "factor" for lp in hits), [(lp.name, lp.reason) for lp in hits]
    others = [lp for lp in report.layers if lp.action != "factor" and lp.name not in skipped]
    assert not others, [(lp.name, lp.action, lp.reason) for lp in others]


@pytest.mark.parametrize("name", list(MODELS))
def test_full_rank_compression_keeps_the_outputs(name: str) -> None:
    model, inputs = _build(name)
    before = _output(model, inputs)
    dense_params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    _, report = rmtprune.compress(model, FULL)
    factored = [lp.name for lp in report.layers if lp.action == "factor"]
    assert factored and all(isinstance(model.get_submodule(n), LowRankModule) for n in factored)
    after = _output(model, inputs)
    assert (after - before).abs().max().item() <= 1e-9 * max(before.abs().max().item(), 1.0)
    for layer in MODELS[name][3]:  # the skipped layers are untouched
        for pname, p in model.get_submodule(layer).named_parameters(recurse=False):
            assert torch.equal(p, dense_params[f"{layer}.{pname}"])


def test_llama_keeps_its_tied_head_and_gpt2_conv1d_becomes_low_rank_linear() -> None:
    llama, _ = _build("llama")
    rmtprune.compress(llama, FULL)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert type(llama.lm_head) is nn.Linear
    gpt2, inputs = _build("gpt2")
    before = _output(gpt2, inputs)
    rmtprune.compress(gpt2, rule="fixed", ratio=0.5, factor_only_if_smaller=False)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LowRankLinear) and c_attn.original_type == "Conv1D"
    assert c_attn.matrix_shape == (96, 32) and c_attn.rank == 16
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert torch.isfinite(_output(gpt2, inputs)).all()
    rmtprune.densify(gpt2)  # and back: a dense Conv1D again, holding the cut weight
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert not torch.allclose(_output(gpt2, inputs), before)


@pytest.mark.parametrize("name", list(MODELS))
def test_sparsify_masks_the_projections_and_skips_embeddings_and_tied_heads(name: str) -> None:
    model, inputs = _build(name)
    _, _, projections, skipped = MODELS[name]
    tables = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    config = rmtprune.SparsifyConfig(target=0.3, budget="uniform")
    _, report = rmtprune.sparsify(model, config, show_progress=False)
    names = {r.name for r in report.layers}
    for suffix in projections:
        hits = [n for n in names if n.endswith(suffix)]
        assert hits, suffix
        for n in hits:
            mod = model.get_submodule(n)
            mask = get_mask(mod)
            assert mask is not None and mask.shape == mod.weight.shape
            assert bool((mod.weight[~mask] == 0).all()) and 0.25 < 1 - mask.float().mean().item() < 0.35
    for layer, why in skipped.items():
        assert layer not in names
        if why.startswith(TIED):
            why = why.replace("cutting", "masking")
        assert any(w.startswith(f"layer {layer!r} skipped: {why}") for w in report.warnings), report.warnings
    for layer, table in tables.items():  # no zeros leak into an embedding table (tied heads)
        assert torch.equal(model.get_submodule(layer).weight, table)
    assert torch.isfinite(_output(model, inputs)).all()


def test_gpt2_conv1d_masks_its_transposed_weight() -> None:
    model, _ = _build("gpt2")
    config = rmtprune.SparsifyConfig(target=0.5, budget="uniform")
    rmtprune.sparsify(model, config, show_progress=False)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert type(c_fc).__name__ == "Conv1D" and tuple(c_fc.weight.shape) == (32, 128)  # in x out
    assert tuple(get_mask(c_fc).shape) == (32, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_llama_compresses_and_runs(dtype: torch.dtype) -> None:
    model, inputs = _build("llama")
    model = model.to(dtype)
    before = _output(model, inputs).float()
    _, report = rmtprune.compress(model, FULL)
    assert any(lp.action == "factor" for lp in report.layers)
    assert {p.dtype for p in model.parameters()} == {dtype}
    after = _output(model, inputs).float()
    assert torch.isfinite(after).all()
    assert (after - before).abs().max().item() < 0.1 * before.abs().max().item()
    low = copy.deepcopy(model).float().to(dtype)  # casting a compressed model back and forth
    assert torch.equal(_output(low, inputs), _output(model, inputs))


@pytest.mark.slow
def test_torch_compile_runs_a_compressed_llama() -> None:
    torch._dynamo.reset()
    model, inputs = _build("llama")
    model = model.float()
    rmtprune.compress(model, rule="fixed", ratio=0.5, factor_only_if_smaller=False)
    rmtprune.sparsify(model, rmtprune.SparsifyConfig(target=0.3, budget="uniform"), show_progress=False)
    eager = _output(model, inputs)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.allclose(_output(compiled, inputs), eager, atol=1e-5)
