"""``rmtprune compress``: outputs, dry run, checkpoint re-compress, and bad input (exit 2, no files)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import rmtprune
from rmtprune.cli import main
from rmtprune.lowrank import LowRankLinear

FACTORY = textwrap.dedent(
    """
    import math
    import torch
    from torch import nn

    def _planted(m, n, r, seed):
        g = torch.Generator().manual_seed(seed)
        W = 0.02 * torch.randn(m, n, generator=g)
        U = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
        return W + U @ torch.diag(torch.linspace(3, 6, r) * 0.02 * (math.sqrt(m) + math.sqrt(n))) @ V.T

    def mlp():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 120), nn.ReLU(), nn.Linear(120, 80), nn.ReLU(),
                            nn.Linear(80, 10))
        with torch.no_grad():
            net[1].weight.copy_(_planted(120, 64, 5, 1))
            net[3].weight.copy_(_planted(80, 120, 4, 2))
        return net

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                             nn.ReLU(), nn.Flatten(), nn.Linear(32 * 3 * 3, 10))

    def nothing():
        return nn.Sequential(nn.ReLU(), nn.LayerNorm(4))

    def nan_mlp():
        net = mlp()
        with torch.no_grad():
            net[3].weight[0, 0] = float("nan")
        return net
    """
)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "clifactory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    return tmp_path


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_compress_writes_model_manifest_and_reports(work: Path, capsys) -> None:
    assert main(["compress", "--model", "clifactory:mlp", "out/m.safetensors", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "factor" in out and "params:" in out and "file size:" in out
    assert files(work / "out") == ["m.json", "m.report.json", "m.report.md", "m.safetensors"]
    report = json.loads((work / "out" / "m.report.json").read_text())
    ranks = [lp["rank"] for lp in report["layers"] if lp["action"] == "factor"]
    assert ranks[0] in (5, 6) and ranks[1] == 4  # planted 5 and 4 (TW level 0.9: one edge spike may pass)
    assert report["files"]["size_after"] < report["files"]["size_before"]
    assert "| layer |" in (work / "out" / "m.report.md").read_text()
    import clifactory

    model = rmtprune.load(work / "out" / "m.safetensors", clifactory.mlp())
    assert isinstance(model[1], LowRankLinear) and model[1].rank == ranks[0]


def test_checkpoint_recompresses_alone_and_dry_run_writes_nothing(work: Path, capsys) -> None:
    assert main(["compress", "--model", "clifactory:mlp", "--keep-bulk", "0.5", "out/a.safetensors"]) == 0
    # The file records the user's factory clifactory:mlp: it is only run when the user says so.
    assert main(["compress", "out/a.safetensors", "--dry-run"]) == 2
    assert "--trust-factory" in capsys.readouterr().err
    assert main(["compress", "out/a.safetensors", "--dry-run", "--trust-factory"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    recut = ["out/a.safetensors", "out/b.safetensors", "--keep-bulk", "0.2", "--quiet", "--trust-factory"]
    assert main(["compress", *recut]) == 0
    b = json.loads((work / "out" / "b.report.json").read_text())
    assert b["layers"][0]["layer_type"] == "LowRankLinear" and b["layers"][0]["action"] == "factor"
    assert b["layers"][0]["rank"] < b["layers"][0]["rank_before"]
    before = files(work / "out")
    assert main(["compress", "--model", "clifactory:cnn", "--input-shape", "1,8,8", "--dry-run"]) == 0
    assert "MACs/sample" in capsys.readouterr().out
    assert files(work / "out") == before


def test_options_mirror_the_config(work: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"rule": "energy", "energy": 0.5, "exclude": ["5"]}))
    args = [
        "compress",
        "--model",
        "clifactory:mlp",
        "--config",
        "cfg.json",
        "--energy",
        "0.6",
        "out/e.safetensors",
    ]
    assert main(args) == 0
    report = json.loads((work / "out" / "e.report.json").read_text())
    assert report["config"]["rule"] == "energy" and report["config"]["energy"] == 0.6
    assert report["layers"][-1]["action"] == "skip"
    assert main(["compress", "--model", "clifactory:mlp", "--ratio", "0.1", "out/f.safetensors"]) == 0
    report = json.loads((work / "out" / "f.report.json").read_text())
    assert report["config"]["rule"] == "fixed" and report["layers"][0]["rank"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "clifactory:nothing", "out/x.safetensors"], "has no prunable layer"),
        (["--model", "clifactory:nan_mlp", "out/x.safetensors"], "layer '3' has NaN or Inf"),
        (
            ["--model", "clifactory:mlp", "--rank", "100", "out/x.safetensors"],
            r"rank=100 must be in \[1, 64\]",
        ),
        (["--model", "clifactory:mlp", "missing/x.safetensors"], "does not exist"),
        (["--model", "clifactory:mlp", "out/x.pt"], r"must end in \.safetensors"),
        (["--model", "nomodule:f", "out/x.safetensors"], "cannot import module 'nomodule'"),
        (["--model", "clifactory:mlp", "--weights", "nope.pt", "out/x.safetensors"], "does not exist"),
        (["trunc.safetensors", "out/x.safetensors"], "truncated or corrupt"),
        (["--model", "clifactory:cnn", "good.safetensors", "out/x.safetensors"], "does not match the model"),
        (
            ["--model", "clifactory:mlp", "--weights", "cnn.pt", "out/x.safetensors"],
            "does not match the model",
        ),
        (["--model", "clifactory:mlp", "--keep-bulk", "2", "out/x.safetensors"], r"keep_bulk=2.0 must be in"),
        (["out/x.safetensors"], "give MODEL_FILE OUT"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(work: Path, capsys, argv: list[str], message: str) -> None:
    import clifactory

    good = rmtprune.compress(clifactory.mlp(), rule="fixed", rank=3)[0]
    rmtprune.save(good, work / "good.safetensors", factory="clifactory:mlp")
    data = (work / "good.safetensors").read_bytes()
    (work / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(clifactory.cnn().state_dict(), work / "cnn.pt")
    assert main(["compress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmtprune: error:")
    assert pytest.importorskip("re").search(message, err), err
    assert files(work / "out") == []


def test_pattern_matching_nothing_warns_on_stderr(work: Path, capsys) -> None:
    assert (
        main(["compress", "--model", "clifactory:mlp", "--include", "fc9", "--include", "1", "--dry-run"])
        == 0
    )
    assert "rmtprune: warning: include pattern 'fc9' matches no layer" in capsys.readouterr().err


def test_reference_spec_with_dataset_needs_no_data_files(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # No data anywhere and downloads impossible: the dataset only sets the input shape.
    from rmtprune.zoo import data

    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(work / "empty-cache"))
    monkeypatch.setattr(data, "download_dataset", lambda *a, **k: pytest.fail("tried to download"))
    data.clear_cache()
    argv = ["compress", "--model", "mlp:32", "--dataset", "fashion-mnist", "--dry-run", "--no-progress"]
    assert main(argv) == 0
    assert "32x784" in capsys.readouterr().out  # fc1 built for 28x28 inputs
    assert not (work / "empty-cache").exists()


def test_cut_last_flag_reaches_the_config(work: Path, capsys) -> None:
    args = ["compress", "--model", "clifactory:mlp", "--dry-run", "--no-progress", "--rank", "3"]
    assert main(args) == 0
    kept = [line for line in capsys.readouterr().out.splitlines() if line.startswith("5 ")]
    assert kept and " keep " in kept[0] and "protect_last=True" in kept[0]
    assert main([*args, "--cut-last"]) == 0
    cut = [line for line in capsys.readouterr().out.splitlines() if line.startswith("5 ")]
    assert cut and " factor " in cut[0]
