"""Figures: the spectrum of one layer against its fitted MP law, a summary of all layers, a training run.

The plotting extra (``pip install 'rmtprune[plot]'``: matplotlib, which brings Pillow) is imported
only when a figure is drawn, never by ``import rmtprune.plotting``, and every entry point raises a
one-line :class:`~rmtprune.errors.RmtpruneError` when it is missing. The spectrum and summary
figures of ``rmtprune analyze --plots`` are drawn with Pillow (:mod:`rmtprune._analyze_plots`: a
tenth of matplotlib's time); the training and budget figures on matplotlib's Agg canvas directly
(no ``pyplot``, no global backend change), so this works headless and leaves a caller's own
matplotlib set-up alone. PNGs are written atomically."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _analyze_plots
from ._analyze_plots import VERDICT_COLORS
from ._atomic import atomic_path
from .analysis import LayerAnalysis
from .errors import RmtpruneError

__all__ = [
    "plot_esd",
    "plot_summary",
    "plot_training",
    "plot_stability",
    "plot_budget",
    "draw_plots",
    "have_matplotlib",
    "VERDICT_COLORS",
]


#: PNG text chunk that marks a plot as drawn by rmtprune, so a later run may replace it and never
#: replaces a PNG of the same name that it did not draw (docs/security.md).
PNG_METADATA = {"Software": "rmtprune (matplotlib)"}


#: What a plotting function says when matplotlib is not installed.
MISSING_MATPLOTLIB = "matplotlib is not installed: pip install 'rmtprune[plot]'"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _require_matplotlib() -> None:
    if not have_matplotlib():
        raise RmtpruneError(MISSING_MATPLOTLIB)


def _new_figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    target = Path(path).expanduser()
    with atomic_path(target, suffix=".png") as tmp:
        # zlib level 1: a third of the time of the default 6 for files ~1.3x larger
        fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_METADATA, pil_kwargs={"compress_level": 1})
    return target


def plot_esd(
    layer: LayerAnalysis,
    path: str | os.PathLike[str],
    *,
    log_x: bool | None = None,
    bins: int | None = None,
    dpi: int = 110,
) -> Path:
    """The spectrum of one layer against its fitted MP density (and power law), as PNG.

    See :func:`rmtprune._analyze_plots.plot_esd` (drawn with Pillow). Raises ``ValueError`` when the
    layer has no fit, :class:`~rmtprune.errors.RmtpruneError` without the ``[plot]`` extra.
    """
    _require_matplotlib()  # the [plot] extra; Pillow comes with it
    return _analyze_plots.plot_esd(layer, path, log_x=log_x, bins=bins, dpi=dpi)


def plot_summary(
    analyses: Any,
    path: str | os.PathLike[str],
    *,
    ks_max: float | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One figure for all layers: bulk fraction, spikes and KS distance with the gate, as PNG.

    See :func:`rmtprune._analyze_plots.plot_summary` (drawn with Pillow); ``analyses`` is a
    FileAnalysis or a sequence of LayerAnalysis.
    """
    _require_matplotlib()
    return _analyze_plots.plot_summary(analyses, path, ks_max=ks_max, title=title, dpi=dpi)


def plot_training(
    out: str | os.PathLike[str], metrics: list[dict[str, Any]], *, dpi: int = 110
) -> list[Path]:
    """``accuracy.png``, ``params.png`` and ``ranks.png`` (rank per layer) of a training run against
    the epoch, in directory ``out``, and ``stability.png`` (:func:`plot_stability`) when the rows
    have stability columns; ``metrics`` as in ``metrics.json``. Returns the paths."""
    _require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    out = Path(out).expanduser()
    epochs = [r["epoch"] for r in metrics]
    written = []

    def new() -> tuple[Any, Any]:
        fig = _new_figure(6, 4)
        ax = fig.add_subplot()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    fig, ax = new()
    ax.plot(epochs, [100 * r["train_acc"] for r in metrics], "o-", label="train")
    if all(r.get("val_acc") is not None for r in metrics):
        ax.plot(epochs, [100 * r["val_acc"] for r in metrics], "^-", label="val")
    ax.plot(epochs, [100 * r["test_acc"] for r in metrics], "s-", label="test")
    for r in metrics:
        if r.get("pruned"):
            ax.axvline(r["epoch"], color="grey", lw=0.6, ls=":")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (dotted: pruning epochs)")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "accuracy.png", dpi))

    fig, ax = new()
    ax.plot(epochs, [r["params"] for r in metrics], "o-")
    ax.set(xlabel="epoch", ylabel="parameters", title="Parameter count")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "params.png", dpi))

    fig, ax = new()
    layers: list[str] = []
    for r in metrics:
        layers.extend(name for name in r.get("layers", {}) if name not in layers)
    for name in layers:
        ys = [r.get("layers", {}).get(name, {}).get("rank") for r in metrics]
        ax.plot(epochs, [float("nan") if y is None else y for y in ys], "o-", label=name)
    ax.set(xlabel="epoch", ylabel="rank", title="Rank per layer")
    if layers:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "ranks.png", dpi))
    if any("flips_train" in r for r in metrics):
        written.append(plot_stability(out / "stability.png", metrics, dpi=dpi))
    return written


def plot_stability(path: str | os.PathLike[str], metrics: list[dict[str, Any]], *, dpi: int = 110) -> Path:
    """Accuracy stability of a training run (:mod:`rmtprune.training.stability`) against the epoch:
    examples that flipped from correct to wrong since the previous epoch (train, val), those the
    cuts flipped by themselves (``x``, measured with ``eval_before_prune``), the instability
    events (training loss down, accuracy down) circled in red, and the cuts as dotted lines."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    nan = float("nan")
    epochs = [r["epoch"] for r in metrics]
    for split, marker in (("train", "o-"), ("val", "^-")):
        ys = [nan if r.get(f"flips_{split}") is None else r[f"flips_{split}"] for r in metrics]
        if all(y != y for y in ys):
            continue
        (line,) = ax.plot(epochs, ys, marker, label=f"{split}: correct -> wrong")
        cut = [
            (r["epoch"], r[f"cut_flips_{split}"]) for r in metrics if r.get(f"cut_flips_{split}") is not None
        ]
        if cut:
            ax.plot(*zip(*cut, strict=True), "x", ms=9, color=line.get_color(), label=f"{split}: by the cut")
        ev = [(e, y) for e, y, r in zip(epochs, ys, metrics, strict=True) if r.get(f"event_{split}")]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o", ms=12, mfc="none", mec="red")
    for r in metrics:
        if r.get("pruned"):
            ax.axvline(r["epoch"], color="grey", lw=0.6, ls=":")
    ax.set(
        xlabel="epoch",
        ylabel="examples",
        title="Flips per epoch (red circle: loss down, accuracy down)",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)


def plot_budget(plan: Any, path: str | os.PathLike[str], *, title: str | None = None, dpi: int = 100) -> Path:
    """Where a ``target=`` budget went: each layer's kept fraction, its signal, and the guard's changes.

    ``plan`` is the :class:`~rmtprune.plan_record.Plan` of a budgeted :func:`rmtprune.compress`
    (``plan.budget`` set). Top: the fraction of each layer's parameters kept (bars, coloured by the
    last part of the layer name: ``q_proj``, ``fc1``...), with the guard's raised layers marked.
    Bottom: the rank kept against the directions above the layer's noise edge, both as fractions of
    ``min(m, n)``. Written atomically as PNG; returns the path.
    """
    _require_matplotlib()
    budget = getattr(plan, "budget", None)
    if not budget:
        raise ValueError("plot_budget needs the plan of a compress(target=...) or target_macs run")
    rows = [lp for lp in plan if lp.decision and "allocation" in lp.decision and lp.matrix_shape]
    if not rows:
        raise ValueError("the plan has no budgeted layer to plot")
    kinds = sorted({lp.name.rsplit(".", 1)[-1] for lp in rows})
    cmap = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    x = np.arange(len(rows))
    kept = np.array([lp.params_after / max(lp.params_before, 1) for lp in rows])
    p = np.array([min(lp.matrix_shape) for lp in rows], dtype=float)
    rank = np.array([lp.rank for lp in rows]) / p
    above = np.array([lp.decision.get("n_above_edge", 0) for lp in rows]) / p
    guarded = np.array([lp.decision.get("guard") is not None for lp in rows])
    fig = _new_figure(min(max(7.0, 4.0 + 0.08 * len(rows)), 40.0), 6.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar(x, kept, color=[cmap[lp.name.rsplit(".", 1)[-1]] for lp in rows], width=0.85)
    if guarded.any():
        ax1.scatter(
            x[guarded], kept[guarded] + 0.03, marker="v", color="k", s=18, label="raised by the guard"
        )
    ax1.axhline(budget["kept"], color="k", lw=0.8, ls="--", label=f"overall {budget['kept']:.1%}")
    ax1.set_ylabel("parameters kept")
    ax1.set_ylim(0, 1.1)
    from matplotlib.patches import Patch

    handles = [Patch(color=cmap[k], label=k) for k in kinds[:12]]
    ax1.legend(handles=handles + ax1.get_legend_handles_labels()[0], fontsize=7, ncol=4, loc="upper right")
    ax2.plot(x, rank, ".-", lw=0.8, label="rank kept / min(m, n)")
    ax2.plot(x, above, ".", color="C3", label="directions above the noise edge / min(m, n)")
    ax2.set_ylabel("fraction of min(m, n)")
    ax2.set_xlabel("layer (in model order)")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=7, loc="upper right")
    what = "MACs" if budget.get("of") == "macs" else "parameters"
    fig.suptitle(
        title
        or f"{budget['allocation']} allocation, {budget['truncation']} truncation: "
        f"kept {budget['after']:,} of {budget['before']:,} {what}",
        fontsize=9,
    )
    return _save(fig, path, dpi)


# ------------------------------------------------------------------------------ many plots at once


def _draw_job(job: tuple[str, Any, Path]) -> Path:
    """One ``(kind, what, path)`` plot: ``esd`` (a LayerAnalysis) or ``summary`` (a FileAnalysis)."""
    kind, what, path = job
    if kind == "esd":
        return plot_esd(what, path)
    if kind == "summary":
        return plot_summary(what, path)
    raise ValueError(f"unknown plot kind {kind!r}")


def _plot_workers(n_jobs: int, workers: int | None) -> int:
    """Worker processes for ``n_jobs`` plots: one per core, at most 8, and none for a handful."""
    if workers is not None:
        return max(1, int(workers))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8, n_jobs // 4))


def draw_plots(
    jobs: Sequence[tuple[str, Any, Path]], *, workers: int | None = None, progress: bool | None = None
) -> list[Path]:
    """Draw ``(kind, what, path)`` plots (kinds ``esd``, ``summary``), in worker processes.

    A figure is drawn on one core, so ``rmtprune analyze --plots`` spreads its
    figures over one process per core (``workers``: how many; default one per core, at most 8,
    serial below 8 plots). Workers are forked from a process that never imported torch (nothing
    to start: Pillow is imported once, before) and spawned otherwise; each gets the numbers of
    its plot (a LayerAnalysis holds the spectrum and the fit, never the weights). Returns the paths
    in the order of ``jobs``.
    """
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from ._progress import progress as _progress

    n = _plot_workers(len(jobs), workers)
    if n <= 1:
        return [_draw_job(j) for j in _progress(jobs, total=len(jobs), desc="plots", enable=progress)]
    _require_matplotlib()
    # Pillow (the ESD figures) imported once, before the fork; matplotlib (the summary) is not: its
    # import takes a second, better spent in the one worker that draws the summary.
    import PIL.Image  # noqa: F401
    import PIL.ImageDraw  # noqa: F401
    import PIL.ImageFont  # noqa: F401

    method = (
        "fork"
        if "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
        else "spawn"
    )
    out: list[Path | None] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(_draw_job, job): i for i, job in enumerate(jobs)}
        for fut in _progress(as_completed(futures), total=len(jobs), desc="plots", enable=progress):
            out[futures[fut]] = fut.result()
    return [p for p in out if p is not None]
