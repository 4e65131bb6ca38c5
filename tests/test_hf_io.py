"""Hugging Face model directories in and out (rmtprune.hf, the commands on a directory).

Tiny randomly initialised transformers models built here from configs: no downloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rmtprune  # noqa: E402
from rmtprune import hf  # noqa: E402
from rmtprune.config import CompressionConfig  # noqa: E402
from rmtprune.errors import CheckpointError  # noqa: E402


def _quiet() -> None:
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


_quiet()


def tiny(kind: str) -> torch.nn.Module:
    """A tiny transformers model whose linear layers are large enough for a fit (>= 10 singular values)."""
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
        )
        return transformers.BertModel(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=48, n_layer=2, n_head=4, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "vit":
        cfg = transformers.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
        )
        return transformers.ViTModel(cfg).eval()
    raise AssertionError(kind)


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 64, (2, 10), generator=g)}


def out_of(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        res = model(**inputs(kind))
    return res.logits if hasattr(res, "logits") and res.logits is not None else res.last_hidden_state


def cut(model: torch.nn.Module) -> rmtprune.Plan:
    """Factor every layer at a fixed small rank (so something is cut whatever the fit says)."""
    plan = rmtprune.plan(model, CompressionConfig(rule="fixed", rank=8), progress=False)
    rmtprune.apply(model, plan)
    assert rmtprune.is_compressed(model)
    return plan


def hf_dir(tmp_path: Path, kind: str, name: str = "src", **save_kwargs) -> tuple[Path, torch.nn.Module]:
    model = tiny(kind)
    d = tmp_path / name
    model.save_pretrained(d, **save_kwargs)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    (d / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(64)) + "\n")
    return d, model


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "vit"])
def test_compressed_round_trip_equals_before_saving(tmp_path, kind):
    model = tiny(kind)
    plan = cut(model)
    before = out_of(model, kind)
    out = hf.save_pretrained(model, tmp_path / "out", plan=plan)
    back = rmtprune.load(out)
    assert type(back) is type(model)
    assert rmtprune.is_compressed(back)
    torch.testing.assert_close(out_of(back, kind), before, rtol=0, atol=1e-6)
    manifest = json.loads((out / hf.MANIFEST_NAME).read_text())
    assert manifest["hf"]["class"] == type(model).__name__
    assert manifest["factory"] is None


@pytest.mark.parametrize(("kind", "storage"), [("bert", "auto"), ("gpt2", "auto"), ("bert", "csr")])
def test_sparsified_round_trip(tmp_path, kind, storage):
    from rmtprune.sparse_format import manifest_from_metadata, read_metadata

    model = tiny(kind)
    model, _ = rmtprune.sparsify(
        model, rmtprune.SparsifyConfig(budget="global", target=0.5), show_progress=False
    )
    before = out_of(model, kind)
    out = hf.save_pretrained(model, tmp_path / "out", storage=storage)
    back = rmtprune.load(out)
    torch.testing.assert_close(out_of(back, kind), before, rtol=0, atol=1e-6)
    assert rmtprune.is_sparsified(back)
    formats = {e["format"] for e in manifest_from_metadata(read_metadata(out / hf.WEIGHTS_NAME)).values()}
    assert formats == ({"bitmask"} if storage == "auto" else {storage})  # 50% kept: bitmask is smaller


def test_plain_transformers_refuses_compressed_dir_with_a_clear_message(tmp_path):
    model = tiny("bert")
    cut(model)
    out = hf.save_pretrained(model, tmp_path / "out")
    for loader in (transformers.AutoModel, transformers.BertModel):
        with pytest.raises((ValueError, OSError), match=r"rmtprune\.load"):
            loader.from_pretrained(out)
    # The config itself still loads (tokenizers and AutoConfig read it).
    assert transformers.AutoConfig.from_pretrained(out).hidden_size == 48


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny("llama")
    cut(model)
    back = rmtprune.load(hf.save_pretrained(model, tmp_path / "out"))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert type(back.lm_head).__name__ == "Linear"  # tied: skipped, never factored


def test_bfloat16_model_round_trip_keeps_dtype(tmp_path):
    model = tiny("bert").to(torch.bfloat16)
    cut(model)
    before = out_of(model, "bert")
    back = rmtprune.load(hf.save_pretrained(model, tmp_path / "out"))
    assert next(back.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out_of(back, "bert"), before, rtol=0, atol=0)


def test_plain_dir_loads_like_transformers(tmp_path):
    d, model = hf_dir(tmp_path, "llama")
    back = rmtprune.load(d)
    torch.testing.assert_close(out_of(back, "llama"), out_of(model, "llama"))


def test_sharded_plain_dir_loads(tmp_path):
    d, model = hf_dir(tmp_path, "bert", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(out_of(rmtprune.load(d), "bert"), out_of(model, "bert"))


def test_missing_tensor_is_refused_not_randomly_initialised(tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = hf_dir(tmp_path, "bert")
    state = load_file(d / "model.safetensors")
    del state["encoder.layer.0.attention.self.query.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="query.weight.*at random"):
        rmtprune.load(d)


def test_pickle_only_custom_code_and_oversized_configs_are_refused(tmp_path):
    d, _ = hf_dir(tmp_path, "bert")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        rmtprune.load(d)
    d2, _ = hf_dir(tmp_path, "bert", name="custom")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="custom code"):
        rmtprune.load(d2)
    d3, _ = hf_dir(tmp_path, "bert", name="huge")
    cfg = json.loads((d3 / "config.json").read_text())
    cfg["intermediate_size"] = 4_000_000
    (d3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="refused as inconsistent"):
        rmtprune.load(d3)


def test_out_dir_checks(tmp_path):
    model = tiny("bert")
    cut(model)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not written by rmtprune.*notes.txt"):
        hf.save_pretrained(model, user)
    assert (user / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        hf.save_pretrained(model, tmp_path / "afile")
    with pytest.raises(CheckpointError, match="does not exist"):
        hf.save_pretrained(model, tmp_path / "missing" / "out")
    out = hf.save_pretrained(model, tmp_path / "out")
    hf.save_pretrained(model, out)  # ours: replaced
    (out / "extra.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="extra.txt"):
        hf.save_pretrained(model, out)
    hf.save_pretrained(model, out, force=True)
    assert not (out / "extra.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left"


def test_failed_write_leaves_the_old_directory(tmp_path, monkeypatch):
    model = tiny("bert")
    out = hf.save_pretrained(model, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    weights = (out / hf.WEIGHTS_NAME).read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "write_model", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / hf.WEIGHTS_NAME).read_bytes() == weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_non_persistent_buffer_in_a_weights_file_is_ignored(tmp_path):
    """A config-built BertModel plus a model.safetensors that still holds embeddings.position_ids
    (transformers 4.x saved it; it is a non-persistent buffer now) loads, as transformers loads it."""
    from safetensors.torch import save_file

    model = tiny("bert")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    save_file(state, tmp_path / "model.safetensors")
    fresh = transformers.BertModel(model.config).eval()
    rmtprune.load(tmp_path / "model.safetensors", fresh)
    torch.testing.assert_close(out_of(fresh, "bert"), out_of(model, "bert"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-m", "rmtprune", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


@pytest.mark.slow
def test_cli_compress_and_sparsify_a_model_directory(tmp_path):
    src, model = hf_dir(tmp_path, "gpt2")
    r = _cli("compress", str(src), "out", "--rule", "fixed", "--rank", "8", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer_config.json", "vocab.txt", "report.json", "report.md"} <= names
    assert "model.safetensors" not in names  # the dense weights are never copied along
    back = rmtprune.load(out)
    assert rmtprune.is_compressed(back)
    expect = tiny("gpt2")
    rmtprune.apply(expect, rmtprune.plan(expect, CompressionConfig(rule="fixed", rank=8)))
    torch.testing.assert_close(out_of(back, "gpt2"), out_of(expect, "gpt2"), rtol=1e-5, atol=1e-5)
    # A re-cut in place and a sparsify of the compressed directory.
    r = _cli("compress", "out", "out", "--rule", "fixed", "--rank", "4", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("sparsify", "out", "sp", "--budget", "global", "--target", "0.5", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert rmtprune.is_sparsified(rmtprune.load(tmp_path / "sp"))
    # A user's directory is refused: exit 2, one line, nothing written.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    r = _cli("compress", str(src), "mine", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "not written by rmtprune" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["a.txt"]
    # The plain source directory cannot be overwritten in place without --force.
    r = _cli("compress", str(src), str(src), "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "not written by rmtprune" in r.stderr
    assert (src / "model.safetensors").is_file()
    # analyze reads a model directory's safetensors (no transformers needed for that).
    r = _cli("analyze", str(src), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "h.0.attn.c_attn.weight" in r.stdout


def test_transformers_save_pretrained_of_a_compressed_model_refuses(tmp_path):
    """save_pretrained -> from_pretrained of a factored BertModel used to re-initialise the cut
    layers silently (the model then ran with random layers); now save_pretrained refuses and says
    which call to make, and that call round-trips."""
    from rmtprune.errors import RmtpruneError

    model = tiny("bert")
    cut(model)
    with pytest.raises(RmtpruneError, match=r"rmtprune\.save\(model, DIR\)"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    before = out_of(model, "bert")
    rmtprune.save(model, tmp_path / "ours")
    back = rmtprune.load(tmp_path / "ours")
    torch.testing.assert_close(out_of(back, "bert"), before, rtol=0, atol=1e-6)
    with pytest.raises(RmtpruneError):
        back.save_pretrained(tmp_path / "hf2")
    dense = tiny("bert")  # an uncompressed model keeps transformers' own save
    dense.save_pretrained(tmp_path / "dense")
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_cli_config_factory_with_a_transformers_4_weights_file(tmp_path, monkeypatch):
    """--model MODULE:FACTORY (a config-only BertModel) with --weights model.safetensors that still
    holds embeddings.position_ids (as transformers 4.x saved it) used to fail on that buffer."""
    from safetensors.torch import save_file

    from rmtprune.cli import main

    model = tiny("bert")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.to_json_file(tmp_path / "config.json")
    (tmp_path / "mybert.py").write_text(
        "import transformers\n\n"
        "def build():\n"
        "    cfg = transformers.BertConfig.from_json_file(__file__.replace('mybert.py', 'config.json'))\n"
        "    return transformers.BertModel(cfg)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = ["compress", "--model", "mybert:build", "--weights", "model.safetensors", "out.safetensors"]
    assert main([*args, "--rule", "fixed", "--rank", "8", "--no-progress", "--quiet"]) == 0
    fresh = transformers.BertModel(model.config).eval()
    back = rmtprune.load(tmp_path / "out.safetensors", fresh)
    expect = tiny("bert")
    rmtprune.apply(expect, rmtprune.plan(expect, CompressionConfig(rule="fixed", rank=8)))
    torch.testing.assert_close(out_of(back, "bert"), out_of(expect, "bert"), rtol=1e-5, atol=1e-5)


def test_a_killed_runs_temporary_directory_is_cleaned_by_the_next(tmp_path):
    """OUT_DIR is written through rmtprune._atomic.atomic_dir: a temporary directory a SIGKILLed run
    left (its pid gone) is removed by the next write of the same OUT_DIR; the moved-aside old
    directory's name (``.old``) is never one it removes."""
    stale = tmp_path / ".out.rmtprune-999999999-0badf00d.tmp"
    stale.mkdir()
    (stale / "rmtprune.safetensors").write_bytes(b"half")
    kept = tmp_path / ".out.rmtprune-999999999-0badf00d.old"
    kept.mkdir()
    hf.save_pretrained(tiny("bert"), tmp_path / "out")
    assert not stale.exists() and kept.is_dir()
