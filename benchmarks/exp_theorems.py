"""Experiment 4: the theorems of METHOD.md section 9, measured on the Fashion-MNIST MLPs of experiment 2.

Reuses the cached runs of ``exp_fashion_mlp.py`` (same flags give the same runs; missing ones are
trained) and measures, per seed:

1. *Randomness over training*: per layer, the bulk fraction ``n_bulk / p``, the fitted ``sigma2``,
   the KS distance to MP and ``n_spikes`` after every epoch (logged by :func:`rmtprune.train`), plus
   epoch 0 (the initialisation, rebuilt from the seed) and the energy in the bulk at init vs the end.
2. *Removing randomness*: on the trained dense (and L1+L2) nets, the smallest fraction ``phi`` of
   each layer's bulk singular values is removed (spikes always kept), ``phi = 0, 0.1, ..., 1``, in
   all fitted layers at once and in each layer alone; train loss (first 10k training images), test
   loss and test accuracy, no fine-tuning.
3. *Adding randomness*: i.i.d. Gaussian noise of variance ``c / N`` (``N`` = larger side) added to
   every weight matrix, several ``c``, 5 draws each; change of loss and accuracy.

Run: ``python benchmarks/exp_theorems.py [--seeds 3] [--epochs 6] [--width 500,500] [--quick]``;
writes ``benchmarks/results/exp_theorems.md`` and three PNGs.
"""

from __future__ import annotations

import copy
from typing import Any

import exp_fashion_mlp as E2
import numpy as np
import torch
from _cli import log, parser_for, setup
from _measure import test_metrics
from _report import dump_json, md_table, new_figure, png_path, save_figure, write_report
from _stats import pm
from torch import nn

from rmtprune.spectral import DEFAULT_KS_MAX, fit_bulk
from rmtprune.zoo.data import load_dataset, seed_everything
from rmtprune.zoo.models import build_model

NAME = "exp_theorems"
PHIS = [round(0.1 * i, 1) for i in range(11)]
NOISE_C = (0.1, 0.3, 1.0, 3.0)
NOISE_DRAWS = 5
SWEEP_ARMS = ("dense", "l1l2")


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def spectrum(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """SVD (float64) and BEMA fit of one weight matrix."""
    W = w.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    fit = fit_bulk(S.numpy(), tuple(W.shape))
    return U, S, Vh, fit


def bulk_energy(S: torch.Tensor, n_spikes: int) -> float:
    e = S.double() ** 2
    return float(e[n_spikes:].sum() / e.sum())


def init_stats(args: Any, seed: int) -> dict[str, dict[str, float]]:
    """Per-layer fit of the initial weights (the model :func:`rmtprune.train` builds for ``seed``)."""
    seed_everything(seed)
    model = build_model(f"mlp:{args.width}", (1, 28, 28), 10)
    out = {}
    for name in linear_layers(model):
        w = model.get_submodule(name).weight
        if min(w.shape) < 10:
            continue
        _, S, _, fit = spectrum(w)
        out[name] = stats_of(fit, S)
    return out


def stats_of(fit: Any, S: torch.Tensor) -> dict[str, float]:
    p = min(fit.shape)
    return {
        "bulk_fraction": fit.n_bulk / p,
        "sigma2": float(fit.sigma2),
        "ks": float(fit.ks),
        "n_spikes": int(fit.n_spikes),
        "bulk_energy": bulk_energy(S, fit.n_spikes),
    }


# ----------------------------------------------------------------------------- removal sweep


@torch.no_grad()
def removal_sweep(model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
    """Loss/accuracy as the smallest fraction phi of the bulk is removed (all fitted layers, each alone)."""
    svds, skipped = {}, {}
    for name in linear_layers(model):
        w = model.get_submodule(name).weight
        if min(w.shape) < 10:
            skipped[name] = f"p={min(w.shape)} < 10"
            continue
        U, S, Vh, fit = spectrum(w)
        if not fit.accepted(DEFAULT_KS_MAX):
            skipped[name] = f"ks={fit.ks:.3f} > {DEFAULT_KS_MAX}"
            continue
        svds[name] = (U, S, Vh, fit.n_spikes, fit.n_bulk)

    def variant(layers: list[str], phi: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        for name in layers:
            U, S, Vh, ns, nb = svds[name]
            k = ns + int(round((1 - phi) * nb))
            W = (U[:, :k] * S[:k]) @ Vh[:k]
            m.get_submodule(name).weight.copy_(W.float())
        return m

    groups = {"all fitted layers": list(svds), **{name: [name] for name in svds}}
    out: dict[str, Any] = {"skipped": skipped, "fitted": {n: [int(v[3]), int(v[4])] for n, v in svds.items()}}
    for label, layers in groups.items():
        rows = []
        for phi in PHIS:
            m = variant(layers, phi)
            tr_loss, tr_acc = test_metrics(m, data["train"])
            te_loss, te_acc = test_metrics(m, data["test"])
            rows.append(
                {"phi": phi, "train_loss": tr_loss, "train_acc": tr_acc, "loss": te_loss, "acc": te_acc}
            )
        out[label] = rows
    return out


@torch.no_grad()
def noise_test(model: nn.Module, data: dict[str, Any], seed: int) -> dict[str, Any]:
    """Loss/accuracy with Gaussian noise of variance c / N added to every weight matrix."""
    base_tr = test_metrics(model, data["train"])
    base_te = test_metrics(model, data["test"])
    gen = torch.Generator().manual_seed(10_000 + seed)
    ratio = {}
    for name in linear_layers(model):
        w = model.get_submodule(name).weight
        if min(w.shape) >= 10:
            _, _, _, fit = spectrum(w)
            ratio[name] = (1.0 / max(w.shape)) / float(fit.sigma2)  # noise variance at c=1 over sigma2
    out: dict[str, Any] = {"base": {"train_loss": base_tr[0], "loss": base_te[0], "acc": base_te[1]}, "c": {}}
    out["ratio_c1_over_sigma2"] = ratio
    for c in NOISE_C:
        draws = []
        for _ in range(NOISE_DRAWS):
            m = copy.deepcopy(model).eval()
            for name in linear_layers(m):
                w = m.get_submodule(name).weight
                N = max(w.shape)
                w.add_(torch.randn(w.shape, generator=gen) * (c / N) ** 0.5)
            tr = test_metrics(m, data["train"])
            te = test_metrics(m, data["test"])
            draws.append({"train_loss": tr[0], "loss": te[0], "acc": te[1]})
        out["c"][c] = draws
    return out


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, seeds=3, epochs=6, name=NAME)
    E2.add_args(parser)
    args = parser.parse_args(argv)
    setup(args, NAME)
    all_runs = E2.runs(args)
    train_ds = load_dataset("fashion-mnist", "train", data_dir=args.data_dir).subset(10_000)
    test_ds = load_dataset("fashion-mnist", "test", data_dir=args.data_dir)
    data = {"train": train_ds, "test": test_ds}

    init = {seed: init_stats(args, seed) for seed in args.seed_list}
    final: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    for arm in SWEEP_ARMS:
        final[arm] = {}
        for r in all_runs[arm]:
            model = r["model"].eval()
            final[arm][r["seed"]] = {}
            for name in linear_layers(model):
                w = model.get_submodule(name).weight
                if min(w.shape) >= 10:
                    _, S, _, fit = spectrum(w)
                    final[arm][r["seed"]][name] = stats_of(fit, S)
    sweeps = {arm: [removal_sweep(r["model"].eval(), data) for r in all_runs[arm]] for arm in SWEEP_ARMS}
    log("removal sweeps done")
    noise = {
        arm: [noise_test(r["model"].eval(), data, r["seed"]) for r in all_runs[arm]] for arm in SWEEP_ARMS
    }
    log("noise tests done")

    trajectories = trajectory_table(all_runs, init)
    dump_json(
        args.out.with_suffix(".json"),
        {"init": init, "final": final, "sweeps": sweeps, "noise": noise, "trajectories": trajectories},
    )
    plot_randomness(args, trajectories)
    plot_sweep(args, sweeps)
    plot_noise(args, noise)
    sections = [
        setup_text(args),
        randomness_section(args, trajectories, init, final),
        sweep_section(sweeps),
        noise_section(noise),
    ]
    write_report(
        args, f"Experiment 4: the theorems on the Fashion-MNIST MLP [784, {args.width}, 10]", sections
    )
    return 0


def trajectory_table(all_runs: dict[str, Any], init: dict[int, Any]) -> dict[str, Any]:
    """arm -> layer -> stat -> array seeds x (epochs + 1), epoch 0 being the initialisation."""
    out: dict[str, Any] = {}
    for arm, runs in all_runs.items():
        # the 10 x 500 logits layer (p = 10) is left out: its "fit" on 10 values is meaningless
        layers = [n for n in runs[0]["metrics"][0]["layers"] if n in init[runs[0]["seed"]] and n != "head"]
        out[arm] = {}
        for name in layers:
            out[arm][name] = {}
            for stat in ("bulk_fraction", "sigma2", "ks", "n_spikes", "rank"):
                rows = []
                for r in runs:
                    first = init[r["seed"]][name]
                    p = None
                    vals = [first.get(stat) if stat != "rank" else None]
                    for m in r["metrics"]:
                        st = m["layers"].get(name, {})
                        if p is None:
                            p = (st.get("n_spikes") or 0) + (st.get("n_bulk") or 0) or None
                        if stat == "bulk_fraction":
                            nb, ns = st.get("n_bulk"), st.get("n_spikes")
                            vals.append(None if nb is None or ns is None else nb / (nb + ns))
                        else:
                            vals.append(st.get(stat))
                    rows.append([np.nan if v is None else float(v) for v in vals])
                out[arm][name][stat] = rows
    return out


def setup_text(args: Any) -> str:
    return (
        "## Setup\n\n"
        f"The runs of experiment 2 (MLP [784, {args.width}, 10] on Fashion-MNIST, SGD momentum 0.9, lr "
        f"{args.lr:g}, "
        f"cosine over {args.epochs} epochs, batch 128; L1+L2 mu = {args.mu:g}; MP pruning "
        f"{E2.schedule_text(args)}), seeds {', '.join(map(str, args.seed_list))}. "
        "BEMA fit with alpha 0.25, beta 0.1 (TW 90%); a layer's bulk 'fits' when KS <= 0.1. The 10 x 500 "
        "logits "
        "layer (p = 10) is too small to fit: it is left out of parts 1 and 2 (it does get noise in part 3). "
        "Epoch 0 is the initial weights, rebuilt with the run's seed exactly as `rmtprune.train` builds "
        "them. "
        "Train loss is measured on the first 10,000 training images, test loss/accuracy on the full test "
        "split."
    )


def _ms(rows: list[list[float]], col: int, fmt: str = "{:.3f}") -> str:
    v = np.array([r[col] for r in rows], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "-"
    s = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{fmt.format(v.mean())} +- {fmt.format(s)}"


def randomness_section(args: Any, traj: dict[str, Any], init: dict[int, Any], final: dict[str, Any]) -> str:
    rows = []
    for arm, layers in traj.items():
        for name, st in layers.items():
            for stat, fmt in (
                ("bulk_fraction", "{:.3f}"),
                ("sigma2", "{:.3g}"),
                ("ks", "{:.3f}"),
                ("n_spikes", "{:.1f}"),
            ):
                rs = st[stat]
                rows.append([E2.ARM_LABEL[arm], name, stat, *[_ms(rs, e, fmt) for e in range(len(rs[0]))]])
    n_ep = len(next(iter(next(iter(traj.values())).values()))["ks"][0])
    table = md_table(["arm", "layer", "stat", *[f"ep {e}" for e in range(n_ep)]], rows)
    erows = []
    seeds = list(init)
    for arm in SWEEP_ARMS:
        for name in [n for n in init[seeds[0]] if n != "head"]:
            e0 = [init[s][name]["bulk_energy"] for s in seeds]
            e1 = [final[arm][s][name]["bulk_energy"] for s in seeds]
            erows.append([E2.ARM_LABEL[arm], name, pm(e0, 100), pm(e1, 100)])
    return (
        "## 1. Randomness over training (mean +- std over seeds)\n\n"
        "For the pruned arms the value at a cut epoch is the fit just before the cut; after a cut the fit "
        "of a "
        "factored layer is the censored BEMA fit of its kept singular values (`rmtprune.plan`).\n\n"
        + table
        + "\n\nEnergy in the bulk, sum of s_i**2 below the MP edge over the total, in %:\n\n"
        + md_table(["arm", "layer", "init", "end of training"], erows)
        + f"\n\nFigure: `{png_path(args, 'randomness').name}`."
    )


def sweep_section(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    parts = [
        "## 2. Removing the bulk (smallest bulk singular values first, spikes kept; no fine-tuning)\n",
    ]
    for arm, per_seed in sweeps.items():
        fitted = per_seed[0]["fitted"]
        skipped = per_seed[0]["skipped"]
        parts.append(
            f"**{E2.ARM_LABEL[arm]}** (seed {0 if per_seed else ''} fits: "
            + ", ".join(f"{n}: {v[0]} spikes / {v[1]} bulk" for n, v in fitted.items())
            + ("; skipped: " + ", ".join(f"{n} ({why})" for n, why in skipped.items()) if skipped else "")
            + ")\n"
        )
        for label in ["all fitted layers", *fitted]:
            if label not in per_seed[0]:
                continue
            rows = []
            for i, phi in enumerate(PHIS):
                recs = [s[label][i] for s in per_seed if label in s]
                base = [s[label][0] for s in per_seed if label in s]
                rows.append(
                    [
                        f"{phi:.1f}",
                        pm([r["train_loss"] for r in recs], 1, 4),
                        pm([r["loss"] for r in recs], 1, 4),
                        pm([r["acc"] for r in recs], 100),
                        pm([r["acc"] - b["acc"] for r, b in zip(recs, base, strict=True)], 100),
                    ]
                )
            mono = all(
                all(
                    s[label][i + 1]["train_loss"] >= s[label][i]["train_loss"] - 1e-12
                    for i in range(len(PHIS) - 1)
                )
                for s in per_seed
                if label in s
            )
            parts.append(
                f"Bulk removed from: {label}. Train loss "
                + ("increases monotonically" if mono else "is not monotone")
                + " in phi for every seed.\n\n"
                + md_table(["phi removed", "train loss", "test loss", "test acc (%)", "delta acc (pp)"], rows)
                + "\n"
            )
    return "\n".join(parts)


def noise_section(noise: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for arm, per_seed in noise.items():
        for c in NOISE_C:
            d_tr = [np.mean([d["train_loss"] for d in s["c"][c]]) - s["base"]["train_loss"] for s in per_seed]
            d_te = [np.mean([d["loss"] for d in s["c"][c]]) - s["base"]["loss"] for s in per_seed]
            d_acc = [np.mean([d["acc"] for d in s["c"][c]]) - s["base"]["acc"] for s in per_seed]
            ratios = per_seed[0]["ratio_c1_over_sigma2"]
            rel = ", ".join(f"{n}: {c * v:.2f}" for n, v in ratios.items())
            rows.append([E2.ARM_LABEL[arm], f"{c:g}", rel, pm(d_tr, 1, 4), pm(d_te, 1, 4), pm(d_acc, 100)])
    return (
        "## 3. Adding randomness: Gaussian noise of variance c / N on every weight matrix\n\n"
        f"N = the larger side of the layer; {NOISE_DRAWS} draws per seed and c, averaged; deltas against "
        "the same "
        "net without noise, then mean +- std over seeds. 'noise var / sigma2' compares the added variance "
        "with "
        "the fitted bulk variance of the trained layer (seed 0).\n\n"
        + md_table(
            [
                "arm",
                "c",
                "noise var / sigma2 (seed 0)",
                "delta train loss",
                "delta test loss",
                "delta test acc (pp)",
            ],
            rows,
        )
    )


def plot_randomness(args: Any, traj: dict[str, Any]) -> None:
    stats = [("bulk_fraction", "bulk fraction n_bulk / p"), ("sigma2", "sigma2 (fitted)"), ("ks", "KS to MP")]
    fig, axes = new_figure(13, 4, ncols=3)
    styles = {"dense": "-", "l1l2": "--", "mp": ":", "mp+l1l2": "-."}
    for j, (stat, label) in enumerate(stats):
        ax = axes[0, j]
        for arm, layers in traj.items():
            for li, (name, st) in enumerate(layers.items()):
                a = np.array(st[stat], dtype=float)
                m = np.nanmean(a, 0)
                ax.plot(
                    range(len(m)),
                    m,
                    styles.get(arm, "-"),
                    color=f"C{li}",
                    marker="o",
                    ms=3,
                    label=f"{arm} {name}",
                )
        ax.set(xlabel="epoch (0 = init)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small")
    save_figure(fig, png_path(args, "randomness"))


def plot_sweep(args: Any, sweeps: dict[str, Any]) -> None:
    fig, axes = new_figure(13, 4, ncols=3)
    for ai, (arm, per_seed) in enumerate(sweeps.items()):
        for li, label in enumerate(["all fitted layers", *per_seed[0]["fitted"]]):
            for j, key in enumerate(("train_loss", "loss", "acc")):
                v = np.array([[r[key] for r in s[label]] for s in per_seed]) * (100 if key == "acc" else 1)
                axes[0, j].plot(
                    PHIS,
                    v.mean(0),
                    ["-", "--"][ai % 2],
                    color=f"C{li}",
                    marker="o",
                    ms=3,
                    label=f"{arm}: {label}",
                )
    for j, t in enumerate(("train loss (10k images)", "test loss", "test accuracy (%)")):
        axes[0, j].set(xlabel="fraction of the bulk removed (phi)", title=t)
        axes[0, j].grid(alpha=0.3)
    axes[0, 0].legend(fontsize="x-small")
    save_figure(fig, png_path(args, "bulk_removal"))


def plot_noise(args: Any, noise: dict[str, Any]) -> None:
    fig, axes = new_figure(9, 3.8, ncols=2)
    for ai, (arm, per_seed) in enumerate(noise.items()):
        for j, key in enumerate(("loss", "acc")):
            d = np.array(
                [[np.mean([x[key] for x in s["c"][c]]) - s["base"][key] for c in NOISE_C] for s in per_seed]
            ) * (100 if key == "acc" else 1)
            axes[0, j].errorbar(
                NOISE_C,
                d.mean(0),
                yerr=d.std(0),
                marker="o",
                capsize=3,
                color=f"C{ai}",
                label=E2.ARM_LABEL[arm],
            )
    axes[0, 0].set(xscale="log", xlabel="c (noise variance c / N)", ylabel="delta test loss")
    axes[0, 1].set(xscale="log", xlabel="c (noise variance c / N)", ylabel="delta test accuracy (pp)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.axhline(0, color="k", lw=0.6)
    axes[0, 0].legend(fontsize="small")
    save_figure(fig, png_path(args, "noise"))


if __name__ == "__main__":
    raise SystemExit(main())
