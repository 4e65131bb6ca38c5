"""``rmtprune analyze``: table, summary, JSON/CSV/plots, exit statuses, and bad input without tracebacks."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rmtprune.cli import main


def spiked(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    return torch.randn(m, n, generator=g) / n**0.5 + 6.0 * u @ v.T


def tiny_model() -> dict[str, torch.Tensor]:
    """A tiny MLP + conv state dict: two fitted layers, one too small, and tensors that are ignored."""
    g = torch.Generator().manual_seed(0)
    return {
        "features.0.weight": torch.randn(24, 3, 3, 3, generator=g) * 0.1,
        "features.0.bias": torch.zeros(24),
        "fc1.weight": spiked(64, 96, rank=4, seed=1),
        "fc1.bias": torch.zeros(64),
        "out.weight": torch.randn(1, 64, generator=g),
        "bn.num_batches_tracked": torch.tensor(5),
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(tiny_model(), path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_and_summary(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, ckpt)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:12] == [
        "layer",
        "shape",
        "gamma",
        "sigma2",
        "s_plus",
        "spikes",
        "bulk",
        "ks",
        "pl_alpha",
        "hill",
        "srank",
        "verdict",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert (
        rows["fc1.weight"][1] == "64x96" and rows["fc1.weight"][5] == "4" and rows["fc1.weight"][11] == "fit"
    )
    assert float(rows["fc1.weight"][8]) > 1 and float(rows["fc1.weight"][10]) >= 1  # alpha, stable rank
    assert rows["features.0.weight"][1] == "24x3x3x3"
    assert rows["out.weight"][2:12] == ["-"] * 9 + ["too-small"]
    assert "p=1 < 10" in out
    at = next(i for i, line in enumerate(lines) if "layers analysed" in line)
    assert lines[at].endswith(
        "(safetensors): 3 layers analysed (2 fit, 0 no-mp-bulk, 1 too-small, 0 invalid); "
        "3 tensors ignored (1 non-float, 2 1-D/scalar)"
    )
    assert lines[at + 1].startswith("ESD metrics, mean over 2 layers with a fit: alpha=")
    # a heavy-tail note follows only when the tail test fires on some layer
    assert all(line.startswith("heavy-tailed entries in ") for line in lines[at + 2 :])


def test_json_and_csv(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(
        capsys, ckpt, "--json", tmp_path / "a.json", "--csv", tmp_path / "a.csv", "--ks-max", "0.2"
    )
    assert code == 0
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["ks_max"] == 0.2 and d["format"] == "safetensors" and d["counts"]["fit"] == 2
    assert [x["layer"] for x in d["layers"]] == ["fc1.weight", "features.0.weight", "out.weight"]
    assert {x["name"]: x["reason"] for x in d["ignored"]}["bn.num_batches_tracked"] == "non-float"
    with open(tmp_path / "a.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["layer"] for r in rows] == [x["layer"] for x in d["layers"]]
    fc1 = rows[0]
    assert fc1["shape"] == "64x96" and fc1["n_spikes"] == "4" and fc1["verdict"] == "fit"
    assert float(fc1["ks"]) == pytest.approx(d["layers"][0]["ks"])
    assert rows[2]["ks"] == "" and rows[2]["verdict"] == "too-small"
    # the ESD metrics: nested in the JSON (their alpha is not BEMA's), esd_* columns in the CSV
    m = d["layers"][0]["metrics"]
    assert float(fc1["esd_alpha"]) == pytest.approx(m["alpha"]) and m["stable_rank"] >= 1
    assert d["layers"][2]["metrics"] is None and rows[2]["esd_alpha"] == ""
    assert d["summary"]["n_layers"] == 2 and "alpha" in d["summary"]


def test_plots(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, ckpt, "--plots", tmp_path / "plots")
    assert code == 0 and "wrote 3 plots" in out
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["esd-fc1.weight.png", "esd-features.0.weight.png", "summary.png"]


def test_include_exclude_repeatable(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, ckpt, "--include", "fc1", "--include", "features", "--exclude", "bias")
    assert code == 0
    assert "fc1.weight" in out and "features.0.weight" in out and "out.weight" not in out
    assert "4 of 6 tensors filtered out by include/exclude" in out


def test_invalid_layer_exit_1_after_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = tiny_model()
    sd["fc1.weight"][0, 0] = float("inf")
    save_file(sd, tmp_path / "bad.safetensors")
    code, out, err = run(capsys, tmp_path / "bad.safetensors", "--json", tmp_path / "r.json")
    assert code == 1
    assert "features.0.weight" in out and "fit" in out and "1 invalid" in out
    assert "layer 'fc1.weight' contains NaN or Inf" in out
    assert err.strip() == "rmtprune: 1 layer(s) with NaN or Inf weights: 'fc1.weight'"
    verdicts = {x["layer"]: x["verdict"] for x in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert verdicts["fc1.weight"] == "invalid" and verdicts["features.0.weight"] == "fit"


def _write_bad(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / kind
    if kind == "missing.safetensors":
        return path
    if kind == "empty.safetensors":
        path.write_bytes(b"")
    elif kind == "cut.safetensors":
        save_file(tiny_model(), tmp_path / "full.safetensors")
        path.write_bytes((tmp_path / "full.safetensors").read_bytes()[:-50])
    elif kind == "random.bin":
        path.write_bytes(b"\x00" + bytes(range(1, 256)) * 8)
    elif kind == "readme.txt":
        path.write_text("not a checkpoint\n")
    elif kind == "module.pt":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "nodir":
        path.mkdir()
        (path / "config.json").write_text("{}")
    return path


BAD = {
    "missing.safetensors": "does not exist",
    "empty.safetensors": "is empty (0 bytes)",
    "cut.safetensors": "is truncated",
    "random.bin": "is not a PyTorch checkpoint",
    "readme.txt": "is not a checkpoint",
    "module.pt": "arbitrary code execution",
    "nodir": "holds no *.safetensors files",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_exit_2_one_line_no_partial_output(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_bad(kind, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run(
        capsys, path, "--json", out_dir / "r.json", "--csv", out_dir / "r.csv", "--plots", out_dir / "plots"
    )
    assert code == 2 and out == ""
    assert err.startswith("rmtprune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert BAD[kind] in err and path.name in err
    assert list(out_dir.iterdir()) == []  # nothing written, not even a temp file


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--include", "fc1("], "include pattern 'fc1(' is not a valid regular expression"),
        (["--exclude", "(*x"], "exclude pattern '(*x' is not a valid regular expression"),
        (["--exclude", "[z-a]"], "exclude pattern '[z-a]' is not a valid regular expression or glob"),
        (["--include", "^nope$"], "no tensor of"),
        (["--alpha", "0.6"], "alpha=0.6 must be in (0, 0.5)"),
        (["--beta", "1.5"], "beta=1.5 must be in [0.01, 0.99]"),
        (["--ks-max", "-1"], "ks_max=-1.0 must be in [0, inf]"),
        (["--plots", "/nonexistent-dir/plots"], "does not exist"),
        (["--json", "/nonexistent-dir/a.json"], "does not exist"),
    ],
)
def test_user_errors_exit_2(
    argv: list[str], match: str, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, ckpt, *argv)
    assert code == 2 and match in err and "Traceback" not in err


def test_json_target_is_a_directory(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, ckpt, "--json", tmp_path)
    assert code == 2 and "is a directory" in err


def test_help_documents_the_gate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--ks-max KS" in text and "(default: 0.1)" in text
    assert "exit status: 0 all layers analysed, 1 some layer is invalid, 2 bad input" in text


@pytest.mark.skipif(shutil.which("rmtprune") is None, reason="console script not installed")
def test_console_script(ckpt: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        ["rmtprune", "analyze", str(ckpt), "--no-progress", "--csv", str(tmp_path / "r.csv")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fc1.weight" in done.stdout and (tmp_path / "r.csv").is_file()
    bad = subprocess.run(
        ["rmtprune", "analyze", str(tmp_path / "nope.pt")], capture_output=True, text=True, timeout=300
    )
    assert (
        bad.returncode == 2 and bad.stderr.startswith("rmtprune: error: ") and "Traceback" not in bad.stderr
    )


def test_plots_without_matplotlib_fail_before_the_analysis(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rmtprune.plotting

    monkeypatch.setattr(rmtprune.plotting, "have_matplotlib", lambda: False)
    code, out, err = run(capsys, ckpt, "--plots", tmp_path / "plots")
    assert code == 2 and out == "" and "rmtprune[plot]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plots").exists()


def test_randomize_device_and_threads(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, ckpt, "--json", tmp_path / "a.json", "--randomize", "--device", "cpu", "--threads", "1"
    )
    assert code == 0 and err == ""
    d = json.loads((tmp_path / "a.json").read_text())
    fitted = [x for x in d["layers"] if x["metrics"] is not None]
    assert len(fitted) == 2 and all(x["traps"]["n_traps"] >= 0 for x in fitted)
    assert "traps" not in d["layers"][2]  # too-small: no fit, no traps
    code, _, err = run(capsys, ckpt, "--device", "nonsense")
    assert code == 2 and "not a torch device" in err


def test_conv_metrics_ww_changes_only_the_conv_layer(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, ckpt, "--json", tmp_path / "m.json")
    code_ww, _, err_ww = run(capsys, ckpt, "--json", tmp_path / "w.json", "--conv-metrics", "ww")
    assert code == code_ww == 0 and err == err_ww == ""
    a, b = (
        {x["layer"]: x for x in json.loads((tmp_path / f).read_text())["layers"]}
        for f in ("m.json", "w.json")
    )
    assert a["fc1.weight"] == b["fc1.weight"]
    conv_a, conv_b = a["features.0.weight"], b["features.0.weight"]
    assert {k: v for k, v in conv_a.items() if k != "metrics"} == {
        k: v for k, v in conv_b.items() if k != "metrics"
    }
    assert conv_b["verdict"] == "fit" and conv_b["metrics"]["log_norm"] < conv_a["metrics"]["log_norm"]
    assert (
        conv_a["metrics"]["alpha"] != conv_b["metrics"]["alpha"] and conv_b["metrics"]["mp_softrank"] is None
    )
    with pytest.raises(SystemExit) as info:
        run(capsys, ckpt, "--conv-metrics", "slices")
    assert info.value.code == 2 and "--conv-metrics" in capsys.readouterr().err
