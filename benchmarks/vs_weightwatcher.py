"""Benchmark: rmtprune's spectral analysis against WeightWatcher's ``analyze(mp_fit=True)``.

Three models: ``rmtprune.zoo.models.MLP(784, [1000], 10)`` and ``rmtprune.zoo.models.CNN()`` (conv 3x3
1->32 and 32->64 with batch norm, fc 3136->128, head 128->10), each trained one epoch on the real
MNIST files, and a synthetic transformer-shaped stack (12 blocks of 4 x 768x768, 768->3072,
3072->768 ``nn.Linear``) whose weights are seeded Gaussian noise plus a known number of planted
rank-one spikes. For each model it times, on the same weights and at the same thread count:

- bare ``torch.linalg.svdvals`` in float64 over every weight matrix, taken in its tall
  orientation (the floor: no analysis can skip the singular values);
- rmtprune's full analysis, :func:`rmtprune.analysis.analyze_tensor` per layer (flatten, finite
  check, float64 ``svdvals``, BEMA fit, KS gate);
- ``weightwatcher.WeightWatcher(model).analyze(mp_fit=True)`` as shipped (SciPy SVD on CPU,
  power-law fit, brute-force MP fit);
- the same WeightWatcher call with its ``svd_vals`` swapped for the float64 torch ``svdvals``
  used above, so the ratio isolates the fitting code from the choice of LAPACK/BLAS;
- WeightWatcher's ``analyze(mp_fit=False)`` (torch SVD swapped in too) to split its time into
  SVD + power-law fit and the MP fit proper.

It then compares the number of spikes per layer (ours vs WeightWatcher's ``num_spikes``, and the
planted count on the synthetic stack) and the fitted noise scales on a common footing (see the
results file for the conversion).

Run from the repository root (needs the ``bench`` extra: ``pip install -e .[bench]``)::

    python benchmarks/vs_weightwatcher.py            # writes benchmarks/results/vs_weightwatcher.md
    python benchmarks/vs_weightwatcher.py --quick    # smaller stack, one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _env import git_revision, versions
from threadpoolctl import threadpool_limits
from torch import nn

from rmtprune._atomic import atomic_write_text
from rmtprune.analysis import LayerAnalysis, analyze_tensor, as_matrix
from rmtprune.zoo.data import load_dataset
from rmtprune.zoo.models import CNN, MLP

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("RMTPRUNE_DATA", REPO.parent / "shared" / "data"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "vs_weightwatcher.md"

#: Packages whose versions the report names.
PACKAGES = ("rmtprune", "torch", "weightwatcher", "numpy", "scipy", "pandas")


# ----------------------------------------------------------------------------- data and models


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, batch: int = 128) -> float:
    """Train with Adam (lr 1e-3) for one epoch over ``x``; returns the training accuracy of the epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(x), generator=gen)
    correct = 0
    model.train()
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        logits = model(x[idx])
        loss = nn.functional.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == y[idx]).sum())
    model.eval()
    return correct / len(x)


class Block(nn.Module):
    """Weights of one transformer block: attention q, k, v, o (d x d) and the MLP (d -> 4d -> d)."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)


class Stack(nn.Module):
    """A transformer-shaped stack of linear layers (weights only; the benchmark never runs it)."""

    def __init__(self, blocks: int, d: int, ff: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, ff) for _ in range(blocks)])


NOISE_STD = 0.02


def planted_stack(
    blocks: int, d: int, ff: int, seed: int, noise: float = NOISE_STD
) -> tuple[Stack, dict[str, int]]:
    """Stack whose every weight is ``noise * N(0, 1)`` plus 0-8 rank-one spikes (seeded).

    Spike ``k`` has strength ``(1.2 + 2.8 u_k) * noise * (sqrt(m) + sqrt(n))`` with ``u_k`` uniform:
    1.2 to 4 times the noise edge, far above the detection (BBP) threshold ``noise * (m n)**0.25``,
    so the planted count is the right answer for any sound edge estimate.
    """
    rng = np.random.default_rng(seed)
    model = Stack(blocks, d, ff)
    planted: dict[str, int] = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            m, n = mod.weight.shape
            r = int(rng.integers(0, 9))
            w = noise * rng.standard_normal((m, n))
            if r:
                u = np.linalg.qr(rng.standard_normal((m, r)))[0]
                v = np.linalg.qr(rng.standard_normal((n, r)))[0]
                theta = (1.2 + 2.8 * rng.random(r)) * noise * (np.sqrt(m) + np.sqrt(n))
                w += (u * theta) @ v.T
            mod.weight.copy_(torch.from_numpy(w))
            planted[name] = r
    return model, planted


def weight_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(module name, weight)`` of every Linear and Conv2d, in module order."""
    return [
        (name, mod.weight.detach())
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
    ]


# ----------------------------------------------------------------------------- the timed contenders


def run_bare_svdvals(layers: list[tuple[str, torch.Tensor]]) -> None:
    """float64 ``torch.linalg.svdvals`` of every weight read as ``out x rest``, tall side first: the floor."""
    for _, w in layers:
        m = as_matrix(w).to(torch.float64)
        torch.linalg.svdvals(m if m.shape[0] >= m.shape[1] else m.T)


def run_ours(layers: list[tuple[str, torch.Tensor]]) -> dict[str, LayerAnalysis]:
    """rmtprune's full per-layer analysis (svdvals + BEMA fit + gate + verdict)."""
    return {name: analyze_tensor(name, w) for name, w in layers}


def _torch_svd_vals(W: np.ndarray, method: Any = None) -> np.ndarray:
    """Stand-in for WeightWatcher's ``svd_vals``: the same float64 torch ``svdvals`` as ours."""
    return torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(W, dtype=np.float64))).numpy()


def run_ww(model: nn.Module, mp_fit: bool, torch_svd: bool) -> Any:
    """``WeightWatcher(model).analyze(mp_fit=...)``; with ``torch_svd`` its SVD is our torch call."""
    import weightwatcher
    import weightwatcher.weightwatcher as wwmod

    original = wwmod.svd_vals
    if torch_svd:
        wwmod.svd_vals = _torch_svd_vals
    try:
        return weightwatcher.WeightWatcher(model=model).analyze(mp_fit=mp_fit, plot=False)
    finally:
        wwmod.svd_vals = original


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn`` once; return (wall seconds, process CPU seconds, result)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


# ----------------------------------------------------------------------------- one model


#: What the two fits are (read from weightwatcher 0.7.7's source: ``WeightWatcher.mp_fit``,
#: ``RMT_Util.fit_density_with_range``, ``resid_mp``, ``conv2D_Wmats``, ``combined_eigenvalues``).
METHOD_NOTES = """\
## How the two analyses differ (facts from the code, not from this run)

- **Matrix of a layer.** Ours: a conv weight is read as `out x (in*kh*kw)`. WeightWatcher: one
  `out x in` slice per kernel position (`kh*kw` slices), the eigenvalues of all slices pooled
  into one ESD; the spike count of a conv layer is over that pool, so it is a different object.
- **Spectrum and SVD.** Ours: `lambda = s**2 / N` from the float64 Gram eigenvalues
  (torch `eigvalsh`). WeightWatcher:
  `s**2` per slice from float64 `scipy.linalg.svd(compute_uv=False)` on CPU (OpenBLAS here;
  torch is used only with CUDA), rescaled to mean 1 before the fit.
- **Scale fit.** Ours (BEMA): least squares through the origin of the middle quantiles (ranks
  `[alpha p, (1 - alpha) p]`, alpha 0.25) against unit MP quantiles; closed form, one pass.
  WeightWatcher: `scipy.optimize.brute` over ~195 values of `sigma` (0.05 to 2 times the scale
  implied by the largest eigenvalue, in steps of 0.01 of it) plus a Nelder-Mead polish
  (`finish=fmin`); every evaluation refits a linear-kernel KDE (bandwidth 0.1) of all the
  eigenvalues on a 1000-point grid and sums squared density residuals.
- **Square layers.** Ours: the same MP fit (gamma = 1). WeightWatcher: the quarter-circle law on
  the singular values, whose support does not move with `sigma`, so `sigma_mp` is not a variance
  there and its scale is not comparable.
- **Edge.** Ours: MP edge `sigma2 (1 + sqrt(gamma))**2` plus the Tracy-Widom margin at level 0.9,
  `0.45 sigma2 N**(-2/3) gamma**(-1/6) (1 + sqrt(gamma))**(4/3)`. WeightWatcher: MP edge
  `sigma_mp**2 (1 + 1/sqrt(Q))**2` plus `sqrt(Q**(-1/2) edge**(2/3) M**(-2/3))`, the square root
  of a TW-sized term: of order `M**(-1/3)`, several times wider than the TW fluctuation
  (about 6x at M = 784).
- **Gate.** Ours: KS distance on the trimmed window, gate 0.1 (verdict `no-mp-bulk`).
  WeightWatcher: no goodness of fit for the MP fit.
- **Extra work.** WeightWatcher also fits a power law to every ESD tail (`alpha`) and computes
  norms, ranks and entropies; ours computes nothing beyond the fit.

Noise scales on a common footing: WeightWatcher's `sigma_mp**2` is the bulk variance in units of
the mean eigenvalue; ours `sigma2 / mean(W**2)` is the same ratio (1 for pure noise, below 1 when
spikes carry energy). On the synthetic stack the true value is `0.02**2 / mean(W**2)`.
"""


CONTENDERS = ("svdvals", "ours", "ww", "ww_torchsvd", "ww_nomp_torchsvd")
LABELS = {
    "svdvals": "bare float64 `torch.linalg.svdvals` (tall side)",
    "ours": "rmtprune `analyze_tensor` per layer",
    "ww": "WeightWatcher `analyze(mp_fit=True)` (its SciPy SVD)",
    "ww_torchsvd": "WeightWatcher `analyze(mp_fit=True)`, torch SVD swapped in",
    "ww_nomp_torchsvd": "WeightWatcher `analyze(mp_fit=False)`, torch SVD swapped in",
}


def bench_model(
    label: str, model: nn.Module, repeats: int, ww_repeats: int, planted: dict[str, int] | None
) -> dict[str, Any]:
    """Time every contender (interleaved, ``repeats`` rounds) and collect the per-layer fits."""
    layers = weight_layers(model)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in CONTENDERS}
    ours: dict[str, LayerAnalysis] = {}
    details = None
    for r in range(max(repeats, ww_repeats)):
        if r < repeats:
            wall, cpu, _ = timed(lambda: run_bare_svdvals(layers))
            times["svdvals"].append((wall, cpu))
            wall, cpu, ours = timed(lambda: run_ours(layers))
            times["ours"].append((wall, cpu))
        if r < ww_repeats:
            for key, mp, tsvd in (
                ("ww", True, False),
                ("ww_torchsvd", True, True),
                ("ww_nomp_torchsvd", False, True),
            ):
                wall, cpu, out = timed(lambda mp=mp, tsvd=tsvd: run_ww(model, mp, tsvd))
                times[key].append((wall, cpu))
                if key == "ww":
                    details = out
        done = ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in times.items() if len(v) > r)
        print(f"[{label}] round {r + 1}: {done}", flush=True)
    return {"label": label, "layers": layers, "times": times, "ours": ours, "ww": details, "planted": planted}


def _median(pairs: list[tuple[float, float]], which: int) -> float:
    return statistics.median(p[which] for p in pairs)


def layer_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer comparison: spikes (ours, WW, planted) and noise scales on a common footing.

    WeightWatcher rescales the eigenvalues ``s**2`` of each layer to mean one before its MP fit,
    so its ``sigma_mp**2`` is the bulk variance in units of the mean eigenvalue. Our ``sigma2`` is
    the per-entry noise variance of ``lambda = s**2 / N``, whose mean is the mean squared weight;
    ``sigma2 / mean(W**2)`` is therefore the same quantity (1 for pure noise, below 1 when spikes
    carry part of the energy).
    """
    details = res["ww"]
    by_name = {str(row["longname"]): row for _, row in details.iterrows()} if details is not None else {}
    rows = []
    for name, w in res["layers"]:
        la = res["ours"][name]
        fit = la.fit
        ms = float((w.double() ** 2).mean())
        ww_row = by_name.get(name)
        rows.append(
            {
                "layer": name,
                "shape": "x".join(str(v) for v in w.shape),
                "planted": None if res["planted"] is None else res["planted"].get(name),
                "true_scale": None if res["planted"] is None else NOISE_STD**2 / ms,
                "ours_verdict": la.verdict,
                "ours_spikes": None if fit is None else fit.n_spikes,
                "ours_scale": None if fit is None else fit.sigma2 / ms,
                "ours_ks": None if fit is None else fit.ks,
                "ww_N_M_rf": None
                if ww_row is None
                else f"{int(ww_row['N'])}x{int(ww_row['M'])}"
                + (f" x{int(ww_row['rf'])}" if ww_row["rf"] > 1 else ""),
                "ww_spikes": None if ww_row is None else int(ww_row["num_spikes"]),
                "ww_scale": None if ww_row is None else float(ww_row["sigma_mp"]) ** 2,
            }
        )
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def speed_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | layers | contender | runs | median wall s | median CPU s | ours faster by (wall) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for res in results:
        t = res["times"]
        ours_wall = _median(t["ours"], 0)
        for key in CONTENDERS:
            if not t[key]:
                continue
            wall, cpu = _median(t[key], 0), _median(t[key], 1)
            ratio = "1 (reference)" if key == "ours" else f"{wall / ours_wall:.2f}x"
            lines.append(
                f"| {res['label']} | {len(res['layers'])} | {LABELS[key]} | {len(t[key])} | {wall:.3f} | "
                f"{cpu:.3f} | {ratio} |"
            )
    return lines


def summary_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | ours / svdvals (wall) | WW / ours (wall) | WW / ours (CPU) | WW(torch SVD) / ours (wall) "
        "| MP fit share of WW(torch SVD) | target WW / ours >= 20x met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        t = res["times"]
        ours, svd = _median(t["ours"], 0), _median(t["svdvals"], 0)
        ww, wwt, nomp = _median(t["ww"], 0), _median(t["ww_torchsvd"], 0), _median(t["ww_nomp_torchsvd"], 0)
        share = max(wwt - nomp, 0.0) / wwt
        cpu_ratio = _median(t["ww"], 1) / _median(t["ours"], 1)
        lines.append(
            f"| {res['label']} | {ours / svd:.2f} | {ww / ours:.1f}x | {cpu_ratio:.1f}x | "
            f"{wwt / ours:.1f}x | {share:.0%} | "
            f"{'yes' if ww / ours >= 20 else 'no'} |"
        )
    return lines


def agreement_summary(res: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    both = [r for r in rows if r["ours_spikes"] is not None and r["ww_spikes"] is not None]
    same = sum(r["ours_spikes"] == r["ww_spikes"] for r in both)
    text = f"{same}/{len(both)} layers with the same spike count"
    if res["planted"] is not None:
        ours_ok = sum(r["ours_spikes"] == r["planted"] for r in both)
        ww_ok = sum(r["ww_spikes"] == r["planted"] for r in both)
        n = len(both)
        text += f"; planted count recovered exactly: ours {ours_ok}/{n}, WeightWatcher {ww_ok}/{n}"
    return text


def layer_table(rows: list[dict[str, Any]], planted: bool) -> list[str]:
    head = "| layer | weight shape | " + ("planted | " if planted else "")
    head += "ours verdict | ours spikes | WW matrices (N x M x slices) | WW spikes | ours sigma2/mean(W^2) "
    head += "| WW sigma_mp^2 | " + ("true noise var/mean(W^2) | " if planted else "") + "ours ks |"
    sep = "|---|---|" + ("---:|" if planted else "") + "---|---:|---|---:|---:|---:|"
    sep += ("---:|" if planted else "") + "---:|"
    lines = [head, sep]
    for r in rows:
        cells = [r["layer"], r["shape"]]
        if planted:
            cells.append(_fmt(r["planted"]))
        cells += [
            r["ours_verdict"],
            _fmt(r["ours_spikes"]),
            _fmt(r["ww_N_M_rf"]),
            _fmt(r["ww_spikes"]),
            _fmt(r["ours_scale"], ".3f"),
            _fmt(r["ww_scale"], ".3f"),
        ]
        if planted:
            cells.append(_fmt(r["true_scale"], ".3f"))
        cells += [_fmt(r["ours_ks"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory holding mnist/ IDX files")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads for every contender")
    parser.add_argument("--repeats", type=int, default=5, help="rounds for svdvals and ours (MNIST models)")
    parser.add_argument("--ww-repeats", type=int, default=2, help="rounds for WeightWatcher (MNIST models)")
    parser.add_argument("--stack-repeats", type=int, default=3, help="rounds for svdvals and ours (stack)")
    parser.add_argument("--stack-ww-repeats", type=int, default=1, help="rounds for WeightWatcher (stack)")
    parser.add_argument("--blocks", type=int, default=12, help="blocks of the synthetic stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2-block stack, 1 repeat, 10k MNIST images")
    parser.add_argument(
        "--models", default="mlp,cnn,stack", help="comma-separated subset of mlp, cnn, stack (default: all)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    args = parser.parse_args(argv)
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    if not wanted or wanted - {"mlp", "cnn", "stack"}:
        parser.error(f"--models={args.models!r}: choose from mlp, cnn, stack")
    if args.quick:
        args.blocks, args.repeats, args.ww_repeats, args.stack_repeats, args.stack_ww_repeats = 2, 1, 1, 1, 1

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = datetime.now(timezone.utc)

    with threadpool_limits(limits=args.threads):
        train = load_dataset("mnist", "train", data_dir=args.data, download=False)
        x, y = train.x, train.y
        if args.quick:
            x, y = x[:10000], y[:10000]
        models: list[tuple[str, nn.Module, dict[str, int] | None]] = []
        builders = (
            ("mlp", "MLP 784-1000-10", lambda: MLP(784, [1000], 10)),
            ("cnn", "CNN conv32-conv64-fc128", lambda: CNN(1, 10, channels=(32, 64), hidden=128)),
        )
        for key, label, build in builders:
            if key not in wanted:
                continue
            torch.manual_seed(args.seed)
            model = build()
            t0 = time.perf_counter()
            acc = train_one_epoch(model, x, y, args.seed)
            print(
                f"trained {label}: 1 epoch, train acc {acc:.3f}, {time.perf_counter() - t0:.1f}s", flush=True
            )
            models.append((f"{label}, MNIST 1 epoch (train acc {acc:.3f})", model, None))
        if "stack" in wanted:
            stack, planted = planted_stack(args.blocks, 768, 3072, args.seed)
            models.append(
                (f"stack {args.blocks} x (4 x 768x768, 768x3072, 3072x768), planted spikes", stack, planted)
            )

        results = []
        for label, model, pl in models:
            if pl is None:
                results.append(bench_model(label, model, args.repeats, args.ww_repeats, pl))
            else:
                results.append(bench_model(label, model, args.stack_repeats, args.stack_ww_repeats, pl))

    cmd = "python benchmarks/vs_weightwatcher.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# rmtprune vs WeightWatcher: spectral analysis time and spike counts",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- revision: {git_revision()}",
        f"- machine: 2 CPU cores, no GPU ({platform.processor() or platform.machine()}); other processes "
        f"shared the CPU during the run; every contender ran with {args.threads} BLAS/torch thread(s)",
        f"- versions: {versions(*PACKAGES)}, Python {platform.python_version()}",
        f"- command: `{cmd}`",
        f"- repeats (interleaved rounds, medians shown): MNIST models: svdvals and ours {args.repeats}, "
        f"WeightWatcher {args.ww_repeats}; stack: svdvals and ours {args.stack_repeats}, WeightWatcher "
        f"{args.stack_ww_repeats}",
        "",
        "## Time",
        "",
        *speed_table(results),
        "",
        *summary_table(results),
        "",
        "## Spikes per layer",
        "",
    ]
    for res in results:
        rows = layer_rows(res)
        lines += [f"### {res['label']}", "", agreement_summary(res, rows) + ".", ""]
        lines += layer_table(rows, res["planted"] is not None)
        lines.append("")
    lines.append(METHOD_NOTES)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
