"""Simulate the null distribution of the BEMA gate's KS statistic and write the package's table.

A pure Marchenko-Pastur bulk of a small matrix has a large KS distance to its own fitted law (at
``p = 10`` the 99% quantile is about 0.2, twice the old fixed gate of 0.1), and a large one a tiny
distance (about 0.005 at ``p = 1024``). ``rmtprune.spectral.gate`` reads the quantiles simulated
here to give each layer the sampling fluctuation of a true MP bulk of its size.

What is simulated: for every cell ``(p, gamma)`` of the grid, ``N = round(p / gamma)``, and ``S``
independent spectra of a ``p x N`` real Gaussian matrix (``S`` in :func:`samples_for`), the KS
statistic that :func:`rmtprune.spectral.fit_bulk` reports (the one-pass value over the trimmed
window, so independent of ``beta`` and of deflation), for every trim fraction ``alpha`` of
:data:`ALPHAS`; then its quantiles at :data:`LEVELS`. The spectra come from the Dumitriu-Edelman
bidiagonal model of the real (beta = 1) Laguerre ensemble: the singular values of the lower
bidiagonal matrix with diagonal ``chi_N, chi_{N-1}, ..., chi_{N-p+1}`` and sub-diagonal
``chi_{p-1}, ..., chi_1`` have exactly the law of those of a ``p x N`` Gaussian matrix, at
``O(p^2)`` per spectrum instead of ``O(p^2 N)``. ``--verify`` checks it against dense Gaussian
matrices (two-sample KS test of the statistic's distribution), and every cell checks the vectorised
statistic against ``fit_bulk`` on its first samples.

Writes ``src/rmtprune/spectral/ks_null_table.json`` (the table the package reads) and
``benchmarks/results/ks_null_table.md``. Rerun: ``python benchmarks/make_ks_table.py --verify``
(about 10-15 min on one core; ``--quick`` is a smoke run to a scratch folder). Seeded per cell:
the same command gives the same table.

References
----------
Dumitriu, I. and Edelman, A. (2002). Matrix models for beta ensembles. J. Math. Phys. 43(11),
5830-5847. arXiv:math-ph/0206043.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _env import git_revision, machine_line, versions  # noqa: E402
from scipy.linalg import eigvalsh_tridiagonal  # noqa: E402

from rmtprune._atomic import atomic_write_text  # noqa: E402
from rmtprune.spectral import fit_bulk, mp_cdf, mp_ppf  # noqa: E402
from rmtprune.spectral.gate import TABLE_FORMAT, TABLE_PATH  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ks_null_table.md"
QUICK_DIR = ROOT / "runs" / "bench-quick"

P_GRID = (10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
GAMMAS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
ALPHAS = (0.1, 0.2, 0.25, 0.3, 0.4)
#: Off-grid trim fractions measured on the same samples to check the table's interpolation in alpha.
CHECK_ALPHAS = (0.15, 0.35)
LEVELS = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999)
#: Cells where --verify compares the bidiagonal sampler with dense Gaussian matrices: (p, gamma, samples).
VERIFY_CELLS = ((10, 0.5, 3000), (16, 1.0, 3000), (32, 0.1, 2000), (64, 0.25, 1500), (128, 1.0, 800))


def samples_for(p: int, scale: float = 1.0) -> int:
    """Spectra per cell: 4000 up to p = 128, 2000 up to 256, 1000 above (the cost grows like p^2)."""
    base = 4000 if p <= 128 else 2000 if p <= 256 else 1000
    return max(50, int(round(base * scale)))


def laguerre_eigenvalues(rng: np.random.Generator, p: int, N: int, S: int) -> np.ndarray:
    """``S x p`` ascending eigenvalues of ``W W^T`` for ``S`` real Gaussian ``p x N`` matrices ``W``.

    Dumitriu-Edelman: ``W W^T`` has the eigenvalues of ``B^T B`` with ``B`` the lower bidiagonal
    matrix of independent ``chi`` entries (module docstring); ``B^T B`` is tridiagonal with
    diagonal ``d_i^2 + e_i^2`` and off-diagonal ``d_{i+1} e_i``.
    """
    d2 = rng.chisquare(N - np.arange(p), size=(S, p))
    e2 = rng.chisquare(np.arange(p - 1, 0, -1), size=(S, p - 1)) if p > 1 else np.zeros((S, 0))
    diag = d2.copy()
    diag[:, :-1] += e2
    off = np.sqrt(d2[:, 1:] * e2)
    out = np.empty((S, p))
    for i in range(S):
        out[i] = eigvalsh_tridiagonal(diag[i], off[i])
    return np.maximum(out, 0.0)


def dense_eigenvalues(rng: np.random.Generator, p: int, N: int, S: int) -> np.ndarray:
    """The same law from dense Gaussian matrices (the reference the bidiagonal model is checked on)."""
    out = np.empty((S, p))
    for i in range(S):
        s = np.linalg.svd(rng.standard_normal((p, N)), compute_uv=False)
        out[i] = np.sort(s**2)
    return out


def ks_statistics(lam: np.ndarray, p: int, N: int, alpha: float) -> np.ndarray:
    """The one-pass KS statistic of ``fit_bulk`` (bema._match_ranks) for each row of ``S x p`` eigenvalues.

    ``lam`` are the eigenvalues of ``W W^T`` (ascending), the fit's spectrum being ``lam / N``.
    Vectorised over the rows; equal to ``fit_bulk(...).ks`` (checked in :func:`check_against_fit_bulk`).
    """
    gamma = p / N
    lo, hi = max(1, math.ceil(alpha * p)), math.floor((1.0 - alpha) * p)
    ranks = np.arange(lo, hi + 1)
    q = mp_ppf((ranks - 0.5) / p, gamma)
    window = lam[:, ranks - 1] / N
    sigma2 = window @ q / float(q @ q)
    f_emp = ranks / p
    f_mp = mp_cdf(window / sigma2[:, None], gamma)
    return np.max(np.abs(f_emp - f_mp), axis=1)


def check_against_fit_bulk(lam: np.ndarray, p: int, N: int, alpha: float, ks: np.ndarray) -> float:
    """Largest difference between the vectorised statistic and ``fit_bulk(...).ks`` on the given rows."""
    worst = 0.0
    for row, k in zip(lam, ks, strict=True):
        s = np.sqrt(row * 1.0)[::-1]
        worst = max(worst, abs(fit_bulk(s, (p, N), alpha=alpha).ks - float(k)))
    return worst


def cell_seed(seed: int, p: int, N: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, p, N])


def simulate(args: argparse.Namespace) -> dict:
    """Every cell of the grid: quantiles per alpha, the share above the old 0.1 gate, timings."""
    quant = {f"{a:g}": [[None] * len(GAMMAS) for _ in P_GRID] for a in ALPHAS}
    extra = {"above_0.1": {}, "check_alpha": {}, "max_abs_diff_fit_bulk": 0.0, "seconds": {}}
    for ip, p in enumerate(P_GRID):
        S = samples_for(p, args.scale)
        t0 = time.perf_counter()
        for ig, gamma in enumerate(GAMMAS):
            N = max(p, int(round(p / gamma)))
            lam = laguerre_eigenvalues(np.random.default_rng(cell_seed(args.seed, p, N)), p, N, S)
            for a in ALPHAS + CHECK_ALPHAS:
                ks = ks_statistics(lam, p, N, a)
                n_check = min(S, 5)
                diff = check_against_fit_bulk(lam[:n_check], p, N, a, ks[:n_check])
                extra["max_abs_diff_fit_bulk"] = max(extra["max_abs_diff_fit_bulk"], diff)
                qs = [float(f"{v:.3g}") for v in np.quantile(ks, LEVELS)]
                if a in ALPHAS:
                    quant[f"{a:g}"][ip][ig] = qs
                else:
                    extra["check_alpha"][(p, gamma, a)] = qs
                if a == 0.25:
                    extra["above_0.1"][(p, gamma)] = float(np.mean(ks > 0.1))
        extra["seconds"][p] = time.perf_counter() - t0
        print(f"p={p:5d}  S={S:5d}  {extra['seconds'][p]:6.1f} s", file=sys.stderr, flush=True)
    return {"quantiles": quant, "extra": extra}


def verify(args: argparse.Namespace) -> list[list[str]]:
    """Bidiagonal vs dense Gaussian samples on :data:`VERIFY_CELLS` (alpha 0.25)."""
    from scipy.stats import ks_2samp  # only here: tests import this module for its grid

    rows = []
    for p, gamma, S in VERIFY_CELLS:
        S = max(100, int(round(S * args.scale)))
        N = int(round(p / gamma))
        rng = np.random.default_rng(np.random.SeedSequence([args.seed, 7, p, N]))
        kb = ks_statistics(laguerre_eigenvalues(rng, p, N, S), p, N, 0.25)
        kd = ks_statistics(dense_eigenvalues(rng, p, N, S), p, N, 0.25)
        qb, qd = np.quantile(kb, [0.5, 0.9, 0.99]), np.quantile(kd, [0.5, 0.9, 0.99])
        pv = ks_2samp(kb, kd).pvalue
        rows.append(
            [f"{p} x {N}", str(S), " / ".join(f"{v:.4f}" for v in qb), " / ".join(f"{v:.4f}" for v in qd),
             f"{pv:.2f}"]
        )  # fmt: skip
        print(f"verify {p}x{N}: two-sample KS p-value {pv:.3f}", file=sys.stderr, flush=True)
    return rows


def power_law(quant: dict, alpha: str, level_index: int, ig: int, first: int) -> tuple[float, float]:
    """Least-squares ``log q = c + b log p`` over the grid from ``P_GRID[first]`` on: (b, exp(c))."""
    x = np.log(np.array(P_GRID[first:], dtype=float))
    y = np.log([quant[alpha][ip][ig][level_index] for ip in range(first, len(P_GRID))])
    b, c = np.polyfit(x, y, 1)
    return float(b), float(math.exp(c))


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(args: argparse.Namespace, sim: dict, ver: list[list[str]], wall: float, rev: str) -> str:
    quant, extra = sim["quantiles"], sim["extra"]
    i99 = LEVELS.index(0.99)
    sections = [
        "# Null distribution of the BEMA gate's KS statistic (the table of `rmtprune.spectral.gate`)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        machine_line() + f" scipy: {versions('scipy')}.",
        f"- revision: {rev}",
        f"- command: `{args.command}`; wall time {wall / 60:.1f} min on one core",
        f"- seed {args.seed} (per cell: SeedSequence([seed, p, N])); samples per cell: "
        + ", ".join(f"p={p}: {samples_for(p, args.scale)}" for p in P_GRID),
        f"- grid: p in {list(P_GRID)}, gamma in {list(GAMMAS)} (N = round(p / gamma)), "
        f"alpha in {list(ALPHAS)}; levels {list(LEVELS)}",
        "- statistic: the one-pass KS distance `fit_bulk(...).ks` over the trimmed window, on spectra of "
        "p x N real Gaussian matrices (Dumitriu-Edelman bidiagonal sampler). Largest difference between the "
        f"vectorised statistic and `fit_bulk` on the checked samples: {extra['max_abs_diff_fit_bulk']:.1e}.",
        "- resolution: an empirical 0.999 quantile rests on ~S/1000 samples above it (1 at p >= 384): "
        "p-values below 0.001 are reported as '< 0.001'.",
        "",
        "## 99% quantile of KS under the null, alpha = 0.25 (the default gate adds this to ks_max)",
        "",
    ]
    head = ["p"] + [f"gamma={g:g}" for g in GAMMAS] + ["P(KS > 0.1), gamma=0.5"]
    rows = []
    for ip, p in enumerate(P_GRID):
        cells = [f"{quant['0.25'][ip][ig][i99]:.4f}" for ig in range(len(GAMMAS))]
        rows.append([str(p)] + cells + [f"{extra['above_0.1'][(p, 0.5)]:.3f}"])
    sections += [md_table(head, rows), ""]
    sections += ["## 99% quantile at gamma = 0.5, by alpha", ""]
    ig5 = GAMMAS.index(0.5)
    rows = [
        [str(p)] + [f"{quant[f'{a:g}'][ip][ig5][i99]:.4f}" for a in ALPHAS] for ip, p in enumerate(P_GRID)
    ]
    sections += [md_table(["p"] + [f"alpha={a:g}" for a in ALPHAS], rows), ""]
    sections += [
        "## Scaling in p (what the gate extrapolates with beyond p = 1024)",
        "",
        "Least-squares fit `q(p) = c p^b` of the 99% quantile over p >= 128 (alpha = 0.25). An i.i.d. "
        "sample's KS would shrink like p^-0.5; eigenvalues are rigid, so it shrinks almost like 1/p.",
        "",
    ]
    first = P_GRID.index(128)
    rows = []
    for ig, g in enumerate(GAMMAS):
        b, c = power_law(quant, "0.25", i99, ig, first)
        rows.append([f"{g:g}", f"{b:.3f}", f"{c:.3f}"])
    sections += [md_table(["gamma", "exponent b", "c"], rows), ""]
    sections += [
        "## Interpolation in alpha (off-grid alphas measured on the same samples)",
        "",
        "Measured 99% quantile at an off-grid alpha against the table's interpolation (linear in "
        "alpha on log q between the neighbouring tabulated alphas).",
        "",
    ]
    rows = []
    for (p, g, a), qs in sorted(extra["check_alpha"].items()):
        if g != 0.5 or p not in (10, 16, 32, 64, 128, 256, 1024):
            continue
        ip = P_GRID.index(p)
        lo, hi = max(x for x in ALPHAS if x < a), min(x for x in ALPHAS if x > a)
        w = (a - lo) / (hi - lo)
        ql, qh = quant[f"{lo:g}"][ip][ig5][i99], quant[f"{hi:g}"][ip][ig5][i99]
        interp = math.exp((1 - w) * math.log(ql) + w * math.log(qh))
        rows.append([str(p), f"{a:g}", f"{qs[i99]:.4f}", f"{interp:.4f}", f"{interp / qs[i99] - 1:+.1%}"])
    sections += [md_table(["p", "alpha", "measured q99", "interpolated", "rel. diff"], rows), ""]
    if ver:
        sections += [
            "## The bidiagonal sampler against dense Gaussian matrices (alpha = 0.25)",
            "",
            "Quantiles 0.5 / 0.9 / 0.99 of the statistic from each sampler, independent samples; the "
            "two-sample KS test's p-value should look uniform (a small one would be a mismatch).",
            "",
            md_table(["p x N", "samples", "bidiagonal", "dense", "two-sample p-value"], ver),
            "",
        ]
    sections += [
        "## Time per p (all gammas and alphas of the grid)",
        "",
        md_table(["p"] + [str(p) for p in P_GRID], [["s"] + [f"{extra['seconds'][p]:.1f}" for p in P_GRID]]),
        "",
    ]
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true", help="check the sampler against dense Gaussian matrices")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 5%% of the samples, to runs/bench-quick/"
    )
    ap.add_argument("--table", type=Path, default=None, help=f"output table (default {TABLE_PATH})")
    ap.add_argument("--out", type=Path, default=None, help=f"results markdown (default {RESULTS})")
    args = ap.parse_args(argv)
    args.command = "python benchmarks/make_ks_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.scale = 0.05 if args.quick else 1.0
    if args.quick:
        QUICK_DIR.mkdir(parents=True, exist_ok=True)
    table_path = args.table or (QUICK_DIR / "ks_null_table.json" if args.quick else TABLE_PATH)
    out_path = args.out or (QUICK_DIR / "ks_null_table.md" if args.quick else RESULTS)
    rev = git_revision()
    t0 = time.perf_counter()
    sim = simulate(args)
    ver = verify(args) if args.verify else []
    wall = time.perf_counter() - t0
    table = {
        "format": TABLE_FORMAT,
        "statistic": "fit_bulk(...).ks: one-pass KS distance over the trimmed window, "
        "real Gaussian p x N noise",
        "generator": args.command,
        "revision": rev,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "seed": args.seed,
        "p": list(P_GRID),
        "gamma": list(GAMMAS),
        "alpha": list(ALPHAS),
        "levels": list(LEVELS),
        "samples": [samples_for(p, args.scale) for p in P_GRID],
        "quantiles": sim["quantiles"],
    }
    text = json.dumps(table, separators=(",", ":"))
    # One line per alpha and p: small, and a diff shows what moved.
    text = (
        text.replace('"quantiles":{', '"quantiles":{\n').replace("]],[[", "]],\n[[").replace('],"', '],\n"')
    )
    atomic_write_text(table_path, text + "\n")
    atomic_write_text(out_path, report(args, sim, ver, wall, rev) + "\n")
    print(f"wrote {table_path} ({table_path.stat().st_size} bytes) and {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
