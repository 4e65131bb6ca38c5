"""Weights-file reading (every format, lazily) and analysis, with every kind of bad input."""

from __future__ import annotations

import json
import pickle
import re
import struct
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rmtprune.config import FitConfig
from rmtprune.errors import CheckpointError
from rmtprune.weights_analysis import FileAnalysis, analyze_file
from rmtprune.weights_file import TensorInfo, iter_tensors, list_tensors


def spiked(m: int, n: int, rank: int, seed: int, strength: float = 6.0) -> torch.Tensor:
    """Noise with variance 1/n plus ``rank`` strong directions: a trained-layer-like spectrum."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, n, generator=g) / n**0.5
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    return noise + strength * u @ v.T


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": spiked(80, 120, rank=3, seed=1),
        "fc1.bias": torch.randn(80, generator=g),
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g),
        "head.weight": torch.randn(1, 40, generator=g),
        "emb.weight": torch.randn(50, 20, generator=g).half(),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.ones(12, 12, dtype=torch.bool),
        "c1d.weight": torch.randn(8, 4, 3, generator=g),
    }


EXPECTED = {
    "fc1.weight": ((80, 120), "float32"),
    "fc1.bias": ((80,), "float32"),
    "conv.weight": ((16, 3, 3, 3), "float32"),
    "head.weight": ((1, 40), "float32"),
    "emb.weight": ((50, 20), "float16"),
    "bn.num_batches_tracked": ((), "int64"),
    "mask": ((12, 12), "bool"),
    "c1d.weight": ((8, 4, 3), "float32"),
}


def _shards(sd: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    names = sorted(sd)
    return [{k: sd[k] for k in names[:4]}, {k: sd[k] for k in names[4:]}]


def write(kind: str, tmp_path: Path, sd: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``sd`` in the layout ``kind`` under ``tmp_path`` and return the path to analyse."""
    sd = state_dict() if sd is None else sd
    if kind == "safetensors":
        save_file(sd, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    if kind in ("shards", "shards-index", "index-file"):
        d = tmp_path / "ckpt"
        d.mkdir()
        weight_map = {}
        for i, part in enumerate(_shards(sd), start=1):
            name = f"model-{i:05d}-of-00002.safetensors"
            save_file(part, d / name)
            weight_map.update(dict.fromkeys(part, name))
        if kind == "shards":
            return d
        index = d / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
        return d if kind == "shards-index" else index
    if kind == "pt":
        torch.save(sd, tmp_path / "model.pt")
        return tmp_path / "model.pt"
    if kind == "pt-legacy":
        torch.save(sd, tmp_path / "model.pth", _use_new_zipfile_serialization=False)
        return tmp_path / "model.pth"
    if kind == "nested":
        torch.save({"epoch": 3, "state_dict": sd, "hparams": {"lr": 0.1}}, tmp_path / "model.ckpt")
        return tmp_path / "model.ckpt"
    if kind == "with-optimizer":
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.Adam(model.parameters())
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "model.bin")
        return tmp_path / "model.bin"
    raise AssertionError(kind)


FORMATS = {
    "safetensors": "safetensors",
    "shards": "safetensors-sharded",
    "shards-index": "safetensors-sharded",
    "index-file": "safetensors-sharded",
    "pt": "torch",
    "pt-legacy": "torch-legacy",
    "nested": "torch",
    "with-optimizer": "torch",
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_list_tensors_every_format(kind: str, tmp_path: Path) -> None:
    infos = list_tensors(write(kind, tmp_path))
    assert all(isinstance(i, TensorInfo) for i in infos)
    assert {i.name: (i.shape, i.dtype) for i in infos} == EXPECTED


@pytest.mark.parametrize("kind", list(FORMATS))
def test_iter_tensors_round_trip(kind: str, tmp_path: Path) -> None:
    sd = state_dict()
    got = dict(iter_tensors(write(kind, tmp_path, sd)))
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("kind", list(FORMATS))
def test_analyze_same_result_in_every_format(kind: str, tmp_path: Path) -> None:
    res = analyze_file(write(kind, tmp_path))
    assert res.format == FORMATS[kind]
    by_name = {la.name: la for la in res.layers}
    assert set(by_name) == {"fc1.weight", "conv.weight", "head.weight", "emb.weight"}
    assert by_name["fc1.weight"].verdict == "fit"
    assert by_name["fc1.weight"].fit.n_spikes == 3
    assert by_name["head.weight"].verdict == "too-small"
    assert by_name["emb.weight"].dtype == "float16"
    assert by_name["conv.weight"].fit.shape == (16, 27)
    assert res.ignored_counts == {"non-float": 2, "1-d": 1, "other-ndim": 1, "empty": 0}
    assert {t.name: t.reason for t in res.ignored}["c1d.weight"] == "other-ndim"
    assert res.n_tensors == res.n_matched == 8
    assert not res.has_invalid


def test_nested_state_dict_is_unwrapped(tmp_path: Path) -> None:
    res = analyze_file(write("nested", tmp_path))
    assert res.unwrapped == ("state_dict",)
    assert analyze_file(write("with-optimizer", tmp_path)).unwrapped == ("model",)


def test_ambiguous_nesting_keeps_prefixes(tmp_path: Path) -> None:
    sd = {"w": torch.randn(20, 30)}
    torch.save({"model": sd, "ema": {"w": sd["w"] * 0.5}}, tmp_path / "two.pt")
    assert sorted(i.name for i in list_tensors(tmp_path / "two.pt")) == ["ema.w", "model.w"]


def test_list_tensors_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write("safetensors", tmp_path)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("safe_open must not be called to list tensors")

    monkeypatch.setattr("safetensors.safe_open", boom)
    assert len(list_tensors(path)) == 8


def test_iter_tensors_reads_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    path = write("shards-index", tmp_path)
    reads: list[str] = []
    real = safetensors.safe_open

    class Counting:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self) -> Counting:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    it = iter_tensors(path)
    first_name, _ = next(it)
    assert reads == [first_name]
    next(it)
    assert len(reads) == 2
    assert len(list(it)) == 6 and len(reads) == 8


def test_torch_files_are_loaded_safely_and_mmapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    list_tensors(write("pt", tmp_path))
    list_tensors(write("pt-legacy", tmp_path))
    assert calls[0] == {"weights_only": True, "mmap": True, "map_location": "cpu"}
    assert calls[1]["weights_only"] is True and calls[1]["mmap"] is False  # legacy files cannot be mmapped


def test_iter_tensors_subset_and_unknown_name(tmp_path: Path) -> None:
    path = write("safetensors", tmp_path)
    assert [n for n, _ in iter_tensors(path, names=["mask", "fc1.weight"])] == ["fc1.weight", "mask"]
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        list(iter_tensors(path, names=["nope"]))


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.randn(30, 40, generator=torch.Generator().manual_seed(0))})


def _bad_file(kind: str, tmp_path: Path) -> Path:
    rnd = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3)).tolist())
    rnd = b"\x00" + rnd[1:]  # not the zip, pickle or safetensors magic
    good = _safetensors_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    files = {
        "empty.safetensors": b"",
        "empty.pt": b"",
        "header-cut.safetensors": good[: 8 + n // 2],
        "data-cut.safetensors": good[: len(good) - 100],
        "random.safetensors": rnd,
        "random.bin": rnd,
        "random.dat": rnd,
        "notes.pt": b"these are my notes, not a model\n",
        "config.json": b'{\n  "hidden_size": 768, "layers": {"n": 12}\n}\n',
        "plain.pkl": pickle.dumps({"w": [1.0, 2.0]}),
    }
    if kind in files:
        path = tmp_path / kind
        path.write_bytes(files[kind])
        return path
    path = tmp_path / f"{kind}.pt"
    if kind == "module":
        torch.save(torch.nn.Linear(3, 3), path)
    elif kind == "truncated-zip":
        torch.save(state_dict(), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "truncated-legacy":
        torch.save(state_dict(), path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "single-tensor":
        torch.save(torch.randn(4, 4), path)
    elif kind == "list":
        torch.save([torch.randn(4, 4)], path)
    elif kind == "no-tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif kind == "other-zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "hi")
    else:
        raise AssertionError(kind)
    return path


BAD_FILES = {
    "empty.safetensors": r"is empty \(0 bytes\)",
    "empty.pt": r"is empty \(0 bytes\)",
    "header-cut.safetensors": r"is truncated: its safetensors header declares \d+ bytes",
    "data-cut.safetensors": r"is truncated: its header says the tensor data takes \d+ bytes but only \d+",
    "random.safetensors": r"is not a safetensors file",
    "random.bin": r"is not a PyTorch checkpoint",
    "random.dat": r"is not a checkpoint: expected a \.safetensors file",
    "notes.pt": r"is not a PyTorch checkpoint",
    "config.json": r"is not a checkpoint",
    "plain.pkl": r"is a Python pickle but not a torch\.save checkpoint",
    "module": r"without arbitrary code execution \(it pickles torch\.nn\.modules\.linear\.Linear"
    r".*refuses for safety.*safetensors",
    "truncated-zip": r"is truncated or corrupt",
    "truncated-legacy": r"is truncated",
    "single-tensor": r"holds a single tensor, not a state dict",
    "list": r"holds a list, not a state dict",
    "no-tensors": r"holds no tensors \(keys: 'epoch', 'lr'\)",
    "other-zip": r"is a zip archive but not a PyTorch checkpoint",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_give_one_line_errors_naming_the_file(kind: str, tmp_path: Path) -> None:
    path = _bad_file(kind, tmp_path)
    with pytest.raises(CheckpointError, match=BAD_FILES[kind]) as info:
        list_tensors(path)
    msg = str(info.value)
    assert path.name in msg and "\n" not in msg


def test_code_execution_pickle_of_a_custom_class(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(3, 3), "meta": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"arbitrary code execution .*pathlib.*refuses for safety"):
        analyze_file(tmp_path / "obj.pt")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'.*nope\.safetensors' does not exist"):
        analyze_file(tmp_path / "nope.safetensors")


def test_directory_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"directory '.*empty' holds no \*\.safetensors files$"):
        list_tensors(empty)
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"holds no \*\.safetensors files \(it has pytorch_model\.bin"):
        list_tensors(empty)

    d = write("shards-index", tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"shard 'model-00002-of-00002\.safetensors' named by index .* missing"
    ):
        list_tensors(d)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    d = write("shards-index", tmp_path)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=r"puts tensor 'ghost\.weight' in shard .* which does not hold it"
    ):
        list_tensors(d)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index .* is not readable JSON"):
        list_tensors(d)
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"has no 'weight_map'"):
        list_tensors(d)


def test_duplicate_tensors_across_unindexed_shards(tmp_path: Path) -> None:
    save_file({"w": torch.randn(20, 20)}, tmp_path / "a.safetensors")
    save_file({"w": torch.randn(20, 20)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'w' is in both 'a\.safetensors' and 'b\.safetensors'"):
        list_tensors(tmp_path)


def test_nan_and_inf_layers_are_invalid_and_others_continue(tmp_path: Path) -> None:
    sd = state_dict()
    sd["fc1.weight"][3, 4] = float("nan")
    sd["conv.weight"][0, 0, 0, 0] = float("inf")
    res = analyze_file(write("safetensors", tmp_path, sd))
    verdicts = {la.name: la.verdict for la in res.layers}
    assert verdicts == {
        "conv.weight": "invalid",
        "emb.weight": "fit",
        "fc1.weight": "invalid",
        "head.weight": "too-small",
    }
    assert res.has_invalid and res.invalid_layers == ["conv.weight", "fc1.weight"]
    assert "'fc1.weight' contains NaN or Inf" in {la.name: la.message for la in res.layers}["fc1.weight"]
    assert res.counts == {"fit": 1, "no-mp-bulk": 0, "too-small": 1, "invalid": 2}


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, {"fc1.weight", "conv.weight", "head.weight", "emb.weight"}),
        (r"^fc", None, {"fc1.weight"}),
        ([r"^fc", r"conv"], None, {"fc1.weight", "conv.weight"}),
        (None, r"\.weight$", set()),
        (r"weight", [r"head", r"emb"], {"fc1.weight", "conv.weight"}),
        # globs (the library's pattern language): the tensor's name or a module holding it
        ("fc*", None, {"fc1.weight"}),
        (["fc1", "conv"], None, {"fc1.weight", "conv.weight"}),
        (None, "*.weight", set()),
        ("*.weight", ["head", "emb.*"], {"fc1.weight", "conv.weight"}),
        ("fc?.w[a-f]ight", None, {"fc1.weight"}),
    ],
)
def test_include_exclude(include: object, exclude: object, expected: set[str], tmp_path: Path) -> None:
    res = analyze_file(write("safetensors", tmp_path), include=include, exclude=exclude)
    assert {la.name for la in res.layers} == expected
    assert res.n_tensors == 8
    kept_ignored = {t.name for t in res.ignored}
    assert res.n_matched == len(expected) + len(kept_ignored)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include": "fc1("}, ValueError, r"include pattern 'fc1\(' is not a valid regular expression"),
        ({"exclude": ["ok", "[z-a]"]}, ValueError, r"exclude pattern '\[z-a\]' is not a valid regular"),
        ({"include": "^nothing$"}, ValueError, r"no tensor of .* matches include=\['\^nothing\$'\]"),
        ({"include": [3]}, TypeError, r"include=\[3\] must be a list of non-empty pattern strings"),
        ({"alpha": 0.5}, ValueError, r"alpha=0\.5 must be in \(0, 0\.5\)"),
        ({"beta": 0.0}, ValueError, r"beta=0\.0 must be in \[0\.01, 0\.99\]"),
        ({"ks_max": -1}, ValueError, r"ks_max=-1 must be in \[0, inf\]"),
        ({"fit": FitConfig(), "alpha": 0.2}, ValueError, r"give fit= or alpha=, not both"),
        ({"fit": {"alpha": 0.2}}, TypeError, r"fit=\{'alpha': 0\.2\} must be a FitConfig"),
        ({"ks_max": "0.1"}, TypeError, r"ks_max='0\.1' must be a number"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=match):
        analyze_file(write("safetensors", tmp_path), **kwargs)


def test_bad_arguments_fail_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        analyze_file(tmp_path / "missing.pt", include="(")


def test_regex_patterns_are_accepted_with_a_deprecation_warning(tmp_path: Path) -> None:
    path = write("safetensors", tmp_path)
    with pytest.warns(DeprecationWarning, match=r"include pattern '\^fc' is a regular expression.*'fc\*'"):
        res = analyze_file(path, include="^fc")
    assert [la.name for la in res.layers] == ["fc1.weight"]
    with pytest.warns(DeprecationWarning, match=r"write it as a glob"):
        analyze_file(path, include="fc1|conv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # globs, and ".*" between components, are not regexes
        analyze_file(path, include=["fc*", "conv.*"], exclude="*.bias")


def _skewed() -> torch.Tensor:
    """Column scales 0.5..1.5: not an MP bulk (ks ~0.04), accepted by the default gate (ks_max = 0.1) and
    refused by the pure test (ks_max = 0: a true MP bulk of this size stays below ~0.016, gate.py)."""
    return torch.randn(200, 300, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.5, 1.5, 300)


def test_fit_config_and_the_open_gate(tmp_path: Path) -> None:
    path = write("safetensors", tmp_path, {**state_dict(), "skew.weight": _skewed()})
    res = analyze_file(path, fit=FitConfig(ks_max=0.0))
    fitted = [la for la in res.layers if la.fit is not None]
    assert {la.name for la in fitted if la.verdict == "no-mp-bulk"} >= {"skew.weight"}
    assert all((la.verdict == "no-mp-bulk") == (la.fit.ks > la.fit.gate(0.0)) for la in fitted)
    off = analyze_file(path, ks_max=float("inf"))
    assert off.ks_max == float("inf") and off.to_dict()["ks_max"] is None  # JSON has no inf
    assert "no-mp-bulk" not in {la.verdict for la in off.layers}


def test_deprecated_names_still_work(tmp_path: Path) -> None:
    import importlib
    import sys

    import rmtprune

    path = write("safetensors", tmp_path)
    with pytest.warns(DeprecationWarning, match="use rmtprune.analyze_file"):
        res = rmtprune.analyze_checkpoint(path)
    assert isinstance(res, FileAnalysis) and res.counts == analyze_file(path).counts
    sys.modules.pop("rmtprune.checkpoint", None)
    with pytest.warns(DeprecationWarning, match="rmtprune.checkpoint is deprecated"):
        old = importlib.import_module("rmtprune.checkpoint")
    assert old.list_tensors is list_tensors and old.CheckpointAnalysis is FileAnalysis
    assert old._REOPEN_BYTES > 0 and old._open is not None  # private names too


def test_ks_gate_and_to_dict(tmp_path: Path) -> None:
    (tmp_path / "skew").mkdir()
    skew = write("safetensors", tmp_path / "skew", {"skew.weight": _skewed()})
    assert [la.verdict for la in analyze_file(skew, ks_max=0.0).layers] == ["no-mp-bulk"]
    assert [la.verdict for la in analyze_file(skew).layers] == ["fit"]
    path = write("safetensors", tmp_path)
    res = analyze_file(path)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["format"] == "safetensors" and d["ks_max"] == 0.1 and d["n_tensors"] == 8
    assert d["counts"] == res.counts and d["ignored_counts"]["non-float"] == 2
    fc1 = next(x for x in d["layers"] if x["layer"] == "fc1.weight")
    assert fc1["n_spikes"] == 3 and fc1["shape"] == [80, 120] and fc1["verdict"] == "fit"
    head = next(x for x in d["layers"] if x["layer"] == "head.weight")
    assert head["ks"] is None and head["verdict"] == "too-small"
    assert isinstance(res, FileAnalysis)
    assert re.fullmatch(
        r"4 layers analysed \(.*\); 4 tensors ignored \(2 non-float, 1 1-D/scalar, 1 3-D.*\)", res.summary()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_low_and_high_precision_dtypes(dtype: torch.dtype, tmp_path: Path) -> None:
    w = spiked(60, 90, rank=2, seed=5).to(dtype)
    save_file({"w": w}, tmp_path / "m.safetensors")
    (la,) = analyze_file(tmp_path / "m.safetensors").layers
    assert la.dtype == str(dtype).replace("torch.", "")
    assert la.verdict == "fit" and la.fit.n_spikes == 2


def test_empty_and_zero_tensors(tmp_path: Path) -> None:
    save_file({"e": torch.zeros(0, 5), "z": torch.zeros(20, 30)}, tmp_path / "m.safetensors")
    res = analyze_file(tmp_path / "m.safetensors")
    assert [t.reason for t in res.ignored] == ["empty"]
    (z,) = res.layers
    assert z.verdict == "no-mp-bulk" and "no positive bulk" in z.message


@pytest.mark.slow
def test_real_mnist_trained_layer(tmp_path: Path, data_dir: Path) -> None:
    """A layer trained for a few steps on real MNIST: BEMA finds an MP bulk with spikes above it."""
    import gzip

    import numpy as np

    path = data_dir / "mnist" / "train-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with gzip.open(path) as fh:
        raw = fh.read(16 + 256 * 784)
    x = torch.tensor(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784) / 255.0, dtype=torch.float32)
    torch.manual_seed(0)
    enc = torch.nn.Linear(784, 128)
    dec = torch.nn.Linear(128, 784)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    for _ in range(25):  # a tiny auto-encoder: learns the leading directions of the digits
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(dec(torch.relu(enc(x))), x)
        loss.backward()
        opt.step()
    save_file({"enc.weight": enc.weight.detach().contiguous()}, tmp_path / "ae.safetensors")
    (la,) = analyze_file(tmp_path / "ae.safetensors").layers
    assert la.verdict == "fit", la.message
    assert 1 <= la.fit.n_spikes < 64


def test_sharded_torch_bin_directory(tmp_path: Path) -> None:
    """Hugging Face ``pytorch_model-*.bin`` shards plus their index, in a directory without safetensors."""
    sd = state_dict()
    weight_map = {}
    for i, part in enumerate(_shards(sd), start=1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save(part, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    res = analyze_file(tmp_path)
    assert res.format == "torch-sharded" and res.n_tensors == 8
    assert {la.name for la in res.layers} == {"fc1.weight", "conv.weight", "head.weight", "emb.weight"}


# ----------------------------------------------------------------------------- crafted input (issue 10)


CORPUS_CRASHERS = Path(__file__).resolve().parent / "fuzz_corpus" / "crashers"


def _raw_safetensors(path: Path, header: str, data: bytes) -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ('{"dtype": 5, "shape": [2], "data_offsets": [0, 8]}', r"tensor 'a': dtype 5 is not a dtype name"),
        ('{"dtype": [1], "shape": [2], "data_offsets": [0, 8]}', r"dtype \[1\] is not a dtype name"),
        ('{"dtype": null, "shape": [2], "data_offsets": [0, 8]}', "dtype None is not a dtype name"),
        ('{"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}', "Infinity is not valid JSON"),
        ('{"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}', "shape entry inf is not"),
        ('{"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}', "shape entry -2 is not"),
        ('{"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}', "shape entry 2.0 is not"),
        ('{"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}', "NaN is not valid JSON"),
        ('{"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}', "data offset -8 is not"),
        ('{"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}', r"\[8, 0\] end before they begin"),
        ('{"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}', "is not a .begin, end. pair"),
        ('{"dtype": "XX", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}', "more than 2..63"),
        ('{"dtype": "F32", "shape": ' + str([1] * 65) + ', "data_offsets": [0, 4]}', "65 dimensions"),
        ('{"dtype": "F32", "shape": [2]}', "no 'data_offsets'"),
        ("[1, 2]", "entry is not an object"),
    ],
)
def test_crafted_safetensors_header_entries(entry: str, match: str, tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "x.safetensors", '{"a": ' + entry + "}", b"\0" * 8)
    for read in (list_tensors, analyze_file):
        with pytest.raises(CheckpointError, match=match) as info:
            read(path)
        assert "x.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_safetensors_offsets_must_tile_the_data(tmp_path: Path) -> None:
    f32 = '{{"dtype": "F32", "shape": [2], "data_offsets": [{}, {}]}}'
    overlap = _raw_safetensors(
        tmp_path / "o.safetensors", f'{{"a": {f32.format(0, 8)}, "b": {f32.format(4, 12)}}}', b"\0" * 12
    )
    with pytest.raises(CheckpointError, match="tensor 'b' at bytes 4-12 overlaps the tensor before it"):
        list_tensors(overlap)
    gap = _raw_safetensors(
        tmp_path / "g.safetensors", f'{{"a": {f32.format(0, 8)}, "b": {f32.format(12, 20)}}}', b"\0" * 20
    )
    with pytest.raises(CheckpointError, match="leaves a gap of 4 bytes"):
        list_tensors(gap)
    tail = _raw_safetensors(tmp_path / "t.safetensors", f'{{"a": {f32.format(0, 8)}}}', b"\0" * 12)
    with pytest.raises(CheckpointError, match="the tensors take 8 bytes but 12 follow"):
        list_tensors(tail)
    # header order need not be data order: this is a valid file, as safetensors reads it
    swapped = _raw_safetensors(
        tmp_path / "s.safetensors", f'{{"a": {f32.format(8, 16)}, "b": {f32.format(0, 8)}}}', b"\0" * 16
    )
    assert [n for n, _ in iter_tensors(swapped)] == ["a", "b"]


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "m.safetensors", '{"__metadata__": {"a": 1}}', b"")
    with pytest.raises(CheckpointError, match="__metadata__ is not a map of strings"):
        list_tensors(path)


def test_torch_zip_named_safetensors_is_read_as_torch(tmp_path: Path) -> None:
    path = tmp_path / "really-a-torch-file.safetensors"
    torch.save({"w": torch.ones(3, 2)}, path)
    assert list_tensors(path) == [TensorInfo("w", (3, 2), "float32")]
    assert torch.equal(dict(iter_tensors(path))["w"], torch.ones(3, 2))
    assert analyze_file(path).format == "torch"


def test_self_referential_and_deep_dicts(tmp_path: Path) -> None:
    loop: dict = {"w": torch.ones(2, 2)}
    loop["again"] = loop
    torch.save(loop, tmp_path / "loop.pt")
    with pytest.raises(CheckpointError, match="dict 'again' contains itself"):
        list_tensors(tmp_path / "loop.pt")
    deep = CORPUS_CRASHERS / "torch" / "nested-5000.pt"
    with pytest.raises(CheckpointError, match="nested more than 100 levels deep"):
        analyze_file(deep)
    # 50 levels of wrapping is fine: unwrapped to the tensors
    nested: dict = {"w": torch.ones(2, 2)}
    for i in range(50):
        nested = {f"k{i}": nested}
    torch.save(nested, tmp_path / "n50.pt")
    assert [i.name for i in list_tensors(tmp_path / "n50.pt")] == ["w"]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: torch.eye(3).to_sparse(), r"tensor 'w' is a sparse tensor \(sparse_coo\).*to_dense"),
        (lambda: torch.eye(3).to_sparse_csr(), r"sparse tensor \(sparse_csr\)"),
        (lambda: torch.empty(3, 3, device="meta"), "a meta tensor, which holds no data"),
        (
            lambda: torch.quantize_per_tensor(torch.ones(3, 3), 0.1, 0, torch.qint8),
            r"quantized tensor \(qint8\).*dequantize",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: CSR in beta, quantization deprecated
def test_unsupported_tensor_kinds_are_named(make, match: str, tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.ones(2, 2), "w": make()}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=match) as info:
        list_tensors(tmp_path / "odd.pt")
    assert "odd.pt" in str(info.value)


def test_missing_shard_without_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4, 4)}, str(tmp_path / "model-00001-of-00003.safetensors"))
    save_file({"b": torch.ones(4, 4)}, str(tmp_path / "model-00003-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing shard 'model-00002-of-00003.safetensors': 2 of 3"):
        analyze_file(tmp_path)
    save_file({"b": torch.ones(4, 4)}, str(tmp_path / "model-00002-of-00004.safetensors"))
    with pytest.raises(CheckpointError, match="disagree on their number"):
        list_tensors(tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    save_file({"a": torch.ones(4, 4)}, str(one / "model-00001-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="missing shard 'model-00002-of-00002.safetensors'"):
        list_tensors(one)
    save_file({"b": torch.ones(4, 4)}, str(one / "model-00002-of-00002.safetensors"))
    assert [i.name for i in list_tensors(one)] == ["a", "b"]


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "sub/inner.safetensors", "ABS", "..", "sub\\inner.safetensors"]
)
def test_index_may_only_name_files_beside_it(shard: str, tmp_path: Path) -> None:
    save_file({"a": torch.ones(4, 4)}, str(tmp_path / "outside.safetensors"))
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    save_file({"a": torch.ones(4, 4)}, str(ckpt / "sub" / "inner.safetensors"))
    if shard == "ABS":
        shard = str(tmp_path / "outside.safetensors")
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    for target in (ckpt, index):
        with pytest.raises(CheckpointError, match="is not a plain file name in the index's directory"):
            list_tensors(target)


@pytest.mark.parametrize(
    "text",
    ["[1]", '"weight_map"', '{"weight_map": [1]}', '{"weight_map": {"a": 1}}', "[" * 5000 + "]" * 5000],
)
def test_malformed_index_json(text: str, tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match="index .*model.safetensors.index.json"):
        list_tensors(index)


class _OpenCounter:
    """Replaces ``safetensors.safe_open``, counting opens and the handles open at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors

        self.real = safetensors.safe_open
        self.opens = 0
        self.live = 0
        self.max_live = 0
        self.reads: list[tuple[int, str]] = []  # (open number, tensor name)
        monkeypatch.setattr(safetensors, "safe_open", self)

    def __call__(self, *args: object, **kwargs: object) -> object:
        counter, inner = self, self.real(*args, **kwargs)
        counter.opens += 1
        number = counter.opens

        class Handle:
            def __enter__(self) -> Handle:
                inner.__enter__()
                counter.live += 1
                counter.max_live = max(counter.max_live, counter.live)
                return self

            def __exit__(self, *exc: object) -> None:
                counter.live -= 1
                inner.__exit__(*exc)

            def get_tensor(self, name: str) -> torch.Tensor:
                counter.reads.append((number, name))
                return inner.get_tensor(name)

        return Handle()


def test_many_tiny_safetensors_tensors_share_one_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each safe_open parses the whole header: one open per tensor made this quadratic (10,000 1x1
    # tensors took 210 s to analyse)
    path = tmp_path / "tiny.safetensors"
    save_file({f"layers.{i}.weight": torch.full((1, 2), float(i)) for i in range(5000)}, path)
    counter = _OpenCounter(monkeypatch)
    got = dict(iter_tensors(path))
    assert len(got) == 5000 and got["layers.4321.weight"].tolist() == [[4321.0, 4321.0]]
    assert counter.opens == 1 and counter.live == 0
    counter.opens = 0
    start = time.perf_counter()
    result = analyze_file(path)
    assert time.perf_counter() - start < 20  # generous: about 0.5 s here
    assert len(result.layers) + len(result.ignored) == 5000
    assert counter.opens == 0  # analyze_file reads float safetensors with numpy: no safe_open


def test_safetensors_handle_is_reopened_after_a_byte_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # closing the handle unmaps the file, so read tensors' pages do not stay resident on big shards
    path = tmp_path / "w.safetensors"
    save_file({f"w{i}": torch.full((2, 5), float(i)) for i in range(5)}, path)  # 40 bytes each
    monkeypatch.setattr("rmtprune._safetensors_reader._REOPEN_BYTES", 100)
    counter = _OpenCounter(monkeypatch)
    got = list(iter_tensors(path))
    assert [n for n, _ in got] == [f"w{i}" for i in range(5)]
    assert all(t.eq(float(i)).all() for i, (_, t) in enumerate(got))
    assert counter.reads == [(1, "w0"), (1, "w1"), (2, "w2"), (2, "w3"), (3, "w4")]
    assert counter.max_live == 1 and counter.live == 0
    # a tensor larger than the budget gets a handle of its own
    monkeypatch.setattr("rmtprune._safetensors_reader._REOPEN_BYTES", 30)
    counter.reads.clear()
    list(iter_tensors(path, names=["w0", "w1"]))
    assert [number for number, _ in counter.reads] == [4, 5]
    # an iterator dropped part-way closes its handle
    it = iter_tensors(path)
    next(it)
    assert counter.live == 1
    it.close()
    assert counter.live == 0


def test_safetensors_header_over_the_cap_is_not_called_truncated(tmp_path: Path) -> None:
    n = 100_000_092  # over the 100 MB cap
    small = tmp_path / "bighdr-short.safetensors"
    small.write_bytes(struct.pack("<Q", n) + b'{"a": 1}')
    sparse = tmp_path / "bighdr.safetensors"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n + 8)  # enough bytes after the header, without writing 100 MB
    for path in (small, sparse):
        with pytest.raises(CheckpointError) as info:
            list_tensors(path)
        msg = str(info.value)
        assert f"header of {n} bytes exceeds the 100 MB safetensors limit" in msg, msg
        assert path.name in msg and "truncated" not in msg
    # under the cap but beyond the end of the file: truncated
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 5000) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"is truncated: its safetensors header declares 5000 bytes"):
        list_tensors(cut)


def test_a_glob_that_used_to_select_more_as_a_regex_says_so(tmp_path: Path) -> None:
    """``fc`` was a regex (every name containing "fc"); as a glob it is the module ``fc``: say so."""
    import rmtprune

    path = tmp_path / "w.safetensors"
    save_file({k: torch.randn(40, 30) for k in ("fc.weight", "fc1.weight", "head_fc.weight")}, str(path))
    with pytest.warns(
        DeprecationWarning, match=r"'fc' is a shell glob now and matches 1 .* matched 3: write '\*fc\*'"
    ):
        assert [la.name for la in analyze_file(path, include=["fc"]).layers] == ["fc.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert len(analyze_file(path, include=["*fc*"]).layers) == 3  # the same under both readings
    with pytest.raises(ValueError, match="no tensor .* matches .* as the regular expression"):
        analyze_file(path, include=["head"])
    # the deprecated name keeps reading its patterns as regular expressions for its last release
    with pytest.warns(DeprecationWarning, match="analyze_checkpoint is deprecated"):
        assert len(rmtprune.analyze_checkpoint(path, include=["fc"]).layers) == 3
