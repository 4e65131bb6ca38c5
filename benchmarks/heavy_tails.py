"""Heavy-tailed noise: false spikes, planted-spike counts and cost of the noise models of spectral/heavy.py.

For pure i.i.d. noise (Gaussian, uniform, sign, Laplace, Student-t(5), Student-t(3), unit variance times
1.3) at the issue's shapes, the share of seeds with 0 spikes at ``beta = 0.1`` under each noise model
(``mp`` = fit_bulk's TW edge, ``gamma`` = BEMA Algorithm 2, ``resample`` = t-matched simulated nulls,
``auto`` = resample when the tail test fires, else mp); for t(5) and Gaussian noise with planted
spikes at 4, 2, 1.6, 0.6, 0.3 x the BBP threshold, the share of seeds counted exactly 3. The cost of
each model as a ratio to the layer's own ``np.linalg.svd(W, compute_uv=False)`` (same process, one
thread): cold (empty null cache: the first layer of a shape) and warm (cached: the next layers of that
shape). Last, the tail test's verdicts on the layers of MiniLM-L6 and of the cached trained MNIST MLPs.

Rerun: ``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/heavy_tails.py``
(``--seeds 20 --big-seeds 10``; about 40-60 min on one core). Writes
``benchmarks/results/heavy_tails.md`` and ``.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _env import git_revision, machine_line  # noqa: E402
from _measure import median_time  # noqa: E402

from rmtprune._atomic import atomic_write_text  # noqa: E402
from rmtprune._format import table  # noqa: E402
from rmtprune.spectral import fit_bulk, heavy  # noqa: E402
from rmtprune.spectral.heavy import fit_gamma, fit_matrix, fit_resample, tail_test  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "heavy_tails.md"
SIGMA = 1.3
KINDS = ["gaussian", "uniform", "sign", "laplace", "t5", "t3"]
SHAPES = [(100, 2000), (300, 1000), (768, 3072), (3072, 768), (4096, 1024)]
PLANTED_SHAPES = [(4096, 1024), (100, 2000), (3072, 768), (768, 3072)]
STRENGTHS = [4.0, 2.0, 1.6, 0.6, 0.3]
MODELS = ["mp", "gamma", "resample", "auto"]
COST_SHAPES = [(384, 384), (384, 1536), (100, 2000), (768, 3072), (4096, 1024)]


def noise(rng: np.random.Generator, kind: str, m: int, n: int) -> np.ndarray:
    """Unit-variance i.i.d. noise of the given kind."""
    if kind == "gaussian":
        return rng.standard_normal((m, n))
    if kind == "uniform":
        return rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), (m, n))
    if kind == "sign":
        return rng.choice([-1.0, 1.0], (m, n))
    if kind == "laplace":
        return rng.laplace(0.0, 1.0 / math.sqrt(2.0), (m, n))
    if kind == "t5":
        return rng.standard_t(5, (m, n)) / math.sqrt(5.0 / 3.0)
    if kind == "t3":
        return rng.standard_t(3, (m, n)) / math.sqrt(3.0)
    raise ValueError(kind)


def spiked(seed: int, kind: str, shape: tuple[int, int], strengths: list[float]) -> np.ndarray:
    """``SIGMA noise + sum theta_i u_i v_i^T``, theta in units of the BBP threshold ``SIGMA (N p)**0.25``."""
    rng = np.random.default_rng(seed)
    m, n = shape
    W = SIGMA * noise(rng, kind, m, n)
    if strengths:
        r = len(strengths)
        U, _ = np.linalg.qr(rng.standard_normal((m, r)))
        V, _ = np.linalg.qr(rng.standard_normal((n, r)))
        W += (U * (np.asarray(strengths) * SIGMA * (m * n) ** 0.25)) @ V.T
    return W


def counts(W: np.ndarray, s: np.ndarray, beta: float) -> dict[str, int]:
    """Spike counts of every noise model on one matrix."""
    return {model: fit_matrix(W, noise=model, beta=beta, singular_values=s).n_spikes for model in MODELS}


def run_cases(kind: str, shape: tuple[int, int], seeds: int, strengths: list[float], beta: float) -> dict:
    rows = []
    for seed in range(seeds):
        W = spiked(1000 + seed, kind, shape, strengths)
        s = np.linalg.svd(W, compute_uv=False)
        tt = tail_test(W, sigma2=fit_bulk(s, shape).sigma2)
        rows.append({"seed": 1000 + seed, "ratio": tt.ratio, "heavy": tt.heavy, **counts(W, s, beta)})
    want = 3 if strengths else 0
    out = {
        "kind": kind,
        "shape": list(shape),
        "seeds": seeds,
        "strengths": strengths,
        "beta": beta,
        "flagged": sum(r["heavy"] for r in rows),
        "ratio_range": [min(r["ratio"] for r in rows), max(r["ratio"] for r in rows)],
        "rows": rows,
    }
    for model in MODELS:
        out[f"exact_{model}"] = sum(r[model] == want for r in rows) / seeds
    return out


def _clear_caches() -> None:
    for f in (heavy._null_top_t, heavy._null_top_gamma, heavy._gamma_quantiles):
        f.cache_clear()


def cost(shape: tuple[int, int]) -> dict:
    W = spiked(7, "t5", shape, [])
    big = shape[0] * shape[1] > 10**6
    t_svd = median_time(lambda: np.linalg.svd(W, compute_uv=False), 3 if big else 9)
    s = np.linalg.svd(W, compute_uv=False)
    fit_bulk(s, shape)
    t_fit = median_time(lambda: fit_bulk(s, shape), 20)
    t_tail = median_time(lambda: tail_test(W, sigma2=1.69), 3 if big else 9)
    row = {"shape": list(shape), "svd": t_svd, "fit_bulk": t_fit, "tail_test": t_tail}
    for name, fn in (
        ("resample", lambda: fit_resample(W, singular_values=s)),
        ("gamma", lambda: fit_gamma(s, shape)),
    ):
        _clear_caches()
        t0 = time.perf_counter()
        fn()
        row[f"{name}_cold"] = time.perf_counter() - t0
        row[f"{name}_warm"] = median_time(fn, 3 if big else 9)
    return row


def real_layers() -> list[dict]:
    """Tail test (and mp vs auto spike counts) on MiniLM-L6 and the cached trained MNIST MLPs."""
    out = []
    minilm = Path.home() / ".cache" / "rmtprune" / "real" / "minilm-l6" / "model.safetensors"
    sources: list[tuple[str, dict[str, np.ndarray]]] = []
    if minilm.exists():
        from safetensors.numpy import load_file

        sources.append(("MiniLM-L6", load_file(str(minilm))))
    else:
        print(f"missing {minilm}: MiniLM-L6 skipped", file=sys.stderr)
    import torch

    for i, f in enumerate(sorted(glob.glob(str(ROOT / "runs" / "bench-cache" / "mnist-mlp-dense-*.pt")))):
        d = torch.load(f, map_location="cpu", weights_only=False)
        if d["config"].get("model") != "mlp:1000":
            continue
        sd = {k: v.detach().numpy() for k, v in d["model"].state_dict().items()}
        sources.append((f"MNIST MLP 784-1000-10 #{i} ({d['config'].get('epochs')} ep)", sd))
    for model, tensors in sources:
        for name, w in tensors.items():
            if w.ndim != 2 or min(w.shape) < 10:
                continue
            W = w.astype(np.float64)
            s = np.linalg.svd(W, compute_uv=False)
            base = fit_bulk(s, W.shape)
            tt = tail_test(W, sigma2=base.sigma2)
            row = {
                "model": model,
                "layer": name,
                "shape": list(W.shape),
                "ratio": tt.ratio,
                "heavy": tt.heavy,
            }
            row["inv_nu"] = tt.inv_nu
            row["ks"] = base.ks
            row["spikes_mp"] = base.n_spikes
            embed = "embeddings" in name
            row["spikes_auto"] = None if embed else fit_matrix(W, noise="auto", singular_values=s).n_spikes
            out.append(row)
            print(f"  {model} {name} {W.shape} ratio {tt.ratio:.2f} heavy {tt.heavy}", flush=True)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _case_rows(cases: list[dict]) -> list[list]:
    """One table row per noise x shape case (the pure-noise and the planted-spike tables alike)."""
    return [
        [
            r["kind"],
            f"{r['shape'][0]}x{r['shape'][1]}",
            r["seeds"],
            f"{r['flagged']}/{r['seeds']}",
            f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}",
            *(_pct(r[f"exact_{m}"]) for m in MODELS),
        ]
        for r in cases
    ]


def render(res: dict, argv: list[str]) -> str:
    lines = [
        "# Heavy-tailed noise: false spikes, planted spikes and cost per noise model",
        "",
        f"- Date: {res['date']}",
        machine_line(),
        f"- Revision: {git_revision()}",
        "- Rerun: `OMP_NUM_THREADS=1 python benchmarks/heavy_tails.py " + " ".join(argv) + "`",
        f"- Noise: i.i.d. entries of unit variance times {SIGMA}; models: `mp` = `fit_bulk` (TW edge), "
        "`gamma` = `fit_gamma` (BEMA Algorithm 2), `resample` = `fit_resample` (t-matched nulls), `auto` = "
        f"resample when `tail_test` fires, else mp. {heavy.DEFAULT_N_SIM} simulated nulls per edge, seed 0.",
        "",
        "## Pure noise: share of seeds with 0 spikes (beta = 0.1; the requirement is >= 85%)",
        "",
    ]
    head = ["noise", "shape", "seeds", "tail flagged", "ratio range", *MODELS]
    rows = _case_rows(res["pure"])
    lines += [table(head, rows, markdown=True), ""]
    lines += [
        "## Planted spikes at 4, 2, 1.6, 0.6, 0.3 x BBP: share of seeds counted exactly 3 (beta = 0.1)",
        "",
        "(requirement >= 90%)",
        "",
    ]
    rows = _case_rows(res["planted"])
    lines += [table(head, rows, markdown=True), ""]
    lines += [
        "## Cost (t(5) matrix; seconds, and ratio to the layer's own svdvals)",
        "",
        "cold = empty null cache (the first layer of a shape pays the simulations); warm = cached (every",
        "further layer of that shape). tail_test = median + partition of |W|, included in `auto`.",
        "",
    ]
    head = ["shape", "svdvals s", "fit_bulk ms", "tail_test", "resample cold", "resample warm"]
    head += ["gamma cold", "gamma warm"]
    rows = []
    for c in res["cost"]:
        sv = c["svd"]

        def cell(key: str, sv: float = sv, c: dict = c) -> str:
            return f"{c[key]:.3f} s ({c[key] / sv:.2f}x)"

        rows.append(
            [
                f"{c['shape'][0]}x{c['shape'][1]}",
                f"{sv:.3f}",
                f"{1e3 * c['fit_bulk']:.2f}",
                cell("tail_test"),
                cell("resample_cold"),
                cell("resample_warm"),
                cell("gamma_cold"),
                cell("gamma_warm"),
            ]
        )
    lines += [table(head, rows, markdown=True), ""]
    if res["real"]:
        lines += ["## Tail test on trained weights", ""]
        if "real_revision" in res:
            lines += [f"(this section rerun alone with `--real-only` at revision {res['real_revision']})", ""]
        by_model: dict[str, list[dict]] = {}
        for r in res["real"]:
            by_model.setdefault(r["model"], []).append(r)
        head = ["model", "layers", "flagged heavy", "ratio median (min-max)", "spikes mp -> auto (flagged)"]
        rows = []
        for model, rs in by_model.items():
            ratios = [r["ratio"] for r in rs]
            fl = [r for r in rs if r["heavy"] and r["spikes_auto"] is not None]
            rows.append(
                [
                    model,
                    len(rs),
                    sum(r["heavy"] for r in rs),
                    f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                    f"{sum(r['spikes_mp'] for r in fl)} -> {sum(r['spikes_auto'] for r in fl)}",
                ]
            )
        lines += [table(head, rows, markdown=True), ""]
        lines += ["Per layer:", ""]
        head = ["model", "layer", "shape", "ratio", "heavy", "t nu", "ks", "spikes mp", "spikes auto"]
        rows = [
            [
                r["model"],
                r["layer"],
                f"{r['shape'][0]}x{r['shape'][1]}",
                f"{r['ratio']:.2f}",
                "yes" if r["heavy"] else "no",
                f"{1 / r['inv_nu']:.1f}" if r["inv_nu"] > 0 else "-",
                f"{r['ks']:.3f}",
                r["spikes_mp"],
                "-" if r["spikes_auto"] is None else r["spikes_auto"],
            ]
            for r in res["real"]
        ]
        lines += [table(head, rows, markdown=True), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds per case below 10^6 entries (20)")
    ap.add_argument("--big-seeds", type=int, default=10, help="seeds per case at >= 10^6 entries (10)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument(
        "--real-only", action="store_true", help="recompute only the trained-weights section of the JSON"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    res: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "argv": argv}
    res.update(pure=[], planted=[], cost=[], real=[])
    if args.real_only:
        res = json.loads(args.out.with_suffix(".json").read_text())
        argv = res["argv"]
        res["real"] = real_layers()
        res["real_revision"] = f"{git_revision()}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        atomic_write_text(args.out, render(res, argv) + "\n")
        return 0

    def save() -> None:
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        atomic_write_text(args.out, render(res, argv) + "\n")

    def seeds_for(shape: tuple[int, int]) -> int:
        return args.big_seeds if shape[0] * shape[1] >= 10**6 else args.seeds

    def pure(shape: tuple[int, int]) -> None:
        for kind in args.kinds.split(","):
            t0 = time.perf_counter()
            r = run_cases(kind, shape, seeds_for(shape), [], 0.1)
            res["pure"].append(r)
            print(
                kind,
                shape,
                {m: r[f"exact_{m}"] for m in MODELS},
                f"{time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            save()

    for shape in COST_SHAPES:
        res["cost"].append(cost(shape))
        print("cost", res["cost"][-1], flush=True)
    save()
    if not args.skip_real:
        res["real"] = real_layers()
        save()
    small = [sh for sh in SHAPES if sh[0] * sh[1] < 10**6]
    big = [sh for sh in SHAPES if sh[0] * sh[1] >= 10**6]
    for shape in small:
        pure(shape)
    for kind in ("t5", "gaussian"):
        for shape in PLANTED_SHAPES:
            r = run_cases(kind, shape, seeds_for(shape), STRENGTHS, 0.1)
            res["planted"].append(r)
            print("planted", kind, shape, {m: r[f"exact_{m}"] for m in MODELS}, flush=True)
            save()
    for shape in big:
        pure(shape)
    save()
    print(render(res, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
