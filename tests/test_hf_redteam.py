"""Red-team tests of the Hugging Face directory path (rmtprune.hf, compress/sparsify on a directory).

Each test is an attack by a hostile file author or a clumsy user on the three promises of
docs/security.md (a file never runs code; no file of the user's is lost except the OUT asked for,
outputs atomic; bad input is one line, exit 2, nothing written). Attacks that are refused today
pass; the real bugs it found are fixed and tested here; the one known bypass (a class-level
``save_pretrained`` call) is ``xfail(strict=True)`` with the reason.
Tiny models built from configs, no downloads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rmtprune  # noqa: E402
from rmtprune import hf  # noqa: E402
from rmtprune.cli import main  # noqa: E402
from rmtprune.config import CompressionConfig  # noqa: E402
from rmtprune.errors import CheckpointError, RmtpruneError  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96
    )
    return transformers.BertModel(cfg).eval()


def run(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def cut(model: torch.nn.Module) -> rmtprune.Plan:
    plan = rmtprune.plan(model, CompressionConfig(rule="fixed", rank=8), progress=False)
    rmtprune.apply(model, plan)
    return plan


def plain_dir(tmp_path: Path, name: str = "src") -> Path:
    d = tmp_path / name
    bert().save_pretrained(d)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    return d


def compressed_dir(tmp_path: Path, name: str = "out") -> Path:
    model = bert()
    plan = cut(model)
    return hf.save_pretrained(model, tmp_path / name, plan=plan)


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_manifest(d: Path, fn) -> None:
    """Rewrite the manifest in rmtprune.safetensors' header (what a hostile author can do)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rmtprune.manifest import read_manifest

    path = d / hf.WEIGHTS_NAME
    manifest = fn(read_manifest(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    keys = [k for k in meta if k.startswith("rmtprune")]
    assert keys, meta.keys()
    for k in keys:
        meta[k] = json.dumps(manifest)
    save_file(load_file(path), path, metadata=meta)


def cli(*args: str, capsys) -> tuple[int, str]:
    """Run the CLI in process (an uncaught exception, i.e. a traceback, fails the test)."""
    capsys.readouterr()  # drop what building the inputs printed
    rc = main([*args, "--no-progress", "--quiet"])
    return rc, capsys.readouterr().err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".rmtprune-" in p.name)


# ====================================================================== attacks that are refused
def test_config_symlinked_to_a_system_file_is_one_line(tmp_path):
    d = plain_dir(tmp_path)
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/etc/passwd")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        hf.load_pretrained(d)


@pytest.mark.parametrize("text", ["[1, 2]", '"BertModel"', "null", '{"model_type": 3}'])
def test_non_dict_config_is_refused(tmp_path, text):
    d = plain_dir(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="no model_type"):
        hf.load_pretrained(d)


def test_unknown_model_type_is_refused(tmp_path):
    d = plain_dir(tmp_path)
    edit_config(d, model_type="chatglm")  # a remote-code model transformers does not ship
    with pytest.raises(CheckpointError, match="chatglm"):
        hf.load_pretrained(d)


def test_model_type_of_another_architecture_is_refused_not_random(tmp_path):
    d = plain_dir(tmp_path)
    edit_config(d, model_type="llama")
    with pytest.raises(CheckpointError, match="at random"):
        hf.load_pretrained(d)


@pytest.mark.parametrize("name", ["BertTokenizer", "pipeline", "AutoModel", "os", "__class__"])
def test_architectures_naming_a_non_model_falls_back_to_the_auto_class(tmp_path, name):
    d = plain_dir(tmp_path)
    edit_config(d, architectures=[name])
    assert type(hf.load_pretrained(d)).__name__ == "BertModel"


def test_huge_config_is_refused_before_allocating(tmp_path):
    d = plain_dir(tmp_path)
    edit_config(d, vocab_size=10**12)
    with pytest.raises(CheckpointError, match="inconsistent"):
        hf.load_pretrained(d)


def test_shard_index_escaping_the_directory_is_refused(tmp_path):
    d = plain_dir(tmp_path)
    (d / "model.safetensors").rename(tmp_path / "x.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "../x.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"\.\./x\.safetensors"):
        hf.load_pretrained(d)


@pytest.mark.parametrize(
    "cls, message",
    [
        ("AutoModel", "not a transformers model class"),
        ("BertTokenizer", "not a transformers model class"),
        ("BertForMaskedLM", "missing from the model"),
        ("BertPreTrainedModel", "not a transformers model class"),
        (["BertModel"], "class name"),
        (None, "class name"),
    ],
)
def test_compressed_dir_pointing_at_another_class_is_refused(tmp_path, cls, message):
    d = compressed_dir(tmp_path)
    edit_manifest(d, lambda m: {**m, "hf": {**m["hf"], "class": cls}})
    with pytest.raises(CheckpointError, match=message):
        rmtprune.load(d)


@pytest.mark.parametrize("dtype", ["int8", "complex64", "Tensor", ["float32"]])
def test_compressed_dir_with_a_bad_dtype_string_is_refused(tmp_path, dtype):
    d = compressed_dir(tmp_path)
    edit_manifest(d, lambda m: {**m, "hf": {**m["hf"], "dtype": dtype}})
    with pytest.raises(CheckpointError, match="dtype"):
        rmtprune.load(d)


def test_compressed_dir_naming_a_factory_never_runs_it(tmp_path):
    d = compressed_dir(tmp_path)
    flag = tmp_path / "PWNED"
    edit_manifest(d, lambda m: {**m, "factory": "os:system", "factory_args": {"command": f"touch {flag}"}})
    with contextlib.suppress(RmtpruneError):
        rmtprune.load(d)
    assert not flag.exists()


def test_compressed_dir_with_auto_map_in_its_config_is_refused(tmp_path):
    d = compressed_dir(tmp_path)
    edit_config(d, auto_map={"AutoModel": "evil.Evil"})
    with pytest.raises(CheckpointError, match="custom code"):
        rmtprune.load(d)


def test_load_dir_with_a_model_is_refused(tmp_path):
    d = compressed_dir(tmp_path)
    with pytest.raises(ValueError, match="without a model"):
        rmtprune.load(d, bert())


def test_plain_transformers_refuses_the_output_even_with_the_source_config(tmp_path):
    src = plain_dir(tmp_path)
    out = compressed_dir(tmp_path)
    with pytest.raises((OSError, ValueError)):
        transformers.BertModel.from_pretrained(out, config=transformers.AutoConfig.from_pretrained(src))
    with pytest.raises((OSError, ValueError), match=r"rmtprune\.load"):
        transformers.AutoModel.from_pretrained(out, use_safetensors=False)


def test_symlinked_side_files_are_not_copied(tmp_path):
    src = plain_dir(tmp_path)
    (src / "tokenizer.json").symlink_to("/etc/passwd")
    (src / "sub").symlink_to("/etc", target_is_directory=True)
    model = bert()
    out = hf.save_pretrained(model, tmp_path / "out", source=src)
    assert (out / "tokenizer_config.json").is_file()
    assert not (out / "tokenizer.json").exists()
    assert not (out / "sub").exists()


def test_out_dir_symlink_is_refused_and_its_target_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("mine")
    (tmp_path / "link").symlink_to(mine, target_is_directory=True)
    with pytest.raises(CheckpointError, match="not a directory"):
        hf.save_pretrained(bert(), tmp_path / "link")
    assert (mine / "a.txt").read_text() == "mine"


def test_out_dir_containing_the_input_is_refused_even_with_force(tmp_path):
    (tmp_path / "work").mkdir()
    src = plain_dir(tmp_path / "work")
    with pytest.raises(CheckpointError, match="contains the input"):
        hf.save_pretrained(bert(), tmp_path / "work", source=src, force=True)
    assert (src / "model.safetensors").is_file()


def test_symlink_to_a_user_dir_inside_out_keeps_the_target(tmp_path):
    out = compressed_dir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("mine")
    (out / "link").symlink_to(mine, target_is_directory=True)
    with contextlib.suppress(CheckpointError):
        hf.save_pretrained(bert(), out)
    assert (mine / "a.txt").read_text() == "mine"


def test_ctrl_c_halfway_leaves_the_old_output_and_no_temporary(tmp_path, monkeypatch):
    out = compressed_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(bert(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_guard_survives_deepcopy_and_torch_compile(tmp_path):
    model = bert()
    cut(model)
    for m in (copy.deepcopy(model), torch.compile(model)):
        with pytest.raises(RmtpruneError, match=r"rmtprune\.save"):
            m.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_sparsified_model_through_transformers_save_pretrained_is_not_random(tmp_path):
    """docs/hf.md: a model sparsified without factoring keeps transformers' save_pretrained."""
    model = bert()
    model, _ = rmtprune.sparsify(
        model, rmtprune.SparsifyConfig(budget="global", target=0.5), show_progress=False
    )
    before = run(model)
    model.save_pretrained(tmp_path / "hf")
    back = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(run(back), before, rtol=0, atol=1e-6)


def test_cli_out_dir_is_a_file(tmp_path, capsys):
    src = plain_dir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    rc, err = cli("compress", str(src), str(tmp_path / "afile"), capsys=capsys)
    assert rc == 2 and "not a directory" in err and err.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "mine"


def test_cli_tilde_out_dir_expands(tmp_path, capsys, monkeypatch):
    src = plain_dir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    rc, err = cli("compress", str(src), "~/cut", "--rule", "fixed", "--rank", "8", capsys=capsys)
    assert rc == 0, err
    assert rmtprune.is_compressed(rmtprune.load(tmp_path / "cut"))
    assert not (Path.cwd() / "~").exists()


# ============================================ real bugs found (fixed; one known bypass stays xfail)
_ONE_LINE = "refused with a one-line CheckpointError"


@pytest.mark.parametrize("name", ["PreTrainedModel", "BertPreTrainedModel"])
def test_architectures_naming_a_base_class_falls_back_to_the_auto_class(tmp_path, name):
    """A plain directory's ``architectures`` naming a base class (once a TypeError/AttributeError
    traceback) is not a model class: the config's AutoModel class is built, as for a tokenizer name."""
    d = plain_dir(tmp_path)
    edit_config(d, architectures=[name])
    assert type(hf.load_pretrained(d)).__name__ == "BertModel"


@pytest.mark.parametrize("name", ["PreTrainedModel", "BertPreTrainedModel"])
def test_compressed_dir_naming_a_base_class_is_one_line(tmp_path, name):
    d = compressed_dir(tmp_path)
    edit_manifest(d, lambda m: {**m, "hf": {**m["hf"], "class": name}})
    with pytest.raises(CheckpointError, match="not a transformers model class"):
        rmtprune.load(d)


_BAD_CONFIGS = {
    "heads-0": {"num_attention_heads": 0},  # ZeroDivisionError in the model's __init__
    "hidden-negative": {"hidden_size": -1},  # RuntimeError: negative dimension
    "hidden-string": {"hidden_size": "48"},  # huggingface_hub StrictDataclassFieldValidationError
}


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_config_values_the_model_rejects_are_one_line(tmp_path, case):
    d = plain_dir(tmp_path)
    edit_config(d, **_BAD_CONFIGS[case])
    with pytest.raises(CheckpointError):
        hf.load_pretrained(d)


def test_deeply_nested_config_is_one_line(tmp_path):
    d = plain_dir(tmp_path)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError):
        hf.load_pretrained(d)


_BAD_WEIGHTS = {
    "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage",
    "empty": b"",
    "huge-header-length": b"\xff" * 8 + b"{}",
}


@pytest.mark.parametrize("case", sorted(_BAD_WEIGHTS))
def test_corrupt_weights_file_is_one_line(tmp_path, case):
    d = plain_dir(tmp_path)
    (d / "model.safetensors").write_bytes(_BAD_WEIGHTS[case])
    with pytest.raises(CheckpointError):
        hf.load_pretrained(d)


def test_tensor_the_architecture_does_not_have_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = plain_dir(tmp_path)
    state = load_file(d / "model.safetensors")
    state["encoder.layer.0.attention.self.queryy.weight"] = torch.ones(48, 48)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="queryy"):
        hf.load_pretrained(d)


def test_compressed_dir_with_a_float8_dtype_is_one_line(tmp_path):
    d = compressed_dir(tmp_path)
    edit_manifest(d, lambda m: {**m, "hf": {**m["hf"], "dtype": "float8_e4m3fn"}})
    with pytest.raises(CheckpointError, match="dtype"):
        rmtprune.load(d)


def test_config_with_a_million_layers_is_refused_before_building(tmp_path, monkeypatch):
    d = plain_dir(tmp_path)
    edit_config(d, num_hidden_layers=10**6, hidden_size=4, num_attention_heads=1, intermediate_size=4)

    def no_build(*a, **k):
        raise AssertionError("the architecture was built before the config was checked")

    monkeypatch.setattr(hf, "_build", no_build)
    with pytest.raises(CheckpointError):
        hf.load_pretrained(d)


def test_guard_covers_a_transformers_model_inside_a_wrapper(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.auto_model = bert()

    w = Wrapper()
    cut(w)
    with pytest.raises(RmtpruneError, match=r"rmtprune\.save"):
        w.auto_model.save_pretrained(tmp_path / "hf")


@pytest.mark.xfail(
    strict=True,
    reason="known bypass (document, probably unfixable without patching the class): "
    "type(model).save_pretrained(model, d) skips the instance guard, and from_pretrained then loads "
    "the factored layers at random with only a logged warning",
)
def test_class_level_save_pretrained_bypass(tmp_path):
    model = bert()
    cut(model)
    before = run(model)
    try:
        type(model).save_pretrained(model, tmp_path / "hf")
    except RmtpruneError:
        return
    back = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(run(back), before, rtol=0, atol=1e-5)


def test_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = compressed_dir(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    real = os.rename
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(hf.os, "rename", flaky)
    with pytest.raises(OSError):
        hf.save_pretrained(bert(), out)
    monkeypatch.setattr(hf.os, "rename", real)
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == before


def test_manifest_claiming_a_file_does_not_delete_the_users_file(tmp_path):
    out = compressed_dir(tmp_path)
    edit_manifest(
        out, lambda m: {**m, "hf": {**m["hf"], "files": {**m["hf"]["files"], "notes.txt": "0" * 64}}}
    )
    (out / "notes.txt").write_text("the user's notes")
    with contextlib.suppress(CheckpointError):
        hf.save_pretrained(bert(), out)
    assert (out / "notes.txt").read_text() == "the user's notes"


_CLI_BAD = {
    "zero-layers-many": lambda d: edit_config(d, num_hidden_layers=10**6),
    "heads-0": lambda d: edit_config(d, num_attention_heads=0),
    "hidden-negative": lambda d: edit_config(d, hidden_size=-1),
    "corrupt-weights": lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}xx"),
    "deep-json": lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000),
}


@pytest.mark.parametrize("case", sorted(_CLI_BAD))
def test_cli_bad_directory_is_one_line_exit_2(tmp_path, capsys, case):
    d = plain_dir(tmp_path)
    _CLI_BAD[case](d)
    rc, err = cli("compress", str(d), str(tmp_path / "out"), capsys=capsys)
    assert rc == 2 and err.startswith("rmtprune: error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "case",
    ["not-json", "unknown-type", "auto-map", "missing-tensor", "pickle-only"],
)
def test_cli_refused_directory_is_one_line_exit_2(tmp_path, capsys, case):
    from safetensors.torch import load_file, save_file

    d = plain_dir(tmp_path)
    if case == "not-json":
        (d / "config.json").write_text("{")
    elif case == "unknown-type":
        edit_config(d, model_type="chatglm")
    elif case == "auto-map":
        edit_config(d, auto_map={"AutoModel": "evil.Evil"})
    elif case == "missing-tensor":
        state = load_file(d / "model.safetensors")
        del state["pooler.dense.weight"]
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    else:
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    rc, err = cli("compress", str(d), str(tmp_path / "out"), capsys=capsys)
    assert rc == 2 and err.startswith("rmtprune: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
