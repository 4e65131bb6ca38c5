"""Speed of the spectral analysis: BEMA fit and analyze_matrix vs bare float64 svdvals.

Per layer shape: median time of ``torch.linalg.svdvals`` (float64, same matrix), of the full
``analyze_matrix`` (float32 weight in, conversion + finiteness check + svdvals + fit) and of
``fit_bulk`` alone (given the singular values), all in the same run. Also the original research
code's approach to the MP quantiles (one scipy ``quad`` + one ``brentq`` per quantile), timed on a
few quantiles of a 784-wide layer and extrapolated to the whole trimmed window.

Run: ``python benchmarks/spectral_speed.py`` (add ``--quick`` to skip the 4096 x 4096 layer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _env import git_revision
from _measure import median_time

from rmtprune._atomic import atomic_write_text
from rmtprune.analysis import analyze_matrix
from rmtprune.spectral import fit_bulk, mp_pdf, mp_support

SHAPES = [(256, 256), (784, 1000), (1000, 784), (1024, 4096), (4096, 1024), (2048, 2048), (4096, 4096)]
# A ViT-S/16-like stack (d = 384, MLP 1536, 12 blocks): qkv, proj, fc1, fc2 per block, + patch embed + head.
VIT = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 12 + [(384, 768), (1000, 384)]


def _paired_median(fa, fb, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _repeats(shape: tuple[int, int]) -> int:
    size = shape[0] * shape[1] * min(shape)
    return 2 if size > 4e9 else 3 if size > 2e8 else 5 if size > 5e7 else 25


def _tall(w: torch.Tensor) -> torch.Tensor:
    """The matrix in LAPACK's fast (tall) orientation: the fair bare baseline (same singular values)."""
    return w if w.shape[0] >= w.shape[1] else w.T


def bench_layers(shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(*shape, generator=g)  # float32, as weights are stored
        w64 = w.double()
        s = torch.linalg.svdvals(w64).numpy()
        fit_bulk(s, shape)  # warm the quantile-table cache, as in any real run after the first layer
        r = _repeats(shape)
        # Interleave the two so that load from other processes hits both alike.
        t_svd, t_full = _paired_median(
            lambda w64=w64: torch.linalg.svdvals(_tall(w64)), lambda w=w: analyze_matrix(w), r
        )
        t_fit = median_time(lambda s=s, shape=shape: fit_bulk(s, shape), 50)
        rows.append({"shape": shape, "svd": t_svd, "full": t_full, "fit": t_fit, "repeats": r})
        print(
            f"{shape[0]:>5} x {shape[1]:<5} svdvals {t_svd * 1e3:9.1f} ms  analyze {t_full * 1e3:9.1f} ms  "
            f"ratio {t_full / t_svd:5.2f}  fit {t_fit * 1e3:6.2f} ms",
            flush=True,
        )
    return rows


def bench_model(shapes: list[tuple[int, int]]) -> dict:
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(*sh, generator=g) for sh in shapes]
    for w in ws[:4]:
        analyze_matrix(w)
    t_svd, t_full = _paired_median(
        lambda: [torch.linalg.svdvals(_tall(w.double())) for w in ws],
        lambda: [analyze_matrix(w) for w in ws],
        2,
    )
    svs = [torch.linalg.svdvals(w.double()).numpy() for w in ws]
    t_fit = median_time(lambda: [fit_bulk(s, tuple(w.shape)) for s, w in zip(svs, ws, strict=True)], 5)
    return {"layers": len(shapes), "svd": t_svd, "full": t_full, "fit": t_fit}


def bench_original(p: int = 784, N: int = 1000, n_quantiles: int = 5) -> dict:
    """The research code's quantiles: one quad integral inside one root-find per quantile."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    gamma = p / N
    a, b = mp_support(gamma)

    def cdf(x: float) -> float:
        return quad(lambda t: float(mp_pdf(t, gamma)), a, x)[0]

    levels = (np.arange(1, p + 1) - 0.5) / p
    window = levels[int(np.ceil(0.25 * p)) - 1 : int(np.floor(0.75 * p))]
    pick = window[:: max(1, len(window) // n_quantiles)][:n_quantiles]
    t0 = time.perf_counter()
    for q in pick:
        brentq(lambda x, q=q: cdf(x) - q, a, b, xtol=1e-10)
    per_q = (time.perf_counter() - t0) / len(pick)
    return {"p": p, "N": N, "timed": len(pick), "per_quantile": per_q, "window": len(window)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="layers up to 1024 x 4096 only, and 2 of the 12 ViT blocks"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, loaded 2-core machine 2 OpenMP threads made svdvals "
        "of a 256 x 256 matrix 50x slower, 4.2 s vs 0.08 s, measured)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spectral_speed.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    big = {(4096, 4096), (2048, 2048), (4096, 1024)}
    shapes = [sh for sh in SHAPES if not (args.quick and sh in big)]
    t_start = time.perf_counter()
    rows = bench_layers(shapes)
    model = bench_model(VIT[:8] + VIT[-2:] if args.quick else VIT)
    print(
        f"ViT-S-like, {model['layers']} layers: svdvals {model['svd']:.2f} s  analyze {model['full']:.2f} s  "
        f"ratio {model['full'] / model['svd']:.2f}  fit total {model['fit'] * 1e3:.1f} ms"
    )
    orig = bench_original()
    fit784 = next(r["fit"] for r in rows if r["shape"] == (784, 1000))
    extrap = orig["per_quantile"] * orig["window"]
    print(
        f"original approach: {orig['per_quantile'] * 1e3:.1f} ms per quantile x {orig['window']} quantiles "
        f"= {extrap:.2f} s (extrapolated) vs fit_bulk {fit784 * 1e3:.2f} ms: {extrap / fit784:,.0f}x"
    )
    total = time.perf_counter() - t_start

    lines = [
        "# Spectral engine speed",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- revision: {git_revision()}",
        f"- Machine: 2 CPU cores, no GPU ({platform.processor() or platform.machine()}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads). Other processes may share the cores, so "
        "absolute times are noisy; ratios are taken within the same run.",
        f"- Command: `python benchmarks/spectral_speed.py{' --quick' if args.quick else ''}"
        f"{'' if args.threads == 1 else f' --threads {args.threads}'}` "
        f"(total {total:.0f} s)",
        "- Weights are float32 random normal; `svdvals` is `torch.linalg.svdvals` on the same matrix in "
        "float64, in its faster (tall) orientation; "
        "`analyze` is `analyze_matrix` (float64 conversion, NaN/Inf check, singular values from the "
        "Gram eigenvalues, BEMA fit); "
        "`fit` is `fit_bulk` given the singular values (median of 50). Medians of the repeats shown.",
        "",
        "| shape | repeats | svdvals (ms) | analyze (ms) | analyze / svdvals | fit (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['repeats']} | {r['svd'] * 1e3:.1f} | "
            f"{r['full'] * 1e3:.1f} | {r['full'] / r['svd']:.2f} | {r['fit'] * 1e3:.2f} |"
        )
    lines += [
        "",
        f"Whole model (ViT-S/16-like, {model['layers']} weight matrices, d=384, median of 2): svdvals "
        f"{model['svd']:.2f} s, analyze {model['full']:.2f} s (ratio {model['full'] / model['svd']:.2f}), "
        f"all fits together {model['fit'] * 1e3:.1f} ms.",
        "",
        f"Original research-code approach (one `scipy.integrate.quad` inside one `brentq` per MP quantile), "
        f"784 x 1000 layer: {orig['per_quantile'] * 1e3:.1f} ms per quantile, measured on {orig['timed']} "
        f"quantiles and extrapolated to the {orig['window']} quantiles of the trimmed window: "
        f"{extrap:.2f} s, vs {fit784 * 1e3:.2f} ms for the whole `fit_bulk` here ({extrap / fit784:,.0f}x).",
        "",
    ]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
