"""The figures of ``rmtprune analyze --plots`` (one spectrum per layer, a summary), drawn with Pillow.

Why not matplotlib: its artists (ticks, text layout, legends) cost 0.3 s for an empty three-panel
figure and 0.85 s for the spectrum figure on a 2-core machine (plus 1 s to import it), so the 40
figures of MiniLM-L6 took 10x the analysis (benchmarks/results/analyze_start.md). These figures are
rectangles, lines and labels: Pillow draws them, with the DejaVu Sans font matplotlib ships, in
about 0.1 s each (the spectrum on a canvas twice the size, downsampled for anti-aliased lines).
Pillow comes with matplotlib (the ``[plot]`` extra) and is imported only when a figure is drawn.
The training and budget figures stay in matplotlib (:mod:`rmtprune.plotting`): a few per run."""

from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_path
from .analysis import LayerAnalysis
from .spectral import DEFAULT_KS_MAX, mp_pdf

#: Colour of each verdict in the figures.
VERDICT_COLORS = {"fit": "#1f77b4", "no-mp-bulk": "#ff7f0e", "too-small": "#9e9e9e", "invalid": "#d62728"}
_BULK = "#5b8db8"
_SPIKE = "#d62728"
_CURVE = "#111111"
_EDGE = "#2ca02c"
_SS = 2  # supersampling of the panels' data: drawn at 2x, downsampled (anti-aliased lines)


def _blend(color: str, alpha: float) -> tuple[int, int, int]:
    """``color`` at opacity ``alpha`` over white (the fills of the histograms)."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return tuple(round(alpha * c + (1 - alpha) * 255) for c in rgb)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _palette() -> Any:
    """A fixed 256-colour palette: white and 22 shades from each colour of the figures towards white
    (fills, anti-aliased edges and text); PNG encodes a palette image without row filters."""
    from PIL import Image

    bases = dict.fromkeys(["#000000", _BULK, _SPIKE, _EDGE, "#9e9e9e", *VERDICT_COLORS.values()])
    # no shade within 1/8 of white: Pillow maps a colour through a 6-bit cache, which would take
    # white for its nearest neighbour
    colors = [(255, 255, 255)] + [_blend(c, 1 - i / 24) for c in bases for i in range(22)]
    colors += [(255, 255, 255)] * (256 - len(colors))
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for c in colors[:256] for v in c])
    return pal


@lru_cache(maxsize=32)
def _font(px: int) -> Any:
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    for root in spec.submodule_search_locations or [] if spec else []:
        path = os.path.join(root, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.exists(path):
            # basic layout (no raqm shaping: plain ASCII labels), a third faster per label
            return ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)
    return ImageFont.load_default(px)  # pragma: no cover - matplotlib without its fonts


def _ticks(lo: float, hi: float, log: bool) -> list[tuple[float, str]]:
    """About five "nice" ticks (1, 2, 2.5, 5 x 10^k; decades on a log axis) with their labels."""
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, math.ceil((b - a) / 6))
        vals = [10.0**k for k in range(a, b + 1, step)]
        vals = [v for v in vals if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        if len(vals) < 2:
            vals = [m * 10.0**k for k in range(a - 1, b + 1) for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
        return [(v, format(v, "g")) for v in vals]
    raw = (hi - lo) / 5 if hi > lo else 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    dec = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / mag, 1) == 2.5 else 0))
    first = math.ceil(lo / step - 1e-9)
    vals = [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
    fmt = "g" if step < 1e-3 or step >= 1e5 else f".{dec}f"
    return [(v, format(v, fmt)) for v in vals]


class _Canvas:
    """A figure of ``width x height`` inches at ``dpi``; its panels' data drawn at ``ss`` times that."""

    def __init__(self, width: float, height: float, dpi: int, ss: int = _SS) -> None:
        from PIL import Image, ImageDraw

        self.ss = ss
        self.k = dpi / 72.0  # pixels per point
        self.img = Image.new("RGB", (round(width * dpi), round(height * dpi)), "white")
        self.draw = ImageDraw.Draw(self.img)

    def font(self, pt: float) -> Any:
        return _font(max(1, round(pt * self.k)))

    def text(self, xy: tuple[float, float], s: str, pt: float, anchor: str, color: Any = "black") -> None:
        self.draw.text(xy, s, font=self.font(pt), fill=color, anchor=anchor)

    def vtext(self, xy: tuple[float, float], s: str, pt: float) -> None:
        """Text rotated 90 degrees (a y-axis label), centred on ``xy``."""
        from PIL import Image, ImageDraw

        font = self.font(pt)
        w, h = round(font.getlength(s)) + 2, round(pt * self.k * 1.3)
        tile = Image.new("L", (w, h), 0)
        ImageDraw.Draw(tile).text((w / 2, h / 2), s, font=font, fill=255, anchor="mm")
        tile = tile.rotate(90, expand=True)
        self.img.paste("black", (round(xy[0] - tile.width / 2), round(xy[1] - tile.height / 2)), tile)

    def save(self, path: str | os.PathLike[str]) -> Path:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", "rmtprune (Pillow)")  # rmtprune drew it: a later run may replace it
        target = Path(path).expanduser()
        with atomic_path(target, suffix=".png") as tmp:
            # On a fixed palette (each colour's ramp to white): a tenth of the time to encode of RGB
            # (whose PNG rows are filtered five ways each) at half the size; no visible change.
            self.img.quantize(palette=_palette(), dither=0).save(
                tmp, format="PNG", pnginfo=info, compress_level=1
            )
        return target


class _Axes:
    """One panel: data drawn on its own white tile (clipped to the box), then frame, ticks, labels."""

    def __init__(self, cv: _Canvas, box: tuple[float, float, float, float], xlim: Any, ylim: Any) -> None:
        from PIL import Image, ImageDraw

        self.cv, self.box = cv, tuple(round(v) for v in box)
        self.s, self.k = cv.ss, cv.k * cv.ss  # the tile's scale and pixels per point
        x0, y0, x1, y1 = self.box
        self.xlim, self.ylim = (float(xlim[0]), float(xlim[1])), (float(ylim[0]), float(ylim[1]))
        self.xlog = self.ylog = False
        self.tile = Image.new("RGB", ((x1 - x0) * self.s, (y1 - y0) * self.s), "white")
        self.draw = ImageDraw.Draw(self.tile)
        self.legend: list[tuple[str, Any, str]] = []

    def log(self, x: bool, y: bool) -> _Axes:
        self.xlog, self.ylog = x, y
        return self

    def _t(self, v: Any, lim: tuple[float, float], log: bool, size: int, flip: bool) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        lo, hi = lim
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v, lo, hi = np.log10(v), math.log10(lo), math.log10(hi)
        f = (v - lo) / (hi - lo) if hi != lo else v * 0 + 0.5
        return (1 - f if flip else f) * size

    def px(self, x: Any) -> np.ndarray:
        """x on the tile (``s`` times the figure's pixels)."""
        return self._t(x, self.xlim, self.xlog, self.tile.width, False)

    def py(self, y: Any) -> np.ndarray:
        return self._t(y, self.ylim, self.ylog, self.tile.height, True)

    def fx(self, x: float) -> float:
        """x on the figure."""
        return self.box[0] + float(self.px(x)) / self.s

    def fy(self, y: float) -> float:
        return self.box[1] + float(self.py(y)) / self.s

    def bars(self, values: Any, edges: Any, color: str, alpha: float, label: str | None = None) -> None:
        """A histogram: one filled rectangle per non-empty bin, from the bottom of the panel."""
        v = np.asarray(values, dtype=np.float64)
        xs, ys = self.px(edges), self.py(v)
        fill = _blend(color, alpha)
        for i in np.flatnonzero(np.isfinite(ys) & (v > 0)):
            self.draw.rectangle(
                (xs[i], min(ys[i], self.tile.height), max(xs[i + 1] - 1, xs[i]), self.tile.height), fill=fill
            )
        if label:
            self.legend.append(("fill", fill, label))

    def line(self, x: Any, y: Any, color: str, lw: float, label: str | None = None) -> None:
        xs, ys = self.px(x), self.py(y)
        ok = np.isfinite(xs) & np.isfinite(ys)
        pts = [(float(a), float(b)) for a, b in zip(xs[ok], ys[ok], strict=True)]
        if len(pts) > 1:
            self.draw.line(pts, fill=color, width=max(1, round(lw * self.k)))
        if label:
            self.legend.append(("line", color, label))

    def vline(self, x: float, color: str, lw: float, label: str | None = None, dash: bool = True) -> None:
        """A vertical line across the panel (dashed unless ``dash`` is false)."""
        xp, h, w = float(self.px(x)), self.tile.height, max(1, round(lw * self.k))
        step = 6 * self.k if dash else h
        for y in np.arange(0, h, step):
            self.draw.line([(xp, y), (xp, min(y + (step * 0.6 if dash else h), h))], fill=color, width=w)
        if label:
            self.legend.append(("dash", color, label))

    def rug(self, xs: Any, color: str, height: float = 0.07) -> None:
        """Short vertical marks at the bottom (``height``: fraction of the panel)."""
        h = self.tile.height
        for xp in self.px(xs):
            self.draw.line([(xp, h), (xp, h * (1 - height))], fill=color, width=max(1, round(1.2 * self.k)))

    def xgrid(self) -> None:
        """Light vertical lines at the x ticks (drawn first, under the data)."""
        for v, _ in _ticks(*self.xlim, self.xlog):
            xp = float(self.px(v))
            self.draw.line([(xp, 0), (xp, self.tile.height)], fill="#e3e3e3", width=max(1, round(self.k)))

    def hbars(self, values: Any, colors: list[str]) -> None:
        """Horizontal bars, one per row ``i`` (y = i), from the left edge of the panel."""
        x0, ys = float(self.px(self.xlim[0])), self.py(np.arange(len(colors)))
        half = abs(float(self.py(0.4)) - float(self.py(0.0)))
        for xp, yp, c in zip(self.px(values), ys, colors, strict=True):
            if np.isfinite(xp) and xp > x0:
                self.draw.rectangle((x0, yp - half, xp, yp + half), fill=c)

    def finish(
        self,
        xlabel: str,
        ylabel: str,
        title: str | None = None,
        legend: str = "ur",
        yticks: list[tuple[float, str]] | None = None,
        ytick_pt: float = 8,
    ) -> None:
        """Paste the tile; draw the frame, ticks and tick labels, axis labels, title and legend.

        ``yticks``: ``(y, label)`` pairs instead of the automatic ticks (``[]``: none).
        """
        cv, (x0, y0, x1, y1) = self.cv, self.box
        cv.img.paste(self.tile.reduce(self.s) if self.s > 1 else self.tile, (x0, y0))
        d, k, tick = cv.draw, cv.k, 3.5 * cv.k
        d.rectangle((x0, y0, x1, y1), outline="black", width=max(1, round(0.8 * k)))
        for v, s in _ticks(*self.xlim, self.xlog):
            xp = self.fx(v)
            d.line([(xp, y1), (xp, y1 + tick)], fill="black", width=max(1, round(0.8 * k)))
            cv.text((xp, y1 + tick + 2 * k), s, 8, "ma")
        widest = 0.0
        for v, s in _ticks(*self.ylim, self.ylog) if yticks is None else yticks:
            yp = self.fy(v)
            d.line([(x0 - tick, yp), (x0, yp)], fill="black", width=max(1, round(0.8 * k)))
            cv.text((x0 - tick - 2 * k, yp), s, ytick_pt, "rm")
            widest = max(widest, cv.font(ytick_pt).getlength(s))
        cv.text(((x0 + x1) / 2, y1 + tick + 14 * k), xlabel, 9, "ma")
        if ylabel:
            cv.vtext((x0 - tick - 4 * k - widest - 6 * k, (y0 + y1) / 2), ylabel, 9)
        if title:
            cv.text(((x0 + x1) / 2, y0 - 5 * k), title, 9, "md")
        if self.legend:
            self._legend(legend)

    def _legend(self, where: str) -> None:
        cv, (x0, y0, x1, y1), k = self.cv, self.box, self.cv.k
        font, row, key = cv.font(7.5), 12 * k, 18 * k
        w = key + 4 * k + max(font.getlength(s) for _, _, s in self.legend) + 8 * k
        h = row * len(self.legend) + 6 * k
        lx = x1 - w - 5 * k if where == "ur" else x0 + 5 * k
        ly = y0 + 5 * k if where == "ur" else y1 - h - 5 * k
        cv.draw.rectangle((lx, ly, lx + w, ly + h), fill="white", outline="#cccccc", width=max(1, round(k)))
        for i, (kind, color, s) in enumerate(self.legend):
            cy = ly + 3 * k + row * (i + 0.5)
            a, b = lx + 4 * k, lx + 4 * k + key
            if kind == "fill":
                cv.draw.rectangle((a, cy - 3.5 * k, b, cy + 3.5 * k), fill=color)
            elif kind == "dash":
                for s0 in (a, a + key * 0.4 + 1.5 * k, a + key * 0.8 + 3 * k):
                    cv.draw.line([(s0, cy), (min(s0 + key * 0.3, b), cy)], fill=color, width=round(1.4 * k))
            else:
                cv.draw.line([(a, cy), (b, cy)], fill=color, width=round(1.6 * k))
            cv.text((b + 4 * k, cy), s, 7.5, "lm")


def has_powerlaw(metrics: Any) -> bool:
    """Whether ``metrics`` (an ESDMetrics or None) holds a power-law fit to draw."""
    alpha = getattr(metrics, "alpha", None)
    xmin = getattr(metrics, "alpha_xmin", None)
    return alpha is not None and xmin is not None and bool(np.isfinite(alpha) and np.isfinite(xmin))


def _num(value: Any, spec: str) -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def _powerlaw_panel(cv: _Canvas, box: tuple[float, ...], layer: LayerAnalysis, metrics: Any) -> None:
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
    dens = np.histogram(x, edges)[0] / (x.size * np.diff(edges))
    alpha, xmin, n_tail = float(metrics.alpha), float(metrics.alpha_xmin), int(metrics.alpha_n_tail)
    xs = np.geomspace(xmin, x[-1], 50)
    ys = (n_tail / x.size) * (alpha - 1.0) / xmin * (xs / xmin) ** -alpha
    pos = dens[dens > 0]
    lo, hi = float(pos.min()) / 2, float(max(pos.max(), ys.max())) * 2
    ax = _Axes(cv, box, (edges[0], edges[-1]), (lo, hi)).log(True, True)
    ax.bars(dens, edges, _BULK, 0.55, "ESD of s^2")
    ax.line(xs, ys, _SPIKE, 1.8, f"power law alpha={alpha:.2f} (D={metrics.alpha_ks:.3f})")
    ax.vline(xmin, _EDGE, 1.2, f"xmin={xmin:.3g} ({n_tail} in tail)")
    title = f"heavy tail: alpha-hat={_num(metrics.alpha_hill, '.2f')}, "
    title += f"stable rank={_num(metrics.stable_rank, '.3g')}"
    ax.finish("eigenvalue s^2 (log)", "density (log)", title, legend="ll")


# plot_esd runs over 80 lines: one figure drawn as a straight sequence of panels on arrays computed
# at its top; split, the pieces would pass a dozen arrays around.
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
    exceeds 20 ``lambda_plus``). When the layer's metrics hold a power-law fit, a right panel shows
    the log-log ESD with it. Written atomically as PNG; returns the path.

    Raises
    ------
    ValueError
        when the layer has no fit (verdict ``too-small`` or ``invalid``).
    """
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
    metrics = layer.metrics if has_powerlaw(layer.metrics) else None

    cv = _Canvas(12.5 if metrics else 8.0, 6.4 if far else 4.6, dpi)
    W, H, k = cv.img.width, cv.img.height, cv.k
    left, right, top, bottom = 62 * k, W - 12 * k, 52 * k, H - 36 * k
    split = left + (right - left - 70 * k) * 0.6 if metrics else right
    row = top + (bottom - top - 44 * k) * 0.6 if far else bottom

    # Density histogram over the view, normalised by all p eigenvalues so it is comparable with the
    # MP density (the mass of spikes beyond the view is simply not drawn).
    counts, edges = np.histogram(lam[lam <= view_hi], bins=nbins, range=(0.0, view_hi))
    dens = counts / (p * (edges[1] - edges[0]))
    cut = min(max(int(np.searchsorted(edges, lam_plus, side="right")) if has_bulk else nbins, 0), nbins)
    ymax = float(dens.max()) if dens.size else 1.0
    if has_bulk:
        x = np.linspace(a, b, 600)[1:-1]
        y = mp_pdf(x, fit.gamma, fit.sigma2)
        ymax = max(ymax, float(np.max(y[x > a + 0.05 * (b - a)])) if x.size else ymax)
    ax = _Axes(cv, (left, top, split, row), (0.0, view_hi), (0.0, 1.15 * ymax if ymax > 0 else 1.0))
    ax.bars(dens[:cut], edges[: cut + 1], _BULK, 0.75, "eigenvalues (bulk)")
    if (dens[cut:] > 0).any():
        ax.bars(dens[cut:], edges[cut:], _SPIKE, 0.75, "above edge")
    if has_bulk:
        ax.line(x, y, _CURVE, 1.6, f"MP fit (gamma={fit.gamma:.3g}, sigma2={fit.sigma2:.3g})")
        ax.vline(lam_plus, _EDGE, 1.4, f"edge lambda+ = {lam_plus:.3g}")
        ax.rug(spikes[spikes <= view_hi], _SPIKE)
    ax.finish("eigenvalue lambda = s^2 / N", "density")
    x0, y0, x1, y1 = ax.box
    if far:
        beyond = int((spikes > view_hi).sum())
        note = f"{spikes.size} spikes, {beyond} beyond this view (largest {lam_max:.3g}; see below)"
        cv.text((x1 - 6 * k, (y0 + y1) / 2), note, 8.5, "rm", _SPIKE)
    elif not has_bulk:
        cv.text(((x0 + x1) / 2, y0 + (y1 - y0) * 0.1), "no positive bulk fitted", 9, "mm", _SPIKE)

    if far:
        lo = float(lam[lam > 0].min()) if (lam > 0).any() else lam_plus / 100.0
        hi = lam_max * 1.001
        full = np.geomspace(lo, hi, nbins + 1) if log_x else np.linspace(0.0, hi, nbins + 1)
        bulk = lam[lam <= lam_plus]
        c_bulk, c_spk = np.histogram(bulk, full)[0], np.histogram(spikes, full)[0]
        ax2 = _Axes(
            cv,
            (left, row + 44 * k, split, bottom),
            (full[0], full[-1]),
            (0.5, 2.0 * max(c_bulk.max(), c_spk.max(), 1)),
        )
        ax2.log(log_x, True)
        ax2.bars(c_bulk, full, _BULK, 0.75, f"bulk ({bulk.size})")
        ax2.bars(c_spk, full, _SPIKE, 0.85, f"spikes ({spikes.size})")
        ax2.rug(spikes, _SPIKE, height=0.12)
        ax2.vline(lam_plus, _EDGE, 1.4)
        ax2.finish("eigenvalue lambda (whole spectrum" + (", log scale)" if log_x else ")"), "count")
    if metrics is not None:
        _powerlaw_panel(cv, (split + 70 * k, top, right, bottom), layer, metrics)

    m, n = fit.shape
    shape = "x".join(str(v) for v in layer.shape)
    as_mat = f" as {m}x{n}" if len(layer.shape) != 2 else ""
    color = VERDICT_COLORS.get(layer.verdict, "black") if layer.verdict != "fit" else "black"
    cv.text((W / 2, 6 * k), f"{layer.name}  [{shape}{as_mat}, {layer.dtype}]", 10, "ma", color)
    stats = f"sigma2={fit.sigma2:.3g}   spikes={fit.n_spikes}/{fit.p}   ks={fit.ks:.3f}   "
    stats += f"verdict: {layer.verdict}"
    cv.text((W / 2, 21 * k), stats, 10, "ma", color)
    return cv.save(path)


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
    gate = ks_max if np.isfinite(ks_max) else 0.0  # an infinite gate (no KS test): no line
    n, fs = len(layers), 8 if len(layers) <= 60 else 6
    names = [la.name if len(la.name) <= 70 else la.name[:33] + "..." + la.name[-34:] for la in layers]
    colors = [VERDICT_COLORS.get(la.verdict, "black") for la in layers]
    fits = [la.fit for la in layers]
    bulk = np.array([f.bulk_fraction if f is not None else 0.0 for f in fits])
    spikes = np.array([f.n_spikes if f is not None else 0 for f in fits])
    ks = np.array([f.ks if f is not None else 0.0 for f in fits])

    # Axis-aligned bars: no supersampling needed (text is anti-aliased by FreeType).
    cv = _Canvas(10.0 + min(max(map(len, names)), 70) * 0.06, min(2.0 + 0.24 * n, 150.0), dpi, ss=1)
    W, H, k = cv.img.width, cv.img.height, cv.k
    left = 14 * k + max(cv.font(fs).getlength(s) for s in names)
    top, bottom, gap = 34 * k, H - 52 * k, 16 * k
    width = (W - 10 * k - left - 2 * gap) / 3
    ylim, rows = (n - 0.5, -0.5), [(float(i), "") for i in range(n)]
    log_spikes = bool(spikes.max() > 0 and spikes.max() / max(1, np.median(spikes[spikes > 0])) > 50)
    panels = [
        ("bulk fraction n_bulk / p", bulk, (0.0, 1.0), False, None),
        (
            "spikes (above lambda+)",
            spikes,
            (0.8, 1.3 * spikes.max()) if log_spikes else (0.0, 1.15 * max(1, spikes.max())),
            log_spikes,
            "{:d}",
        ),
        (
            "KS distance to fitted MP",
            ks,
            (0.0, max(1.2 * gate, 1.15 * float(ks.max()), 0.01)),
            False,
            "{:.3f}",
        ),
    ]
    for j, (label, values, xlim, xlog, fmt) in enumerate(panels):
        x0 = left + j * (width + gap)
        ax = _Axes(cv, (x0, top, x0 + width, bottom), xlim, ylim).log(xlog, False)
        ax.xgrid()
        ax.hbars(values, colors)
        if j == 2 and gate > 0:
            ax.vline(ks_max, "#000000", 1.2)
        ax.finish(label, "", yticks=[(i, s) for i, s in enumerate(names)] if j == 0 else rows, ytick_pt=fs)
        for i, la in enumerate(layers):
            yp = ax.fy(i)
            if la.fit is None:
                cv.text((x0 + 3 * k, yp), la.verdict, fs, "lm", colors[i])
            elif fmt and n <= 80:
                xp = max(ax.fx(values[i]) if values[i] > 0 or not xlog else x0, x0)
                cv.text((xp + 2 * k, yp), fmt.format(values[i].item()), fs, "lm")
        if j == 2 and gate > 0:
            cv.text((ax.fx(ks_max), top - 2 * k), f" gate ks_max={ks_max:g}", 8, "ld")
    present = [v for v in VERDICT_COLORS if any(la.verdict == v for la in layers)]
    x = W / 2 - sum(cv.font(8).getlength(v) + 30 * k for v in present) / 2
    for v in present:
        cv.draw.rectangle((x, H - 14 * k, x + 16 * k, H - 8 * k), fill=VERDICT_COLORS[v])
        cv.text((x + 20 * k, H - 11 * k), v, 8, "lm")
        x += cv.font(8).getlength(v) + 30 * k
    if title:
        cv.text((W / 2, 8 * k), title, 9, "ma")
    return cv.save(path)
