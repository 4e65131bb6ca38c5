"""save / load: round trip, manifest, restructuring, wrong architecture, bad files, atomic writes."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune import io as rio
from rmtprune.errors import CheckpointError, RmtpruneError
from rmtprune.lowrank import LowRankConv2d, LowRankLinear


class Net(nn.Module):
    def __init__(self, hidden: int = 60, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def compressed(dtype: torch.dtype = torch.float32) -> tuple[Net, rmtprune.Plan]:
    torch.manual_seed(0)
    net = Net().to(dtype)
    net.bn.running_mean.normal_()  # a buffer that must travel too
    net, report = rmtprune.compress(net, rule="fixed", rank=6)
    return net, report


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_gives_identical_outputs(tmp_path, dtype: torch.dtype) -> None:
    net, report = compressed(dtype)
    net.eval()
    path = rmtprune.save(net, tmp_path / "net.safetensors", plan=report)
    fresh = Net().to(dtype).eval()
    loaded = rmtprune.load(path, fresh)
    assert loaded is fresh
    assert isinstance(fresh.conv, LowRankConv2d) and fresh.conv.rank == 6
    assert isinstance(fresh.fc1, LowRankLinear) and fresh.fc1.first.weight.dtype == dtype
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_manifest_records_layers_config_and_fits(tmp_path) -> None:
    net, report = compressed()
    path = rmtprune.save(net, tmp_path / "net.safetensors", plan=report, factory="mod:make")
    side = json.loads((tmp_path / "net.json").read_text())
    assert side == rio.read_manifest(path)
    assert side["format"] == rio.FORMAT and side["rmtprune_version"] == rmtprune.__version__
    assert side["layers"]["fc1"] == {
        "type": "LowRankLinear",
        "original_type": "Linear",
        "rank": 6,
        "matrix_shape": [60, 384],
        "weight_shape": [60, 384],
        "bias": True,
    }
    assert side["layers"]["conv"]["original_type"] == "Conv2d"
    assert side["rule"] == "fixed" and side["config"]["rank"] == 6 and side["factory"] == "mod:make"
    assert side["fits"]["fc1"]["rank"] == 6 and side["fits"]["fc1"]["sigma2"] > 0
    assert side["params"] == sum(p.numel() for p in net.parameters())


def test_load_builds_the_model_from_the_recorded_factory(tmp_path, monkeypatch) -> None:
    (tmp_path / "factory_mod_io.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            def make():
                return nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the user's own module, on the path by their choice
    net = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20))
    rmtprune.compress(net, rule="fixed", rank=3)
    path = rmtprune.save(net, tmp_path / "m.safetensors", factory="factory_mod_io:make")
    with pytest.raises(CheckpointError, match="trust_factory=True"):
        rmtprune.load(path)  # a file's MODULE:FACTORY is not run by default (docs/security.md)
    loaded = rmtprune.load(path, trust_factory=True)
    x = torch.randn(3, 40)
    assert isinstance(loaded[0], LowRankLinear) and torch.equal(loaded(x), net(x))
    plain = rmtprune.save(nn.Linear(4, 4), tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="records no factory"):
        rmtprune.load(plain)


def test_plain_and_uncompressed_checkpoints_load(tmp_path) -> None:
    from safetensors.torch import save_model

    torch.manual_seed(1)
    net = Net()
    save_model(net, str(tmp_path / "plain.safetensors"))
    fresh = rmtprune.load(tmp_path / "plain.safetensors", Net())
    assert torch.equal(fresh.fc1.weight, net.fc1.weight)


def test_tied_weights_round_trip(tmp_path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.out = nn.Linear(16, 30, bias=False)
            self.out.weight = self.emb.weight

    net = Tied()
    rmtprune.save(net, tmp_path / "t.safetensors")
    fresh = rmtprune.load(tmp_path / "t.safetensors", Tied())
    assert torch.equal(fresh.out.weight, net.emb.weight) and fresh.out.weight is fresh.emb.weight


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (
            lambda: Net(hidden=50),
            r"layer 'fc1' is a 50x384 Linear in the model, the checkpoint has LowRankLinear",
        ),
        (lambda: Net(classes=12), r"layer 'fc2' tensor 'fc2.weight' is 10x60 in the checkpoint but 12x60"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), r"layer 'conv' \(LowRankConv2d rank 6 .*\) is missing"),
    ],
)
def test_wrong_architecture_names_the_first_mismatching_layer(tmp_path, other, match: str) -> None:
    net, _ = compressed()
    path = rmtprune.save(net, tmp_path / "net.safetensors")
    model = other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(CheckpointError, match=match):
        rmtprune.load(path, model)
    assert [type(m) for m in model.modules()] == types  # restructured layers were put back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dense_tensor_mismatch_names_the_tensor(tmp_path) -> None:
    path = rmtprune.save(Net(), tmp_path / "dense.safetensors")
    with pytest.raises(
        CheckpointError, match=r"layer 'fc2' tensor 'fc2.weight' is 10x60 in the checkpoint but 12x60"
    ):
        rmtprune.load(path, Net(classes=12))
    with pytest.raises(CheckpointError, match=r"layer 'extra' tensor 'extra.weight' \(3x3\) is missing"):
        model = Net()
        model.extra = nn.Linear(3, 3)
        rmtprune.load(path, model)


def test_truncated_and_missing_files(tmp_path) -> None:
    net, _ = compressed()
    path = rmtprune.save(net, tmp_path / "net.safetensors")
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 8):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            rmtprune.load(bad, Net())
    with pytest.raises(CheckpointError, match="does not exist"):
        rmtprune.load(tmp_path / "nope.safetensors", Net())


def test_bad_output_paths_write_nothing(tmp_path, monkeypatch) -> None:
    net, _ = compressed()
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        rmtprune.save(net, tmp_path / "net.pt")
    with pytest.raises(RmtpruneError, match="does not exist"):
        rmtprune.save(net, tmp_path / "missing" / "net.safetensors")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_model", boom)
    with pytest.raises(RmtpruneError, match=r"could not write the model \(disk full\)"):
        rmtprune.save(net, tmp_path / "net.safetensors")
    assert list(tmp_path.iterdir()) == []


_RECORD = {"type": "LowRankLinear", "original_type": "Linear", "rank": 4, "matrix_shape": [48, 48],
           "weight_shape": [48, 48], "bias": True}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rank": 10**9}, r"architecture\['fc1'\] rank=1000000000 must be an int in \[1, min\(m, n\)=48\]"),
        ({"rank": -1}, r"rank=-1 must be an int"),
        ({"rank": 3.0}, r"rank=3.0 must be an int"),
        ({"matrix_shape": [48]}, r"matrix_shape=\[48\] is not two positive ints"),
        (
            {"type": "os.system"},
            r"type='os.system' is not one of LowRankConv1d, LowRankConv2d, LowRankLinear",
        ),
        ({"weight_shape": [0]}, r"weight_shape=\[0\] is not positive ints"),
        ({"bias": None}, r"bias is not a bool"),
        ({"original_type": 3}, r"original_type is not a name"),
    ],
)
def test_check_layer_record_is_the_one_record_check(change: dict, match: str) -> None:
    from rmtprune.manifest import check_layer_record

    assert check_layer_record("fc1", dict(_RECORD)) == _RECORD
    with pytest.raises(KeyError, match=match):  # the caller's error type (training's resume check)
        check_layer_record("fc1", {**_RECORD, **change}, where="architecture['fc1']", error=KeyError)
    with pytest.raises(CheckpointError, match="layer 'fc1' "):
        check_layer_record("fc1", {**_RECORD, **change})


def test_strict_records_need_every_field_and_legacy_ones_do_not() -> None:
    from rmtprune.manifest import check_layer_record

    short = {k: _RECORD[k] for k in ("type", "rank", "matrix_shape")}
    assert check_layer_record("fc1", short) == short  # an older manifest's record
    with pytest.raises(CheckpointError, match="weight_shape=None is not positive ints"):
        check_layer_record("fc1", short, strict=True)


@pytest.mark.parametrize("storage", ["bitmask", "csr", "auto"])
def test_save_writes_masked_weights_in_the_storage_asked_for(tmp_path, storage: str) -> None:
    from safetensors import safe_open

    from rmtprune.masks import masks_of, set_mask
    from rmtprune.sparse_format import manifest_from_metadata, read_metadata, stored_bytes
    from rmtprune.sparsity.storage import encoded_sizes

    torch.manual_seed(0)
    net = Net()
    set_mask(net.fc1, torch.rand(60, 24 * 4 * 4) < 0.5)  # bitmask is the smaller here
    sparse_mask = torch.zeros(10, 60, dtype=torch.bool)
    sparse_mask[[0, 4, 9], [1, 30, 59]] = True
    set_mask(net.fc2, sparse_mask)  # 3 of 600 kept: CSR is the smaller here
    path = rmtprune.save(net, tmp_path / "net.safetensors", storage=storage)
    sparse = manifest_from_metadata(read_metadata(path))
    assert set(sparse) == {"fc1.weight", "fc2.weight"}
    formats = {k: e["format"] for k, e in sparse.items()}
    if storage == "auto":
        assert formats == {"fc1.weight": "bitmask", "fc2.weight": "csr"}
    else:
        assert set(formats.values()) == {storage}
    with safe_open(str(path), framework="pt") as fh:
        in_file = stored_bytes({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    assert in_file == sum(s.bytes for s in encoded_sizes(net.state_dict(), masks_of(net), storage).values())
    torch.manual_seed(1)
    fresh = rmtprune.load(path, Net())
    assert masks_of(fresh).keys() == masks_of(net).keys()
    assert all(torch.equal(masks_of(fresh)[k], m) for k, m in masks_of(net).items())
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("bad", ["coo", "CSR", ""])
def test_save_refuses_an_unknown_storage_and_writes_nothing(tmp_path, bad: str) -> None:
    net, _ = compressed()
    with pytest.raises(ValueError, match=f"storage={bad!r} must be one of auto, bitmask, csr"):
        rmtprune.save(net, tmp_path / "net.safetensors", storage=bad)
    with pytest.raises(ValueError, match=f"storage={bad!r}"):
        rio.write_model(net, tmp_path / "w.safetensors", tmp_path / "w.json", storage=bad)
    assert list(tmp_path.iterdir()) == []


def test_write_checkpoint_is_a_deprecated_name_of_write_model(tmp_path) -> None:
    net, _ = compressed()
    with pytest.warns(DeprecationWarning, match="use write_model"):
        rio.write_checkpoint(net, tmp_path / "a.safetensors", tmp_path / "a.json")
    rio.write_model(net, tmp_path / "b.safetensors", tmp_path / "b.json")
    assert json.loads((tmp_path / "a.json").read_text())["layers"] == rio.factored_layers(net)
    loaded = rmtprune.load(tmp_path / "a.safetensors", Net())
    assert isinstance(loaded.fc1, LowRankLinear)


def test_files_of_the_legacy_format_name_still_load(tmp_path) -> None:
    """Model files written before 0.2 say format "rmtprune-checkpoint"; they load as before."""
    from safetensors.torch import save_model

    net, report = compressed()
    path = rmtprune.save(net, tmp_path / "net.safetensors", plan=report, factory="mlp:8")
    manifest = rio.read_manifest(path)
    assert manifest["format"] == "rmtprune-model" == rio.FORMAT
    legacy = {**manifest, "format": "rmtprune-checkpoint"}
    save_model(net, str(tmp_path / "old.safetensors"), metadata={"rmtprune": json.dumps(legacy)})
    assert rio.read_manifest(tmp_path / "old.safetensors")["format"] == "rmtprune-checkpoint"
    fresh = rmtprune.load(tmp_path / "old.safetensors", Net().eval())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), net.eval()(x))
    legacy["format"] = "rmtprune-something"
    save_model(net, str(tmp_path / "bad.safetensors"), metadata={"rmtprune": json.dumps(legacy)})
    with pytest.raises(CheckpointError, match="not an rmtprune manifest"):
        rmtprune.load(tmp_path / "bad.safetensors", Net())
