"""Figures: the spectrum of one layer against its fitted MP law, a summary of all layers, a training run.

Matplotlib is an optional extra (``pip install 'rmtprune[plot]'``): it is imported only when a
figure is drawn, never by ``import rmtprune.plotting``, and every entry point raises a one-line
:class:`~rmtprune.errors.RmtpruneError` when it is missing. Figures are drawn on the Agg canvas
directly (no ``pyplot``, no global backend change), so this works headless and leaves a caller's
own matplotlib set-up alone. PNGs are written atomically.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_path
from .analysis import LayerAnalysis
from .errors import RmtpruneError
from .spectral import DEFAULT_KS_MAX, mp_pdf

__all__ = [
    "plot_esd",
    "plot_summary",
    "plot_training",
    "plot_budget",
    "draw_plots",
    "have_matplotlib",
    "VERDICT_COLORS",
]

#: Colour of each verdict in the figures.
VERDICT_COLORS = {"fit": "#1f77b4", "no-mp-bulk": "#ff7f0e", "too-small": "#9e9e9e", "invalid": "#d62728"}
_BULK = "#5b8db8"
_SPIKE = "#d62728"
_CURVE = "#111111"
_EDGE = "#2ca02c"


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


def _rug(ax: Any, xs: np.ndarray, color: str, height: float = 0.07) -> None:
    """Short vertical marks at the bottom of ``ax`` (height in axes fraction)."""
    if xs.size:
        ax.vlines(xs, 0.0, height, transform=ax.get_xaxis_transform(), color=color, lw=1.2, zorder=4)


def _has_powerlaw(metrics: Any) -> bool:
    """Whether ``metrics`` (an ESDMetrics or None) holds a power-law fit to draw."""
    alpha = getattr(metrics, "alpha", None)
    xmin = getattr(metrics, "alpha_xmin", None)
    return alpha is not None and xmin is not None and bool(np.isfinite(alpha) and np.isfinite(xmin))


def _powerlaw_panel(ax: Any, layer: LayerAnalysis, metrics: Any) -> None:
    """The log-log ESD of ``s**2`` (WeightWatcher's scale) with the fitted power law above ``xmin``.

    The density of the tail ``x >= xmin`` is ``(n_tail / n) (alpha - 1) / xmin (x / xmin)**-alpha``
    (Clauset, Shalizi & Newman 2009, arXiv:0706.1062), drawn over the log-binned histogram of the
    ``n`` eigenvalues above 1e-5 (those the fit used; Martin & Mahoney 2021, arXiv:1810.01075).
    """
    sq = np.asarray(layer.fit.singular_values, dtype=np.float64) ** 2
    x = np.sort(sq[sq > 1e-5])
    if x.size < 2 or not x[-1] > x[0]:
        return
    edges = np.geomspace(x[0], x[-1] * 1.0001, int(np.clip(np.sqrt(x.size) * 2, 20, 80)) + 1)
    counts = np.histogram(x, edges)[0]
    dens = counts / (x.size * np.diff(edges))
    ax.stairs(np.where(dens > 0, dens, np.nan), edges, fill=False, color=_BULK, lw=1.4, label="ESD of s^2")
    alpha, xmin, n_tail = float(metrics.alpha), float(metrics.alpha_xmin), int(metrics.alpha_n_tail)
    xs = np.geomspace(xmin, x[-1], 50)
    ys = (n_tail / x.size) * (alpha - 1.0) / xmin * (xs / xmin) ** -alpha
    ax.plot(
        xs, ys, color=_SPIKE, lw=1.6, ls="--", label=f"power law alpha={alpha:.2f} (D={metrics.alpha_ks:.3f})"
    )
    ax.axvline(xmin, color=_EDGE, ls=":", lw=1.2, label=f"xmin={xmin:.3g} ({n_tail} in tail)")
    _log_axes(ax, x=True, y=True)
    ax.set_xlabel("eigenvalue s^2 (log)")
    ax.set_ylabel("density (log)")
    ax.set_title(
        f"heavy tail: alpha-hat={_num(metrics.alpha_hill, '.2f')}, "
        f"stable rank={_num(metrics.stable_rank, '.3g')}",
        fontsize=9,
    )
    ax.legend(loc="lower left", fontsize=7, framealpha=0.85)


def _log_axes(ax: Any, x: bool, y: bool) -> None:
    """Log scale without minor ticks (each tick is three artists: most of a log plot's drawing time)."""
    from matplotlib.ticker import LogFormatter, LogLocator, NullLocator

    for on, axis, scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            scale("log")
            axis.set_major_locator(LogLocator(numticks=6))
            axis.set_major_formatter(LogFormatter())  # "1e-05": plain text, no mathtext parsing
            axis.set_minor_locator(NullLocator())


def _num(value: Any, spec: str) -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


# plot_esd and plot_summary run over 80 lines: each is one figure drawn as a straight sequence of
# matplotlib calls on arrays computed at its top; split, the pieces would pass a dozen arrays around.
def plot_esd(
    layer: LayerAnalysis,
    path: str | os.PathLike[str],
    *,
    log_x: bool | None = None,
    bins: int | None = None,
    dpi: int = 110,
) -> Path:
    """Plot the eigenvalues ``lambda_i = s_i**2 / N`` of one layer against its fitted MP density.

    The top panel is a density histogram of the bulk region with the fitted MP curve and the edge
    ``lambda_plus`` (MP edge plus Tracy-Widom margin) as a vertical line; eigenvalues above the edge
    (spikes) are red rug marks. When spikes lie beyond that view, a second panel shows the whole
    spectrum (counts, log-x when ``log_x`` is true or, with ``None``, when the largest eigenvalue
    exceeds 20 ``lambda_plus``). Written atomically as PNG; returns the path.

    Raises
    ------
    ValueError
        when the layer has no fit (verdict ``too-small`` or ``invalid``).
    """
    _require_matplotlib()
    if not isinstance(layer, LayerAnalysis):
        raise TypeError(f"layer must be a LayerAnalysis, got {type(layer).__name__}")
    fit = layer.fit
    if fit is None:
        raise ValueError(
            f"layer {layer.name!r} has no fit to plot (verdict {layer.verdict}: {layer.message})"
        )
    lam = np.sort(fit.eigenvalues)  # ascending
    p = lam.size
    has_bulk = fit.sigma2 > 0
    lam_plus = fit.lambda_plus
    a, b = fit.mp_edges
    spikes = lam[lam > lam_plus] if has_bulk else lam[:0]
    lam_max = float(lam[-1]) if p else 1.0

    view_hi = 1.3 * max(lam_plus, b) if has_bulk else 1.05 * lam_max
    far = has_bulk and lam_max > view_hi
    if not far:
        view_hi = max(view_hi, 1.05 * lam_max)
    if not view_hi > 0:  # all eigenvalues zero
        view_hi = 1.0
    if log_x is None:
        log_x = bool(far and lam_max > 20.0 * lam_plus)
    nbins = bins or int(np.clip(np.sqrt(p) * 2, 20, 120))

    metrics = layer.metrics if _has_powerlaw(layer.metrics) else None
    # Fixed margins, not constrained layout (which measures every text several times: half the
    # time of a plot), one step artist per histogram instead of one rectangle per bin.
    fig = _new_figure(12.5 if metrics else 8.0, 6.4 if far else 4.6, layout=None)
    fig.subplots_adjust(
        left=0.075 if metrics else 0.1, right=0.98, bottom=0.1, top=0.86, hspace=0.4, wspace=0.22
    )
    grid = fig.add_gridspec(
        2 if far else 1,
        2 if metrics else 1,
        height_ratios=[3, 2] if far else None,
        width_ratios=[3, 2] if metrics else None,
    )
    axes = [fig.add_subplot(grid[i, 0]) for i in range(2 if far else 1)]
    ax = axes[0]

    # Density histogram over the view, normalised by all p eigenvalues so it is comparable with the
    # MP density (the mass of spikes beyond the view is simply not drawn).
    in_view = lam[lam <= view_hi]
    counts, edges = np.histogram(in_view, bins=nbins, range=(0.0, view_hi))
    width = edges[1] - edges[0]
    dens = counts / (p * width)
    cut = int(np.searchsorted(edges, lam_plus, side="right")) if has_bulk else nbins
    cut = min(max(cut, 0), nbins)
    ax.stairs(dens[:cut], edges[: cut + 1], fill=True, color=_BULK, alpha=0.75, label="eigenvalues (bulk)")
    if (dens[cut:] > 0).any():
        ax.stairs(dens[cut:], edges[cut:], fill=True, color=_SPIKE, alpha=0.75, label="above edge")
    ymax = float(dens.max()) if dens.size else 1.0
    if has_bulk:
        x = np.linspace(a, b, 600)[1:-1]
        y = mp_pdf(x, fit.gamma, fit.sigma2)
        ax.plot(x, y, color=_CURVE, lw=1.6, label=f"MP fit (gamma={fit.gamma:.3g}, sigma2={fit.sigma2:.3g})")
        ymax = max(ymax, float(np.max(y[x > a + 0.05 * (b - a)])) if x.size else ymax)
        ax.axvline(lam_plus, color=_EDGE, ls="--", lw=1.4, label=f"edge lambda+ = {lam_plus:.3g}")
        _rug(ax, spikes[spikes <= view_hi], _SPIKE)
    ax.set_xlim(0.0, view_hi)
    ax.set_ylim(0.0, 1.15 * ymax if ymax > 0 else 1.0)
    ax.set_xlabel("eigenvalue lambda = s^2 / N")
    ax.set_ylabel("density")
    if far:
        beyond = int((spikes > view_hi).sum())
        ax.text(
            0.99,
            0.55,
            f"{spikes.size} spikes, {beyond} beyond this view\n(largest {lam_max:.3g}; see below)",
            transform=ax.transAxes,
            ha="right",
            va="center",
            color=_SPIKE,
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
            zorder=5,
        )
    elif not has_bulk:
        ax.text(0.5, 0.9, "no positive bulk fitted", transform=ax.transAxes, ha="center", color=_SPIKE)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)

    if far:
        ax2 = axes[1]
        lo = float(lam[lam > 0].min()) if (lam > 0).any() else lam_plus / 100.0
        full_edges = (
            np.geomspace(lo, lam_max * 1.001, nbins + 1)
            if log_x
            else np.linspace(0.0, lam_max * 1.001, nbins + 1)
        )
        bulk = lam[lam <= lam_plus]
        ax2.stairs(
            np.histogram(bulk, full_edges)[0],
            full_edges,
            fill=True,
            color=_BULK,
            alpha=0.75,
            label=f"bulk ({bulk.size})",
        )
        ax2.stairs(
            np.histogram(spikes, full_edges)[0],
            full_edges,
            fill=True,
            color=_SPIKE,
            alpha=0.85,
            label=f"spikes ({spikes.size})",
        )
        _rug(ax2, spikes, _SPIKE, height=0.12)
        ax2.axvline(lam_plus, color=_EDGE, ls="--", lw=1.4)
        _log_axes(ax2, x=log_x, y=True)
        ax2.set_xlabel("eigenvalue lambda (whole spectrum" + (", log scale)" if log_x else ")"))
        ax2.set_ylabel("count")
        ax2.legend(loc="upper right", fontsize=8, frameon=False)
    if metrics is not None:
        _powerlaw_panel(fig.add_subplot(grid[:, 1]), layer, metrics)

    m, n = fit.shape
    shape = "x".join(str(v) for v in layer.shape)
    as_mat = f" as {m}x{n}" if len(layer.shape) != 2 else ""
    fig.suptitle(
        f"{layer.name}  [{shape}{as_mat}, {layer.dtype}]\n"
        f"sigma2={fit.sigma2:.3g}   spikes={fit.n_spikes}/{fit.p}   "
        f"ks={fit.ks:.3f}   verdict: {layer.verdict}",
        fontsize=10,
        color=VERDICT_COLORS.get(layer.verdict, "black") if layer.verdict != "fit" else "black",
    )
    return _save(fig, path, dpi)


def plot_summary(
    analyses: Any,
    path: str | os.PathLike[str],
    *,
    ks_max: float | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One figure for all layers: bulk fraction, number of spikes and KS distance with the gate.

    ``analyses`` is a :class:`~rmtprune.weights_analysis.FileAnalysis` (its ``ks_max`` and path are
    used) or a sequence of :class:`LayerAnalysis`. Bars are coloured by verdict; layers without a
    fit are labelled with their verdict. Written atomically as PNG; returns the path.
    """
    _require_matplotlib()
    layers: Sequence[LayerAnalysis]
    if hasattr(analyses, "layers"):
        layers = list(analyses.layers)
        ks_max = analyses.ks_max if ks_max is None else ks_max
        title = title or f"{analyses.path}: {analyses.summary()}"
    else:
        layers = list(analyses)
    if not all(isinstance(la, LayerAnalysis) for la in layers):
        raise TypeError("analyses must be a FileAnalysis or a sequence of LayerAnalysis")
    if not layers:
        raise ValueError("no layers to plot: the analysis is empty")
    ks_max = DEFAULT_KS_MAX if ks_max is None else float(ks_max)

    n = len(layers)
    fs = 8 if n <= 60 else 6
    height = min(2.0 + 0.24 * n, 150.0)
    longest = max(len(la.name) for la in layers)
    fig = _new_figure(10.0 + min(longest, 70) * 0.06, height)
    axes = fig.subplots(1, 3, sharey=True)
    y = np.arange(n)
    colors = [VERDICT_COLORS.get(la.verdict, "black") for la in layers]
    fits = [la.fit for la in layers]
    bulk = np.array([f.bulk_fraction if f is not None else 0.0 for f in fits])
    spikes = np.array([f.n_spikes if f is not None else 0 for f in fits])
    ks = np.array([f.ks if f is not None else 0.0 for f in fits])

    axes[0].barh(y, bulk, color=colors)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("bulk fraction n_bulk / p")
    axes[1].barh(y, spikes, color=colors)
    axes[1].set_xlabel("spikes (above lambda+)")
    if spikes.max() > 0 and spikes.max() / max(1, np.median(spikes[spikes > 0])) > 50:
        axes[1].set_xscale("symlog", linthresh=1)
    axes[2].barh(y, ks, color=colors)
    axes[2].axvline(ks_max, color="black", ls="--", lw=1.2)
    axes[2].text(
        ks_max,
        1.0,
        f" gate ks_max={ks_max:g}",
        transform=axes[2].get_xaxis_transform(),
        fontsize=8,
        va="bottom",
    )
    axes[2].set_xlim(0, max(1.2 * ks_max, 1.15 * float(ks.max())))
    axes[2].set_xlabel("KS distance to fitted MP")
    if n <= 80:
        for i, la in enumerate(layers):
            if la.fit is not None:
                axes[1].text(spikes[i], i, f" {spikes[i]}", va="center", fontsize=fs)
                axes[2].text(ks[i], i, f" {ks[i]:.3f}", va="center", fontsize=fs)
    for i, la in enumerate(layers):
        if la.fit is None:
            for ax in axes:
                ax.text(
                    0.01,
                    i,
                    la.verdict,
                    transform=ax.get_yaxis_transform(),
                    va="center",
                    fontsize=fs,
                    color=colors[i],
                )
    axes[0].set_yticks(y, [la.name for la in layers], fontsize=fs)
    axes[0].set_ylim(n - 0.5, -0.5)  # first layer on top
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    present = [v for v in VERDICT_COLORS if any(la.verdict == v for la in layers)]
    fig.legend(
        handles=[Patch(color=VERDICT_COLORS[v], label=v) for v in present],
        loc="outside lower center",
        ncols=len(present),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def plot_training(
    out: str | os.PathLike[str], metrics: list[dict[str, Any]], *, dpi: int = 110
) -> list[Path]:
    """``accuracy.png``, ``params.png`` and ``ranks.png`` (rank per layer) of a training run against
    the epoch, in directory ``out``; ``metrics`` as in ``metrics.json``. Returns the paths."""
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
    return written


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

    Matplotlib draws one figure at a time on one core, so ``rmtprune analyze --plots`` spreads its
    figures over one process per core (``workers``: how many; default one per core, at most 8,
    serial below 8 plots). Workers are forked from a process that never imported torch (nothing
    to start: matplotlib is imported once, before) and spawned otherwise; each gets the numbers of
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
    import matplotlib.backends.backend_agg  # noqa: F401 - imported once, before the fork

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
