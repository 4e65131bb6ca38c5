"""Spectrum and summary figures: written atomically as PNG, for every kind of layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmtprune.analysis import LayerAnalysis, analyze_tensor
from rmtprune.plotting import plot_esd, plot_summary

PNG = b"\x89PNG\r\n\x1a\n"


def spiked(m: int, n: int, strengths: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / n**0.5
    for k, s in enumerate(strengths):
        u = torch.randn(m, 1, generator=g)
        v = torch.randn(1, n, generator=g)
        w += s * (u / u.norm()) @ (v / v.norm()) * (1 + k)
    return w


def layers() -> dict[str, LayerAnalysis]:
    g = torch.Generator().manual_seed(0)
    return {
        "near": analyze_tensor("near", spiked(120, 200, [2.5, 3.0], seed=1)),  # spikes just above the edge
        "far": analyze_tensor("enc.far", spiked(120, 200, [40.0, 80.0, 30.0], seed=2)),  # spikes far out
        "noise": analyze_tensor("noise", torch.randn(100, 100, generator=g)),  # gamma = 1, no spikes
        "conv": analyze_tensor("conv", torch.randn(32, 8, 3, 3, generator=g)),
        "zeros": analyze_tensor("zeros", torch.zeros(20, 30)),  # no positive bulk
        "small": analyze_tensor("small", torch.randn(1, 50, generator=g)),
        "nan": analyze_tensor("nan", torch.full((20, 20), float("nan"))),
    }


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


@pytest.mark.parametrize("key", ["near", "far", "noise", "conv", "zeros"])
def test_plot_esd_writes_png(key: str, tmp_path: Path) -> None:
    la = layers()[key]
    out = plot_esd(la, tmp_path / f"{key}.png")
    assert out == tmp_path / f"{key}.png" and _png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.png"]  # no temp file left behind


@pytest.mark.parametrize("log_x", [True, False])
def test_plot_esd_log_x(log_x: bool, tmp_path: Path) -> None:
    assert _png(plot_esd(layers()["far"], tmp_path / "far.png", log_x=log_x, bins=30))


@pytest.mark.parametrize("key", ["small", "nan"])
def test_plot_esd_needs_a_fit(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"layer '{key}' has no fit to plot \(verdict (too-small|invalid)"):
        plot_esd(layers()[key], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_plot_esd_type_check(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="layer must be a LayerAnalysis, got dict"):
        plot_esd({"name": "x"}, tmp_path / "x.png")  # type: ignore[arg-type]


def test_plot_summary_of_layers_and_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from rmtprune.weights_analysis import analyze_file

    assert _png(plot_summary(list(layers().values()), tmp_path / "a.png", ks_max=0.05))
    save_file(
        {"a.weight": spiked(60, 90, [5.0], seed=3), "b.weight": torch.randn(1, 30)},
        tmp_path / "m.safetensors",
    )
    res = analyze_file(tmp_path / "m.safetensors")
    assert _png(plot_summary(res, tmp_path / "b.png"))


def test_plot_summary_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no layers to plot"):
        plot_summary([], tmp_path / "s.png")
    with pytest.raises(TypeError, match="sequence of LayerAnalysis"):
        plot_summary([1, 2], tmp_path / "s.png")
    with pytest.raises(Exception, match="does not exist"):
        plot_summary(list(layers().values()), tmp_path / "missing" / "s.png")


def test_analyze_figures_need_no_matplotlib_import_and_pyplot_is_never_imported() -> None:
    code = (
        "import sys, torch, rmtprune.plotting as p, rmtprune.analysis as a, tempfile, os\n"
        "assert 'matplotlib' not in sys.modules\n"
        "la = a.analyze_tensor('w', torch.randn(40, 60))\n"
        "d = tempfile.mkdtemp()\n"
        "p.plot_esd(la, os.path.join(d, 'w.png')); p.plot_summary([la], os.path.join(d, 's.png'))\n"
        "assert 'matplotlib' not in sys.modules  # drawn with Pillow\n"
        "p._new_figure(2, 2)  # training and budget figures: matplotlib, on the Agg canvas\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_importing_plotting_does_not_import_matplotlib():
    code = "import sys, rmtprune.plotting; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


MISSING = r"^matplotlib is not installed: pip install 'rmtprune\[plot\]'$"


def test_without_matplotlib_every_plot_is_one_line(tmp_path, monkeypatch):
    import rmtprune.plotting as plotting
    from rmtprune.errors import RmtpruneError

    monkeypatch.setattr(plotting, "have_matplotlib", lambda: False)
    la = analyze_tensor("w", torch.randn(60, 40))
    for call in (
        lambda: plotting.plot_esd(la, tmp_path / "a.png"),
        lambda: plotting.plot_summary([la], tmp_path / "b.png"),
        lambda: plotting.plot_training(tmp_path, []),
    ):
        with pytest.raises(
            RmtpruneError, match=r"^matplotlib is not installed: pip install 'rmtprune\[plot\]'$"
        ):
            call()
    assert not list(tmp_path.iterdir())


def test_a_training_run_without_matplotlib_skips_its_plots(tmp_path, monkeypatch):
    import rmtprune.plotting as plotting
    from rmtprune.training import train

    monkeypatch.setattr(plotting, "have_matplotlib", lambda: False)
    lines: list[str] = []
    kw = dict(dataset="digits", model="mlp:16", epochs=1, train_subset=200, test_subset=50, prune=False)
    train(out=tmp_path / "run", log=lines.append, track_spectra=False, **kw)
    assert not list((tmp_path / "run").glob("*.png")) and (tmp_path / "run" / "model.safetensors").is_file()
    assert any("plots skipped: matplotlib is not installed" in line for line in lines)


def test_draw_plots_in_worker_processes_with_the_powerlaw_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.image import imread

    from rmtprune._analyze_plots import has_powerlaw
    from rmtprune.plotting import draw_plots

    ls = layers()
    assert has_powerlaw(ls["far"].metrics) and not has_powerlaw(ls["small"].metrics)
    no_metrics = analyze_tensor("plain", spiked(120, 200, [40.0], seed=3), metrics=False)
    jobs = [("esd", ls["far"], tmp_path / "far.png"), ("esd", no_metrics, tmp_path / "plain.png")]
    # forked workers, as under `rmtprune analyze` of a safetensors file (no torch); spawned ones
    # would take seconds to start here
    monkeypatch.delitem(sys.modules, "torch")
    paths = draw_plots(jobs, workers=2, progress=False)
    monkeypatch.undo()
    assert paths == [j[2] for j in jobs] and all(_png(p) for p in paths)
    # the log-log power-law panel makes the figure wider than the plain one
    assert imread(tmp_path / "far.png").shape[1] > imread(tmp_path / "plain.png").shape[1]
    with pytest.raises(ValueError, match="unknown plot kind"):
        draw_plots([("nope", None, tmp_path / "x.png")], workers=1)
