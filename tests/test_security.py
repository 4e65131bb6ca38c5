"""Security and data safety (docs/security.md): a file never runs code; no command loses a user's file.

Each test is one item of the promise: the factory a file records is never imported or called
unless the user opts in; crafted manifests and sizes give one clean line before anything is built;
outputs are checked before any work and never replace an input or a file rmtprune did not write;
a failure, Ctrl-C, a full disk or SIGKILL leaves every target complete (old or new).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import rmtprune
from rmtprune import io as rio
from rmtprune.cli import main
from rmtprune.errors import CheckpointError
from rmtprune.zoo.models import build_model


def _digest(path: Path) -> bytes:
    return path.read_bytes()


def _manifest(**over) -> dict:
    base = {"format": "rmtprune-checkpoint", "format_version": 1, "factory": None, "layers": {}}
    base.update(over)
    return base


def _write(path: Path, tensors: dict, manifest) -> Path:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors, str(path), metadata={"rmtprune": text})
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmtprune: error: "), err
    return err[0]


# ------------------------------------------------------------------------------------- code execution


@pytest.mark.parametrize(
    "factory, args",
    [
        ("os:system", {"command": "echo ran > pwned.txt"}),
        ("builtins:breakpoint", {}),
        ("builtins:input", {}),
        ("subprocess:run", {"args": ["touch", "pwned.txt"]}),
        ("evilmod:make", {}),
    ],
)
def test_a_files_factory_is_never_run(tmp_path, monkeypatch, capsys, factory, args) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmod.py").write_text("open('pwned.txt', 'w').write('imported')\ndef make(): pass\n")
    sys.modules.pop("evilmod", None)
    path = rmtprune.save(nn.Sequential(nn.Linear(20, 20)), tmp_path / "evil.safetensors", factory=factory)
    if args:
        meta = rio.read_manifest(path)
        _write(
            path, {"0.weight": torch.zeros(20, 20), "0.bias": torch.zeros(20)}, {**meta, "factory_args": args}
        )
    with pytest.raises(CheckpointError, match="trust_factory=True"):
        rmtprune.load(path)
    for cmd in (
        ["compress", str(path), "out.safetensors", "--dry-run"],
        ["sparsify", str(path), "o.safetensors"],
    ):
        assert main(cmd) == 2
        assert "--trust-factory" in _one_error_line(capsys)
    assert not (tmp_path / "pwned.txt").exists() and "evilmod" not in sys.modules
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.json", "evil.safetensors", "evilmod.py"]


def test_trusted_factory_does_not_import_from_the_current_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    (tmp_path / "cwdmod_sec.py").write_text("from torch import nn\ndef make():\n    return nn.Linear(4, 4)\n")
    path = rmtprune.save(nn.Linear(4, 4), tmp_path / "m.safetensors", factory="cwdmod_sec:make")
    with pytest.raises(CheckpointError, match="cannot import module 'cwdmod_sec'"):
        rmtprune.load(path, trust_factory=True)
    monkeypatch.syspath_prepend(str(tmp_path))  # the user puts it on the path: then it is theirs to trust
    assert isinstance(rmtprune.load(path, trust_factory=True), nn.Linear)


def test_reference_spec_args_are_validated(tmp_path) -> None:
    net = build_model("mlp:16", (1, 4, 4), 3)
    path = rmtprune.save(net, tmp_path / "m.safetensors", factory="mlp:16", factory_args={})
    meta = rio.read_manifest(path)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    for fargs, match in [
        ({"input_shape": [1, 4, 4], "num_classes": 3, "command": "x"}, "unknown factory argument"),
        ({"input_shape": "1,4,4", "num_classes": 3}, "input_shape"),
        ({"input_shape": [1, 4, 4], "num_classes": 1e9}, "num_classes"),
        ({"input_shape": [1, 4, 4]}, "needs input_shape and num_classes"),
        ({"input_shape": [1, 4, 4], "num_classes": 3}, None),
    ]:
        _write(path, sd, {**meta, "factory_args": fargs})
        if match is None:
            assert isinstance(rmtprune.load(path), nn.Module)
        else:
            with pytest.raises(CheckpointError, match=match):
                rmtprune.load(path)


# --------------------------------------------------------------------------- crafted manifests and sizes

_LAYER = {"type": "LowRankLinear", "original_type": "Linear", "rank": 2, "matrix_shape": [8, 8], "bias": True}


@pytest.mark.parametrize(
    "manifest, match",
    [
        (_manifest(layers=[]), "'layers' must be an object"),
        (_manifest(layers={"0": {k: v for k, v in _LAYER.items() if k != "matrix_shape"}}), "matrix_shape"),
        (_manifest(layers={"0": {**_LAYER, "rank": -1}}), "rank=-1"),
        (_manifest(layers={"0": {**_LAYER, "rank": 10**9}}), "rank=1000000000"),
        (_manifest(layers={"0": {**_LAYER, "rank": True}}), "rank=True"),
        (_manifest(layers={"0": {**_LAYER, "matrix_shape": [8]}}), "matrix_shape"),
        (_manifest(layers={"0": {**_LAYER, "matrix_shape": [8, 1e400]}}), "matrix_shape"),
        (_manifest(layers={"0": {**_LAYER, "type": "os.system"}}), "type="),
        (_manifest(layers={"0": "x"}), "object"),
        (_manifest(factory=3), "factory=3"),
        (_manifest(factory_args=[1]), "factory_args"),
        (_manifest(format_version=[1]), "format_version"),
        (_manifest(format_version=99), "format_version=99"),
        ('{"format": "rmtprune-checkpoint", "layers": {', "corrupt"),
        (json.dumps([1, 2]), "not an rmtprune manifest"),
    ],
)
def test_malformed_manifests_are_clean_errors(tmp_path, capsys, manifest, match) -> None:
    path = _write(tmp_path / "m.safetensors", {"0.weight": torch.zeros(8, 8)}, manifest)
    with pytest.raises(CheckpointError, match=match):
        rmtprune.load(path, nn.Sequential(nn.Linear(8, 8)))
    assert main(["compress", str(path), str(tmp_path / "o.safetensors"), "--trust-factory"]) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_huge_spec_in_a_small_file_is_refused_before_allocating(tmp_path, capsys) -> None:
    fargs = {"input_shape": [1, 28, 28], "num_classes": 10}
    path = _write(
        tmp_path / "big.safetensors",
        {"fc1.weight": torch.zeros(10, 10)},
        _manifest(factory="mlp:4000000", factory_args=fargs),
    )
    assert path.stat().st_size < 50_000
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="more than 4096x its size"):
        rmtprune.load(path)
    assert main(["compress", str(path), str(tmp_path / "o.safetensors")]) == 2
    assert time.perf_counter() - t0 < 5  # 3.1e9 parameters were never allocated (12.5 GB)
    _one_error_line(capsys)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("mlp:99999999999999999999", "at most"),
        ("mlp:10x99999999", "more than 10000 layers"),
        ("vit:dim=64,mlp_ratio=1e300", "mlp_ratio"),
        ("vit:dim=64,mlp_ratio=inf", "finite"),
        ("vit:dim=100000,depth=100", "memory available"),
    ],
)
def test_absurd_specs_are_one_line(capsys, spec, match) -> None:
    assert main(["compress", "--model", spec, "--dataset", "mnist", "--dry-run", "--no-progress"]) == 2
    assert match in _one_error_line(capsys)


# ----------------------------------------------------------------------------------- data loss


@pytest.fixture
def net_file(tmp_path) -> Path:
    torch.manual_seed(0)
    net = build_model("mlp:64", (1, 8, 8), 4)
    fargs = {"input_shape": [1, 8, 8], "num_classes": 4}
    return rmtprune.save(net, tmp_path / "net.safetensors", factory="mlp:64", factory_args=fargs)


def test_recut_in_place_keeps_the_file_when_the_report_cannot_be_written(net_file, capsys) -> None:
    before = _digest(net_file)
    (net_file.parent / "net.report.md").mkdir()
    assert main(["compress", str(net_file), str(net_file), "--no-progress"]) == 2
    assert "is a directory" in _one_error_line(capsys)
    assert _digest(net_file) == before


def test_ctrl_c_while_writing_the_report_leaves_everything(net_file, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in net_file.parent.iterdir()}
    real = Path.write_text

    def interrupted(self, *a, **k):
        if self.name.endswith(".report.md"):
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", interrupted)
    assert main(["compress", str(net_file), str(net_file), "--no-progress", "--quiet"]) == 130
    assert {p.name: p.read_bytes() for p in net_file.parent.iterdir()} == before  # no temp file either
    monkeypatch.setattr(Path, "write_text", real)
    assert main(["compress", str(net_file), str(net_file), "--no-progress", "--quiet"]) == 0
    assert rio.read_manifest(net_file)["layers"]  # re-cut in place once it may succeed


def test_analyze_refuses_to_write_over_its_input(net_file, capsys) -> None:
    before = _digest(net_file)
    for opt in ("--json", "--csv"):
        assert main(["analyze", str(net_file), opt, str(net_file), "--no-progress"]) == 2
        assert "is an input of this command" in _one_error_line(capsys)
    assert _digest(net_file) == before


def test_sidecars_never_replace_a_users_file(net_file, tmp_path, capsys) -> None:
    cfg = tmp_path / "out.json"  # the user's config happens to be named like OUT's manifest
    cfg.write_text(json.dumps({"rule": "bema", "keep_bulk": 0.1}))
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(net_file), str(out), "--config", str(cfg), "--force"]) == 2
    assert "is an input of this command" in _one_error_line(capsys)
    assert main(["compress", str(net_file), str(out), "--no-progress"]) == 2
    assert "was not written by rmtprune" in _one_error_line(capsys)
    notes = tmp_path / "report.json"
    notes.write_text('{"mine": 1}')
    assert main(["analyze", str(net_file), "--json", str(notes), "--no-progress"]) == 2
    _one_error_line(capsys)
    assert json.loads(cfg.read_text())["keep_bulk"] == 0.1 and notes.read_text() == '{"mine": 1}'
    assert not out.exists()
    # rmtprune's own sidecars are replaced freely, a user's only with --force
    assert main(["analyze", str(net_file), "--json", str(notes), "--no-progress", "--force"]) == 0
    assert main(["analyze", str(net_file), "--json", str(notes), "--no-progress"]) == 0
    assert main(["compress", str(net_file), str(out), "--no-progress", "--force"]) == 0
    assert main(["compress", str(net_file), str(out), "--no-progress"]) == 0


def test_save_refuses_a_users_json_beside_it(tmp_path) -> None:
    (tmp_path / "model.json").write_text('{"my": "notes"}')
    with pytest.raises(CheckpointError, match="was not written by rmtprune"):
        rmtprune.save(nn.Linear(2, 2), tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]
    rmtprune.save(nn.Linear(2, 2), tmp_path / "model.safetensors", force=True)
    rmtprune.save(nn.Linear(2, 2), tmp_path / "model.safetensors")  # now it is ours


def test_out_a_directory_is_refused_before_any_work(net_file, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "o.safetensors").mkdir()
    monkeypatch.setattr("rmtprune.surgery.plan", lambda *a, **k: pytest.fail("work started"))
    assert main(["compress", str(net_file), str(tmp_path / "o.safetensors")]) == 2
    assert "is a directory" in _one_error_line(capsys)
    assert main(["sparsify", str(net_file), str(tmp_path / "o.safetensors")]) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors", "o.safetensors"]


# ------------------------------------------------------------------------------------------ disk full


@contextlib.contextmanager
def _tiny_disk(tmp_path: Path):
    """A real 256 kB tmpfs where the machine allows mount (root), else None."""
    where = tmp_path / "tiny"
    where.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield where if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(net_file, tmp_path, capsys, monkeypatch) -> None:
    big = build_model("mlp:512", (1, 16, 16), 10)  # 0.5 MB of float32
    fargs = {"input_shape": [1, 16, 16], "num_classes": 10}
    src = rmtprune.save(big, tmp_path / "big.safetensors", factory="mlp:512", factory_args=fargs)
    with _tiny_disk(tmp_path) as disk:
        if disk is None:  # not root: inject ENOSPC into the writer instead

            def full(*a, **k):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr("safetensors.torch.save_model", full)
            disk = tmp_path / "inj"
            disk.mkdir()
        out = disk / "out.safetensors"
        assert (
            main(["compress", str(src), str(out), "--rule", "fixed", "--ratio", "0.9", "--no-progress"]) == 2
        )
        assert "No space left on device" in _one_error_line(capsys)
        assert list(disk.iterdir()) == []


# --------------------------------------------------------------------------------------------- SIGKILL


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill_run(cmd: list[str], cwd: Path, rng, full: float, in_write: bool) -> None:
    """Start ``cmd``; SIGKILL it at a seeded random time, or a seeded instant after its temp appears."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if in_write:
        deadline = time.perf_counter() + 3 * full
        while not any(".rmtprune-" in p.name for p in cwd.iterdir()) and time.perf_counter() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
    else:
        time.sleep(rng.uniform(0.2, 1.0) * full)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkill_during_compress_leaves_old_or_new_and_no_temp_survives(tmp_path) -> None:
    """Kill ``compress NET NET`` at seeded points, half of them inside the save: NET stays complete."""
    import random

    torch.manual_seed(0)
    net = build_model("mlp:1500,1000", (1, 28, 28), 10)  # 2.7M params, 11 MB
    fargs = {"input_shape": [1, 28, 28], "num_classes": 10}
    path = rmtprune.save(net, tmp_path / "net.safetensors", factory="mlp:1500,1000", factory_args=fargs)
    old = path.read_bytes()
    cmd = [sys.executable, "-m", "rmtprune.cli", "compress", "net.safetensors", "net.safetensors"]
    cmd += ["--rule", "fixed", "--ratio", "0.5", "--no-progress", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tmp_path, env=_ENV, check=True, capture_output=True)
    full = time.perf_counter() - t0
    new = path.read_bytes()
    assert new != old
    rng = random.Random(10)
    mid_write = 0
    for k in range(6):
        path.write_bytes(old)
        _kill_run(cmd, tmp_path, rng, full, in_write=k % 2 == 0)
        mid_write += any(".rmtprune-" in p.name for p in tmp_path.iterdir())
        now = path.read_bytes()
        assert now in (old, new), f"kill {k}: a partial file"
        assert isinstance(rmtprune.load(path), nn.Module)  # complete and loadable, whichever it is
    assert mid_write >= 2  # the kills did land inside the save, leaving its temporaries behind
    # the next run cleans the temporaries of the killed ones
    path.write_bytes(old)
    subprocess.run(cmd, cwd=tmp_path, env=_ENV, check=True, capture_output=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert path.read_bytes() == new


def test_demo_refuses_a_users_files_in_out_before_training(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes\n")
    monkeypatch.setattr("rmtprune.training.train", lambda *a, **k: pytest.fail("training started"))
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
    assert "was not written by rmtprune" in _one_error_line(capsys)
    assert (out / "summary.md").read_text() == "my notes\n"


def test_train_refuses_a_users_files_in_out_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    args = ["train", "--dataset", "digits", "--model", "mlp:16", "--epochs", "1", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 2
    assert "config.json that this run would overwrite" in _one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert main([*args, "--no-progress", "--quiet", "--force"]) == 0
    assert (out / "checkpoint.pt").exists()


def test_analyze_plots_never_replace_a_users_png(net_file, tmp_path, capsys) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "summary.png").write_bytes(b"\x89PNG my holiday photo")
    assert main(["analyze", str(net_file), "--plots", str(plots), "--no-progress"]) == 2
    assert "was not written by rmtprune" in _one_error_line(capsys)
    assert [p.name for p in plots.iterdir()] == ["summary.png"]
    (plots / "summary.png").unlink()
    assert main(["analyze", str(net_file), "--plots", str(plots), "--no-progress"]) == 0
    assert main(["analyze", str(net_file), "--plots", str(plots), "--no-progress"]) == 0  # its own plots


def test_atomic_temp_names_fit_and_only_dead_writers_are_cleaned(tmp_path) -> None:
    from rmtprune._atomic import atomic_write_text, clean_stale, temp_name_re

    long = tmp_path / ("n" * 240 + ".json")  # the temporary folder's name must still fit NAME_MAX
    atomic_write_text(long, "x")
    assert long.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == [long.name]
    target = tmp_path / "out.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.safetensors.rmtprune-{dead_pid}-0badc0de.tmp"
    live = tmp_path / f".out.safetensors.rmtprune-{os.getppid()}-0badc0de.tmp"  # pytest's parent: alive
    other = tmp_path / ".out.safetensors.userfile.tmp"  # not our pattern: never touched
    for p in (stale, live):
        p.mkdir()
        (p / "out.safetensors").write_bytes(b"partial")
    other.write_text("mine")
    assert temp_name_re(target.name).match(stale.name)
    assert clean_stale(target) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_a_small_file_cannot_make_load_build_a_huge_dense_model(tmp_path, capsys) -> None:
    """Red team: 'mlp:25000' on 60000 inputs with rank-1 factors matches a 137 kB file's shapes,
    but the dense build it needs first is 6 GB: refused before any allocation."""
    layers = {
        "fc1": {**_LAYER, "rank": 1, "matrix_shape": [25000, 60000]},
        "head": {**_LAYER, "rank": 1, "matrix_shape": [10, 25000]},
    }
    tensors = {
        "fc1.first.weight": torch.zeros(1, 60000, dtype=torch.int8),
        "fc1.second.weight": torch.zeros(25000, 1, dtype=torch.int8),
        "fc1.second.bias": torch.zeros(25000, dtype=torch.int8),
        "head.first.weight": torch.zeros(1, 25000, dtype=torch.int8),
        "head.second.weight": torch.zeros(10, 1, dtype=torch.int8),
        "head.second.bias": torch.zeros(10, dtype=torch.int8),
    }
    fargs = {"input_shape": [60000], "num_classes": 10}
    path = _write(
        tmp_path / "amp.safetensors",
        tensors,
        _manifest(factory="mlp:25000", factory_args=fargs, layers=layers),
    )
    t0 = time.perf_counter()
    assert main(["compress", str(path), str(tmp_path / "o.safetensors"), "--dry-run"]) == 2
    assert "more than 4096x its size" in _one_error_line(capsys)
    assert time.perf_counter() - t0 < 5


def test_an_inputs_own_manifest_is_never_a_report(net_file, capsys) -> None:
    """Red team: `sparsify NET OUT --report NET` and `analyze NET --json NET.json` replaced NET.json."""
    manifest = net_file.with_suffix(".json")
    before = manifest.read_bytes()
    stem = str(net_file.with_suffix(""))
    out = str(net_file.parent / "o.safetensors")
    assert main(["sparsify", str(net_file), out, "--report", stem, "--no-progress"]) == 2
    assert "is an input of this command" in _one_error_line(capsys)
    assert main(["analyze", str(net_file), "--json", str(manifest), "--no-progress"]) == 2
    _one_error_line(capsys)
    other = net_file.parent / "other.json"  # a checkpoint manifest is not a report anywhere
    other.write_bytes(before)
    assert main(["analyze", str(net_file), "--json", str(other), "--no-progress"]) == 2
    assert "was not written by rmtprune" in _one_error_line(capsys)
    assert manifest.read_bytes() == before and other.read_bytes() == before


def test_a_users_matplotlib_png_is_not_taken_for_ours(net_file, tmp_path, capsys) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    plots = tmp_path / "figs"
    plots.mkdir()
    Figure().savefig(plots / "summary.png")  # the user's own figure, made with matplotlib
    before = (plots / "summary.png").read_bytes()
    assert main(["analyze", str(net_file), "--plots", str(plots), "--no-progress"]) == 2
    assert "was not written by rmtprune" in _one_error_line(capsys)
    assert (plots / "summary.png").read_bytes() == before


def test_a_symlinked_sidecar_to_another_directory_is_replaced_beside_the_link(net_file, tmp_path) -> None:
    """Red team: the temporary file was made beside the link's target, so the rename crossed
    filesystems (EXDEV) after OUT had been replaced; now it is made beside the link."""
    elsewhere = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path / "elsewhere"
    elsewhere = elsewhere / f"rmtprune-test-{os.getpid()}"
    elsewhere.mkdir(parents=True)
    try:
        manifest = net_file.with_suffix(".json")
        moved = elsewhere / manifest.name
        moved.write_bytes(manifest.read_bytes())
        manifest.unlink()
        manifest.symlink_to(moved)
        before = moved.read_bytes()
        assert main(["compress", str(net_file), str(net_file), "--no-progress", "--quiet"]) == 0
        assert not manifest.is_symlink() and rio.read_manifest(net_file)["layers"]
        assert moved.read_bytes() == before  # the link's target is the user's: untouched
    finally:
        import shutil

        shutil.rmtree(elsewhere, ignore_errors=True)


def test_weights_pt_go_through_the_hardened_reader(tmp_path, capsys) -> None:
    net = build_model("mlp:64", (1, 28, 28), 10)
    sd = net.state_dict()
    sd["fc1.weight"] = sd["fc1.weight"].to_sparse()
    torch.save(sd, tmp_path / "sparse.pt")
    out = str(tmp_path / "o.safetensors")
    assert (
        main(
            [
                "compress",
                "--model",
                "mlp:64",
                "--dataset",
                "mnist",
                "--weights",
                str(tmp_path / "sparse.pt"),
                out,
            ]
        )
        == 2
    )
    assert "fc1.weight" in _one_error_line(capsys)
    assert not Path(out).exists()


def test_a_stray_module_in_cwd_does_not_shadow_installed_packages(tmp_path) -> None:
    """Red team: `--model mymod:make` put the current directory first on sys.path, so a stranger's
    safetensors.py beside mymod.py ran when the checkpoint was written."""
    (tmp_path / "mymod_shadow.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Linear(20, 20)\n"
    )
    (tmp_path / "safetensors.py").write_text(
        "open('pwned.txt', 'w').write('x')\nraise ImportError('shadow')\n"
    )
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "rmtprune.cli",
        "compress",
        "--model",
        "mymod_shadow:make",
        "o.safetensors",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=_ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "pwned.txt").exists() and (tmp_path / "o.safetensors").exists()


def test_trusted_factory_ignores_the_implicit_cwd_entry_of_python_c(tmp_path) -> None:
    (tmp_path / "evilmod_c.py").write_text("open('pwned.txt', 'w').write('x')\ndef make(): pass\n")
    path = rmtprune.save(nn.Linear(4, 4), tmp_path / "e.safetensors", factory="evilmod_c:make")
    code = (
        f"import rmtprune\ntry:\n    rmtprune.load({str(path)!r}, trust_factory=True)\n"
        "except Exception as e:\n    print(type(e).__name__)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_ENV, capture_output=True, text=True)
    assert "CheckpointError" in run.stdout, run.stderr
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize(
    "shape, match", [("3,28,28", "does not fit the model"), ("1000,100000,100000", "values per sample")]
)
def test_a_wrong_input_shape_is_one_line(tmp_path, monkeypatch, capsys, shape, match) -> None:
    (tmp_path / "mymod_shape.py").write_text(
        "from torch import nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 20))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["compress", "--model", "mymod_shape:make", "--input-shape", shape, "--dry-run", "--no-progress"]
    assert main(args) == 2
    assert match in _one_error_line(capsys)
