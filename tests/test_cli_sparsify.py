"""``rmtprune sparsify``: inputs, outputs written atomically, re-sparsify, dry run, bad input."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from rmtprune import io as rio
from rmtprune.cli import main
from rmtprune.masks import masks_of
from rmtprune.sparse_format import manifest_from_metadata, read_metadata, stored_bytes

FACTORY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10)]
    return nn.Sequential(*layers)

not_callable = 3
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """A user module ``<unique>:make`` importable from the working directory (tmp_path)."""
    name = f"usermodel_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _model(name):
    import importlib

    return importlib.import_module(name).make()


def _sparsity(model) -> float:
    masks = masks_of(model)
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def test_factory_to_sparse_file_and_reports(factory, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rc = main(["sparsify", "--model", f"{factory}:make", str(out), "--target", "0.5", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "budget=signal target=50.0% achieved=50.00%" in text and "layer" in text
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["achieved"] == pytest.approx(0.5, abs=1e-4) and report["target"] == 0.5
    assert (tmp_path / "out.report.md").read_text().startswith("# rmtprune sparsify report")
    assert rio.read_manifest(out)["factory"] == f"{factory}:make"
    assert (tmp_path / "out.json").is_file()  # the manifest beside it, as rmtprune compress writes
    assert manifest_from_metadata(read_metadata(out))  # sparse storage
    model = rio.load(out, trust_factory=True)  # rebuilt from the recorded factory
    assert len(masks_of(model)) >= 2 and _sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("storage", ["auto", "bitmask", "csr"])
def test_output_gives_both_counts_and_the_file_bytes(factory, tmp_path, capsys, storage):
    from safetensors import safe_open

    out = tmp_path / "out.safetensors"
    argv = ["sparsify", "--model", f"{factory}:make", str(out), "--target", "0.7", "--storage", storage]
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert f"nonzero values {report['stored_values']:,} of" in captured.out
    assert (
        f"stored incl. index bytes ({storage}): {report['stored_equiv']:,.0f} parameter-equivalents, "
        f"{report['stored_bytes']:,} bytes"
    ) in captured.out
    assert "nonzero values" in captured.out and "stored incl. index" in captured.out  # the table's columns
    assert report["storage"] == storage and report["stored_bytes"] > 4 * report["stored_values"]
    with safe_open(str(out), framework="pt") as fh:
        in_file = stored_bytes({k: fh.get_tensor(k) for k in list(fh.keys())})
    # OUT is written in the storage asked for: the report's bytes are those of the file's tensors
    # (its header aside), and the sparse manifest records that format for every masked tensor
    assert report["stored_bytes"] == in_file and "warning" not in captured.err
    sparse = manifest_from_metadata(read_metadata(out))
    layers = {f"{r['name']}.weight": r["storage"] for r in report["layers"] if r["storage"] != "dense"}
    assert sparse and set(sparse) == set(layers)
    assert {k: e["format"] for k, e in sparse.items()} == layers
    if storage != "auto":
        assert set(layers.values()) == {storage}
        # the same model as the auto file, decoded from another encoding
        ref = tmp_path / "ref.safetensors"
        assert main(["sparsify", "--model", f"{factory}:make", str(ref), "--target", "0.7", "--quiet"]) == 0
        a, b = rio.load(out, trust_factory=True), rio.load(ref, trust_factory=True)
        assert masks_of(a).keys() == masks_of(b).keys() and len(masks_of(a)) >= 2
        assert all(torch.equal(masks_of(a)[k], masks_of(b)[k]) for k in masks_of(a))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_file_shrinks_with_sparsity(factory, tmp_path):
    dense = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in _model(factory).state_dict().items()}, str(dense))
    sizes = {}
    for t in ("0.5", "0.7"):
        out = tmp_path / f"s{t}.safetensors"
        assert main(["sparsify", "--model", f"{factory}:make", str(out), "--target", t, "--quiet"]) == 0
        sizes[t] = out.stat().st_size / dense.stat().st_size
    assert sizes["0.7"] < sizes["0.5"] < 0.6


def test_resparsify_from_its_own_output(factory, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["sparsify", "--model", f"{factory}:make", str(first), "--target", "0.3", "--quiet"]) == 0
    assert (
        main(
            [
                "sparsify",
                str(first),
                str(second),
                "--target",
                "0.6",
                "--budget",
                "global",
                "--quiet",
                "--trust-factory",
            ]
        )
        == 0
    )
    a, b = rio.load(first, trust_factory=True), rio.load(second, trust_factory=True)
    for key, mask in masks_of(a).items():
        assert not torch.any(masks_of(b)[key] & ~mask)
    assert _sparsity(b) == pytest.approx(0.6, abs=1e-3)


def test_weights_and_config_file(factory, tmp_path):
    weights = tmp_path / "w.pt"
    model = _model(factory)
    with torch.no_grad():
        model[1].weight.mul_(2.0)
    torch.save(model.state_dict(), weights)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"target": 0.4, "budget": "uniform", "n_cycles": 2}))
    out = tmp_path / "o.safetensors"
    argv = ["sparsify", "--model", f"{factory}:make", "--weights", str(weights), "--config", str(cfg)]
    assert main([*argv, str(out), "--target", "0.2", "--quiet"]) == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["budget"] == "uniform" and report["target"] == 0.2 and report["config"]["n_cycles"] == 2


def test_reference_spec_with_dataset_finetunes(tmp_path):
    out = tmp_path / "mlp.safetensors"
    argv = ["sparsify", "--model", "mlp:48", "--dataset", "digits", str(out), "--target", "0.5"]
    argv += ["--cycles", "2", "--cycle-steps", "2", "--finetune-epochs", "0.2", "--quiet"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "mlp.report.json").read_text())
    assert report["eval_before"] is not None and report["final_finetune"]["steps"] > 0
    assert [c["finetune"]["steps"] for c in report["cycles"]] == [2, 2]


def test_dry_run_writes_nothing(factory, tmp_path, capsys):
    out = tmp_path / "dry.safetensors"
    assert main(["sparsify", "--model", f"{factory}:make", str(out), "--target", "0.3", "--dry-run"]) == 0
    assert "planned=30.00%" in capsys.readouterr().out
    assert not out.exists() and not list(tmp_path.glob("dry*"))


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--target", "1.0"], r"target=1.0 must be in \[0, 1\)"),
        (["--target", "-0.2"], r"target=-0.2 must be in \[0, 1\)"),
        (["--theta", "-1"], "theta=-1"),
        (["--include", "nothing"], "no prunable layer"),
    ],
)
def test_bad_values_exit_2(factory, tmp_path, capsys, extra, match):
    rc = main(["sparsify", "--model", f"{factory}:make", str(tmp_path / "x.safetensors"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("rmtprune: error: ")
    assert re.search(match, err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "nosuchmodule:make", "OUT"], "cannot import module 'nosuchmodule'"),
        (["--model", "{factory}:missing", "OUT"], "has no attribute 'missing'"),
        (["--model", "{factory}:not_callable", "OUT"], "is not callable"),
        (["--model", "{factory}", "OUT"], "MODULE:FACTORY"),
        (["--model", "mlp:10", "--input-shape", "1,x", "OUT"], "comma-separated ints"),
        (["--model", "vit:dim=32", "OUT"], "give --dataset"),
        (["OUT"], "give [MODEL_FILE] OUT"),
        (
            ["--model", "{factory}:make", "--weights", "w.pt", "IN", "OUT"],
            "--weights goes with --model alone",
        ),
        (["missing.safetensors", "OUT"], "does not exist"),
        (["--model", "{factory}:make", "--weights", "nope.pt", "OUT"], "does not exist"),
        (["--model", "{factory}:make", "out.bin"], "must end in .safetensors"),
        (["--model", "{factory}:make", "--config", "nope.json", "OUT"], "cannot read --config"),
    ],
)
def test_bad_input_exit_2(factory, tmp_path, capsys, argv, match):
    (tmp_path / "IN").write_bytes(b"")
    argv = [a.replace("{factory}", factory).replace("OUT", str(tmp_path / "o.safetensors")) for a in argv]
    assert main(["sparsify", *argv]) == 2
    assert match in capsys.readouterr().err


def test_weights_that_do_not_fit(factory, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"1.weight": torch.zeros(3, 3)}, str(bad))
    rc = main(
        ["sparsify", "--model", f"{factory}:make", "--weights", str(bad), str(tmp_path / "o.safetensors")]
    )
    assert rc == 2 and "does not match the model: layer '1'" in capsys.readouterr().err


def test_spec_with_shape_flags_and_dry_run_quiet(tmp_path, capsys):
    argv = ["sparsify", "--model", "mlp:32", "--input-shape", "1,8,8", "--num-classes", "10"]
    assert main([*argv, str(tmp_path / "m.safetensors"), "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "planned=50.00%" in out and "nothing written" in out


def test_io_save_stores_masked_layers_sparsely(tmp_path):
    from rmtprune.masks import set_mask

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    set_mask(net[0], torch.eye(4, dtype=torch.bool))
    rio.save(net, tmp_path / "probe.safetensors")
    sparse = manifest_from_metadata(read_metadata(tmp_path / "probe.safetensors"))
    assert sparse is not None and sparse["0.weight"]["nnz"] == 4


def test_compressed_checkpoint_then_sparsify(tmp_path, capsys):
    low, sparse = tmp_path / "low.safetensors", tmp_path / "sparse.safetensors"
    base = ["--model", "mlp:64,64", "--input-shape", "1,8,8", "--num-classes", "10"]
    assert main(["compress", *base, str(low), "--keep-bulk", "0.5", "--factor-always", "--quiet"]) == 0
    argv = ["sparsify", str(low), str(sparse), "--target", "0.4", "--budget", "global", "--no-sv", "--quiet"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "sparse.report.json").read_text())
    kinds = {r["name"]: r["kind"] for r in report["layers"]}
    assert "factored+sparse" in kinds.values(), kinds
    assert rio.read_manifest(sparse)["layers"]  # the factored structure is recorded
    model = rio.load(
        sparse, trust_factory=True
    )  # rebuilt from the recorded factory, factors and masks restored
    assert any(k.endswith(".first.weight") for k in masks_of(model))
