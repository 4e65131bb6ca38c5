"""Sparse storage: exact round trips of weights and masks, format choice, files that shrink."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rmtprune.errors import CheckpointError
from rmtprune.masks import masks_of, set_mask
from rmtprune.sparse_format import (
    decode_state_dict,
    decode_tensor,
    encode_state_dict,
    encode_tensor,
    encoded_sizes,
    load_sparse,
    load_sparse_into,
    save_model,
    save_sparse,
    stored_bytes,
    stored_nonzeros,
    tensor_size,
)


def _masked(shape: tuple[int, ...], density: float, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(shape, generator=g) < density
    return w * mask, mask


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "auto"])
@pytest.mark.parametrize(
    "shape,density",
    [((40, 30), 0.5), ((16, 3, 3, 3), 0.3), ((7, 5), 0.0), ((7, 5), 1.0), ((1, 9), 0.6), ((33,), 0.5)],
)
def test_tensor_round_trip_is_exact(fmt, shape, density):
    w, mask = _masked(shape, density)
    parts, entry = encode_tensor(w, mask, fmt)
    dense, back = decode_tensor(parts, entry)
    assert torch.equal(back, mask)
    assert torch.equal(dense, w)
    assert entry["nnz"] == int(mask.sum())
    assert all(t.is_contiguous() for t in parts.values())


def test_kept_zero_stays_kept():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    mask = torch.tensor([[True, True], [False, True]])
    for fmt in ("bitmask", "csr"):
        dense, back = decode_tensor(*encode_tensor(w * mask, mask, fmt))
        assert torch.equal(back, mask)


@pytest.mark.parametrize(
    "density,expected", [(0.5, "bitmask"), (0.2, "bitmask"), (0.02, "csr"), (0.0, "csr")]
)
def test_auto_picks_the_smaller_pattern(density, expected):
    w, mask = _masked((128, 256), density)
    parts, entry = encode_tensor(w, mask, "auto")
    assert entry["format"] == expected
    sizes = {f: stored_bytes(encode_tensor(w, mask, f)[0]) for f in ("bitmask", "csr")}
    assert stored_bytes(parts) == min(sizes.values())


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "auto"])
@pytest.mark.parametrize(
    "shape,density,dtype",
    [
        ((40, 30), 0.5, torch.float32),
        ((40, 30), 0.02, torch.float16),
        ((16, 3, 3, 3), 0.3, torch.float64),
        ((33,), 0.5, torch.bfloat16),
        ((2, 40000), 0.01, torch.float32),  # int32 column indices above 32768 columns
        ((7, 5), 0.0, torch.float32),
    ],
)
def test_tensor_size_is_the_encoded_size(fmt, shape, density, dtype):
    w, mask = _masked(shape, density, dtype=dtype)
    parts, entry = encode_tensor(w, mask, fmt)
    size = tensor_size(shape, int(mask.sum()), dtype, fmt)
    assert size.format == entry["format"] and size.values == entry["nnz"]
    assert size.bytes == stored_bytes(parts)
    assert size.index_bytes == stored_bytes({k: t for k, t in parts.items() if k != "values"})
    assert size.equivalent == size.bytes / w.element_size()


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "auto"])
def test_encoded_sizes_are_the_encoded_state_dict(fmt):
    """Buffers count, a tied tensor counts once, masks or kept counts give the same sizes."""
    net = torch.nn.Sequential(
        torch.nn.Linear(40, 30), torch.nn.BatchNorm1d(30), torch.nn.Linear(30, 40), torch.nn.Linear(40, 30)
    ).half()
    net[3].weight = net[0].weight  # tied: written once, under "0.weight"
    masks = {"2.weight": _masked((40, 30), 0.5, seed=1)[1], "0.weight": _masked((30, 40), 0.03, seed=2)[1]}
    sd = net.state_dict()
    tensors, manifest = encode_state_dict(sd, masks, fmt)
    sizes = encoded_sizes(sd, masks, fmt)
    assert sum(s.bytes for s in sizes.values()) == stored_bytes(tensors)
    assert "3.weight" not in sizes and "1.running_mean" in sizes
    for key, size in sizes.items():
        written = {k: t for k, t in tensors.items() if k == key or k.startswith(key + "@")}
        assert size.bytes == stored_bytes(written)
        assert size.format == (manifest[key]["format"] if key in manifest else "dense")
    counts = {k: int(m.sum()) for k, m in masks.items()}
    assert encoded_sizes(sd, counts, fmt) == sizes
    with pytest.raises(KeyError, match="not in the state dict"):
        encoded_sizes(sd, {"nope.weight": 3}, fmt)
    with pytest.raises(ValueError, match=r"nnz=1201 must be in \[0, 1200\]"):
        encoded_sizes(sd, {"2.weight": 1201}, fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_round_trip(dtype):
    w, mask = _masked((20, 12), 0.4, dtype=dtype)
    parts, entry = encode_tensor(w, mask)
    dense, _ = decode_tensor(parts, entry)
    assert dense.dtype == dtype and torch.equal(dense, w)


def test_state_dict_round_trip_and_counts():
    w1, m1 = _masked((30, 20), 0.3)
    state = {"a.weight": w1, "a.bias": torch.randn(30), "b.weight": torch.randn(5, 30)}
    tensors, manifest = encode_state_dict(state, {"a.weight": m1})
    assert set(manifest) == {"a.weight"} and "a.bias" in tensors and "a.weight" not in tensors
    back, masks = decode_state_dict(tensors, manifest)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert torch.equal(masks["a.weight"], m1)
    assert stored_nonzeros(state, {"a.weight": m1}) == int(m1.sum()) + 30 + 150


def test_file_round_trip_and_shrinks(tmp_path):
    state, masks = {}, {}
    for i in range(3):
        w, m = _masked((128, 128), 0.3, seed=i)
        state[f"l{i}.weight"], masks[f"l{i}.weight"] = w, m
        state[f"l{i}.bias"] = torch.randn(128)
    dense_path, sparse_path = tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors"
    save_file(state, str(dense_path))
    save_sparse(sparse_path, state, masks, metadata={"note": "x"})
    back, bmasks, meta = load_sparse(sparse_path)
    assert meta == {"note": "x"}
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert all(torch.equal(bmasks[k], masks[k]) for k in masks)
    ratio = sparse_path.stat().st_size / dense_path.stat().st_size
    # 30% values + 1/32 bitmask of float32, plus the dense biases
    assert 0.30 < ratio < 0.40
    assert not list(tmp_path.glob(".*.tmp"))


def test_plain_safetensors_loads_without_masks(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path))
    state, masks, meta = load_sparse(path)
    assert masks == {} and meta == {} and torch.equal(state["w"], torch.ones(2, 2))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: encode_tensor(torch.ones(2, 2), torch.ones(3, 2, dtype=torch.bool)),
            ValueError,
            "mask shape",
        ),
        (
            lambda: encode_tensor(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), "coo"),
            ValueError,
            "format",
        ),
        (lambda: encode_tensor([1.0], torch.ones(1, dtype=torch.bool)), TypeError, "torch tensors"),
        (
            lambda: encode_state_dict({"a": torch.ones(1)}, {"b": torch.ones(1, dtype=torch.bool)}),
            KeyError,
            "b",
        ),
        (lambda: encode_state_dict({"a@x": torch.ones(1)}, {}), ValueError, "separator"),
        (
            lambda: decode_tensor({"values": torch.ones(3)}, {"format": "bitmask", "shape": [2, 2]}),
            CheckpointError,
            "lacks",
        ),
        (lambda: decode_tensor({}, {"format": "zip"}), CheckpointError, "unknown sparse format"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_corrupt_parts_raise():
    w, mask = _masked((8, 8), 0.5)
    parts, entry = encode_tensor(w, mask, "bitmask")
    parts["values"] = parts["values"][:-1]
    with pytest.raises(CheckpointError, match="stored values"):
        decode_tensor(parts, entry)
    parts, entry = encode_tensor(w, mask, "csr")
    parts["crow"] = parts["crow"][:-1]
    with pytest.raises(CheckpointError, match="CSR"):
        decode_tensor(parts, entry)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sparse(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_sparse(bad)
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata={"rmtprune.sparse": json.dumps({"x": 1})})
    with pytest.raises(CheckpointError, match="corrupt sparse manifest"):
        load_sparse(path)


def test_model_round_trip_restores_masks(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    mask = torch.rand(30, 20) < 0.4
    set_mask(net[0], mask)
    path = tmp_path / "net.safetensors"
    save_model(path, net, {"model": "x:y"})
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    assert load_sparse_into(path, fresh) == {"model": "x:y"}
    assert torch.equal(masks_of(fresh)["0.weight"], mask)
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_sparse_into(path, torch.nn.Sequential(torch.nn.Linear(20, 5)))


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(12, 20)
        self.proj = torch.nn.Linear(20, 20)
        self.out = torch.nn.Linear(20, 12, bias=False)
        self.out.weight = self.emb.weight  # tied


def test_tied_weights_stored_once(tmp_path):
    torch.manual_seed(0)
    net = _Tied()
    set_mask(net.proj, torch.rand(20, 20) < 0.5)
    path = tmp_path / "tied.safetensors"
    manifest = save_model(path, net)
    assert set(manifest) == {"proj.weight"}
    state, _, _ = load_sparse(path)
    assert ("emb.weight" in state) != ("out.weight" in state)
    fresh = _Tied()
    load_sparse_into(path, fresh)
    assert torch.equal(fresh.out.weight, net.emb.weight) and fresh.out.weight is fresh.emb.weight
    assert torch.equal(masks_of(fresh)["proj.weight"], masks_of(net)["proj.weight"])


# ----------------------------------------------------------------------------- crafted manifests (issue 10)


def _crafted(tmp_path, tensors, manifest, name="crafted.safetensors"):
    path = tmp_path / name
    meta = {"rmtprune.sparse": manifest if isinstance(manifest, str) else json.dumps({"tensors": manifest})}
    save_file(tensors, str(path), metadata=meta)
    return path


_CSR_PARTS = {
    "w@values": torch.ones(2),
    "w@crow": torch.tensor([0, 1, 2], dtype=torch.int32),
    "w@col": torch.tensor([0, 3], dtype=torch.int16),
}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"format": "csr", "shape": [2, 4], "nnz": 2}, None),  # the valid one
        ({"format": "csr", "shape": [2, 4], "nnz": 3}, r"part 'values' is stored as \[2\], expected \[3\]"),
        ({"format": "csr", "shape": [3, 4], "nnz": 2}, r"part 'crow' is stored as \[3\], expected \[4\]"),
        ({"format": "csr", "shape": [2, 3], "nnz": 2}, "CSR parts do not fit shape"),  # column 3 of 3
        ({"format": "csr", "shape": [2, 4], "nnz": -1}, r"nnz -1, not an integer in \[0, 8\]"),
        ({"format": "csr", "shape": [2, 4], "nnz": 2.0}, "nnz 2.0"),
        ({"format": "csr", "shape": [2, -4], "nnz": 2}, "invalid shape"),
        ({"format": "csr", "shape": "2x4", "nnz": 2}, "invalid shape"),
        ({"format": "csr", "shape": [2, 4], "nnz": 2, "dtype": "float64"}, "says dtype 'float64'"),
        ({"format": ["csr"], "shape": [2, 4]}, "unknown sparse format"),
        ({"format": "bitmask", "shape": [2, 4], "nnz": 2}, r"has parts \['col', 'crow', 'values'\]"),
        ({"format": "csr", "shape": [1, 2**40], "nnz": 2}, "CSR parts|crow"),
    ],
)
def test_crafted_manifest_gives_checkpoint_error(tmp_path, entry, match):
    path = _crafted(tmp_path, _CSR_PARTS, {"w": entry})
    if match is None:
        state, masks, _ = load_sparse(path)
        assert masks["w"].nonzero().tolist() == [[0, 0], [1, 3]]
        return
    with pytest.raises(CheckpointError, match=match) as info:
        load_sparse(path)
    assert "crafted.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_crafted_indices_and_expansion(tmp_path):
    bad_crow = dict(_CSR_PARTS, **{"w@crow": torch.tensor([0, 2, 1], dtype=torch.int32)})
    entry = {"w": {"format": "csr", "shape": [2, 4], "nnz": 2}}
    with pytest.raises(CheckpointError, match="CSR parts do not fit"):
        load_sparse(_crafted(tmp_path, bad_crow, entry))
    negative = dict(_CSR_PARTS, **{"w@col": torch.tensor([0, -1], dtype=torch.int16)})
    with pytest.raises(CheckpointError, match="CSR parts do not fit"):
        load_sparse(_crafted(tmp_path, negative, entry))
    # a 1 x 2**40 matrix with nothing kept: consistent parts, but 8 TB to decode from 300 bytes
    empty = {
        "w@values": torch.zeros(0),
        "w@crow": torch.zeros(2, dtype=torch.int32),
        "w@col": torch.zeros(0, dtype=torch.int16),
    }
    path = _crafted(tmp_path, empty, {"w": {"format": "csr", "shape": [1, 2**40], "nnz": 0}})
    with pytest.raises(CheckpointError, match="would decode to .* more than 1024 times"):
        load_sparse(path)
    for text in ('{"tensors": {"w": {"format": "csr", "shape": [Infinity]}}}', "[" * 5000 + "]" * 5000):
        with pytest.raises(CheckpointError, match="corrupt sparse manifest"):
            load_sparse(_crafted(tmp_path, _CSR_PARTS, text))
    both = dict(_CSR_PARTS, w=torch.ones(2, 4))
    with pytest.raises(CheckpointError, match="stored both dense and sparse"):
        load_sparse(_crafted(tmp_path, both, entry))


def test_load_model_is_a_deprecated_name_of_load_sparse_into(tmp_path) -> None:
    from rmtprune.sparse_format import load_model

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    save_model(tmp_path / "m.safetensors", net, {"k": 1})
    with pytest.warns(DeprecationWarning, match="use load_sparse_into"):
        assert load_model(tmp_path / "m.safetensors", torch.nn.Sequential(torch.nn.Linear(4, 3))) == {"k": 1}
