"""Experiment 1: MNIST MLP [784, 1000, 10], dense vs RMT pruning during training vs post-training compression.

For every seed, with the same optimiser, learning-rate schedule and epochs for every arm:

- **dense**: plain training, no pruning;
- **pruned during training**: :class:`rmtprune.RMTPruner` (through :func:`rmtprune.train`) cuts
  every prunable layer to ``n_spikes + floor(keep_bulk * n_bulk)`` at the scheduled epochs;
- **post-training compression** of the dense net of the same seed with :func:`rmtprune.compress`
  (rule ``bema``; ``keep_bulk`` 0 = the library default, and a few larger values), no fine-tuning;
- **truncation curve**: the dense net's first layer keeps its top k singular triplets (k = 0..100,
  plus a few larger k), the rest of the net untouched; test loss/accuracy per k, with the BEMA
  spike count (the RMT rank) marked.

It also measures the cost of pruning during training: seconds inside the cuts over the run's time.

Run: ``python benchmarks/exp_mnist_mlp.py [--seeds 5] [--epochs 8] [--quick]``; writes
``benchmarks/results/exp_mnist_mlp.md`` and ``exp_mnist_mlp_truncation.png``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from _cache import sgd_config, train_cached
from _cli import log, parser_for, setup
from _measure import clone, layer_rank, module_params, n_params, test_metrics, timed
from _report import dump_json, md_table, new_figure, png_path, save_figure, stability_pointer, write_report
from _stats import ci, equivalent, fmt_int, mean_std, pm
from torch import nn

from rmtprune.spectral import fit_bulk
from rmtprune.training import TrainConfig
from rmtprune.zoo.data import load_dataset

NAME = "exp_mnist_mlp"
# test accuracy just before each cut (bookkeeping only; older TrainConfig versions always did it)
EVAL_BEFORE = {"eval_before_prune": True} if "eval_before_prune" in TrainConfig.__dataclass_fields__ else {}
POST_KEEP_BULK = (0.0, 0.05, 0.1, 0.25, 0.45)
EXTRA_K = (125, 150, 200, 300, 400, 784)


def base_config(args: Any, seed: int) -> dict[str, Any]:
    # the timing of the cuts is measured without the per-epoch spectra
    return sgd_config(args, "mnist", "mlp:1000", seed, track_spectra=False)


# ----------------------------------------------------------------------------- truncation curve


@torch.no_grad()
def truncation_curve(model: nn.Module, test: Any, ks: list[int]) -> dict[str, Any]:
    """Test loss/accuracy when ``fc1`` keeps its top-k singular triplets, for every k in ``ks``.

    Incremental: the pre-activation of rank k is that of rank k-1 plus one rank-one term, so the
    whole curve costs one SVD and one rank-one update per k.
    """
    fc1, head = model.fc1, model.head
    W = fc1.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    x = test.x.flatten(1).double()
    y = test.y
    P = x @ Vh.T  # n x p: coordinates of the inputs on the right singular vectors
    Z = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    H = torch.empty_like(Z)  # buffers reused: no 80 MB allocation per k
    PS = P * S
    b1 = fc1.bias.detach().double()
    Wh, bh = head.weight.detach().double(), head.bias.detach().double()
    want = sorted(set(ks))
    out: dict[int, tuple[float, float]] = {}
    k = 0
    for target in want:
        while k < target:
            Z.addr_(PS[:, k], U[:, k])
            k += 1
        torch.add(Z, b1, out=H).relu_()
        logits = H @ Wh.T + bh
        loss = float(nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).double().mean())
        out[target] = (loss, acc)
    fit = fit_bulk(S.numpy(), tuple(W.shape))
    return {
        "k": want,
        "loss": [out[k][0] for k in want],
        "acc": [out[k][1] for k in want],
        "n_spikes": int(fit.n_spikes),
        "ks": float(fit.ks),
        "sigma2": float(fit.sigma2),
        "p": int(min(W.shape)),
    }


def pruned_arms(args: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, TrainConfig fields) of the pruning-during-training arms."""
    arms = [
        ("const", f"pruned during training, constant f={args.keep_bulk:g}", {"keep_bulk": args.keep_bulk})
    ]
    T = args.epochs if args.decay_T is None else args.decay_T
    if T > 0:
        arms.append(
            (
                "decay",
                f"pruned during training, decay f=max(0,1-e/{T:g})",
                {"keep_bulk": args.keep_bulk, "decay_T": float(T)},
            )
        )
    return arms


#: Paired equivalence margin (pp): an arm "matches dense" when the 90% t interval of its paired
#: difference to dense lies inside +-EQUIV_MARGIN (two one-sided tests at 5%); the same 0.2 pp as the
#: post-training target's tolerated loss.
EQUIV_MARGIN = 0.2


def control_arms(args: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """The controls of the pruned arms (issue 14): fc1 factored at the first cut, optimizer rebuilt,
    removing nothing (``fixed`` rule, full rank, factored
    even though it does not save parameters; later cuts find nothing to cut), and a fixed rank 200.
    A gain of the pruned arms over ``fullrank`` is what removing the noise (and their later
    re-factorisations) adds beyond the first re-parametrisation."""
    return [
        (
            "fullrank",
            "control: fc1 factored at full rank at the first cut (nothing removed)",
            {
                "compression": {
                    "rule": "fixed",
                    "ratio": 1.0,
                    "factor_only_if_smaller": False,
                    "include": ["fc1"],
                }
            },
        ),
        (
            "rank200",
            "control: fc1 cut to a fixed rank 200 at the same cuts",
            {"compression": {"rule": "fixed", "rank": 200, "include": ["fc1"]}},
        ),
    ]


def cut_epochs(args: Any) -> list[int]:
    return list(range(args.prune_start, args.epochs + 1, args.prune_every))


def fc1_params_at_rank(k: int, m: int = 1000, n: int = 784) -> int:
    """Parameters of fc1 stored at rank k (factored if that is smaller, else dense), bias included."""
    return min(k * (m + n), m * n) + m


# ----------------------------------------------------------------------------- the experiment


def post_training(dense: nn.Module, test: Any, keep_bulk: float) -> dict[str, Any]:
    from rmtprune.config import CompressionConfig
    from rmtprune.surgery import compress

    model = clone(dense)
    (model, report), seconds = timed(lambda: compress(model, config=CompressionConfig(keep_bulk=keep_bulk)))
    loss, acc = test_metrics(model, test)
    return {
        "acc": acc,
        "loss": loss,
        "params": n_params(model),
        "fc1_params": module_params(model, "fc1"),
        "fc1_rank": layer_rank(model, "fc1"),
        "head_rank": layer_rank(model, "head"),
        "seconds": seconds,
        "layers": [
            {k: getattr(lp, k) for k in ("name", "action", "rank_before", "rank", "n_spikes", "ks", "reason")}
            for lp in report
        ],
    }


def run(args: Any) -> None:
    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    have_compress = True
    try:
        import rmtprune.surgery  # noqa: F401
    except ImportError:
        have_compress = False
        log("rmtprune.surgery is not available yet: only the dense arm and the truncation curve run")

    per_seed: list[dict[str, Any]] = []
    for seed in args.seed_list:
        rec: dict[str, Any] = {"seed": seed}
        dense_cfg = TrainConfig(**base_config(args, seed), prune=False)
        dense = train_cached(dense_cfg, args, "mnist-mlp-dense", prefix=f"[dense s{seed}] ")
        dm = dense["model"].eval()
        loss, acc = test_metrics(dm, test)
        rec["dense"] = {
            "acc": acc,
            "loss": loss,
            "params": n_params(dm),
            "fc1_params": module_params(dm, "fc1"),
            "timings": dense["timings"],
        }
        ks = list(range(0, 101)) + [k for k in EXTRA_K if k <= 784]
        rec["curve"] = truncation_curve(dm, test, ks)
        log(
            f"[s{seed}] dense acc {100 * acc:.2f}%; fc1 BEMA n_spikes={rec['curve']['n_spikes']} "
            f"ks={rec['curve']['ks']:.3f}"
        )
        if have_compress:
            rec["post"] = {kb: post_training(dm, test, kb) for kb in POST_KEEP_BULK}
            for kb, r in rec["post"].items():
                log(
                    f"[s{seed}] post-training keep_bulk={kb}: acc {100 * r['acc']:.2f}% "
                    f"params {r['params']:,} fc1 rank {r['fc1_rank']}"
                )
            rec["pruned"] = {}
            for key, _label, extra in [*pruned_arms(args), *control_arms(args)]:
                pruned_cfg = TrainConfig(
                    **base_config(args, seed),
                    **EVAL_BEFORE,
                    prune=True,
                    prune_every=args.prune_every,
                    prune_start=args.prune_start,
                    **extra,
                )
                pruned = train_cached(pruned_cfg, args, "mnist-mlp-pruned", prefix=f"[{key} s{seed}] ")
                pm_ = pruned["model"].eval()
                loss, acc = test_metrics(pm_, test)
                rec["pruned"][key] = {
                    "acc": acc,
                    "loss": loss,
                    "params": n_params(pm_),
                    "fc1_params": module_params(pm_, "fc1"),
                    "fc1_rank": layer_rank(pm_, "fc1"),
                    "head_rank": layer_rank(pm_, "head"),
                    "timings": pruned["timings"],
                    "metrics": [{k: v for k, v in row.items() if k != "layers"} for row in pruned["metrics"]],
                    "decisions": pruned["decisions"],
                }
        per_seed.append(rec)
    dump_json(args.out.with_suffix(".json"), per_seed)
    plot_curve(args, per_seed)
    write(args, per_seed, have_compress)


# ----------------------------------------------------------------------------- output


def plot_curve(args: Any, per_seed: list[dict[str, Any]]) -> None:
    fig, axes = new_figure(15, 4.2, ncols=3)
    k = np.array(per_seed[0]["curve"]["k"])
    sel = k <= 100
    acc = np.array([r["curve"]["acc"] for r in per_seed]) * 100
    loss = np.array([r["curve"]["loss"] for r in per_seed])
    dense = np.array([r["dense"]["acc"] for r in per_seed]) * 100
    m, s = acc.mean(0), acc.std(0, ddof=1) if len(per_seed) > 1 else np.zeros(acc.shape[1])
    spikes = [r["curve"]["n_spikes"] for r in per_seed]
    k80 = max(kk for kk in range(0, 785) if C_fc1_kept(kk) <= 0.2)
    for ax in axes[0, :2]:
        ax.plot(k[sel], m[sel], "-", color="C0", label=f"fc1 keeps k (mean +- std, {len(per_seed)} seeds)")
        ax.fill_between(k[sel], (m - s)[sel], (m + s)[sel], color="C0", alpha=0.25)
        ax.axhline(dense.mean(), color="k", lw=0.8, label=f"dense {dense.mean():.2f}%")
        ax.axhline(dense.mean() - 0.2, color="k", lw=0.8, ls="--", label="dense - 0.2 pp")
        for i, sp in enumerate(spikes):
            ax.axvline(
                sp, color="C3", lw=0.8, ls=":", label="BEMA rank (n_spikes), per seed" if i == 0 else None
            )
        ax.axvline(k80, color="C2", lw=0.8, ls="-.", label=f"k={k80}: 80% of fc1's parameters removed")
        ax.set(xlabel="singular values kept in fc1 (k)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].set(ylim=(0, 100), title="MNIST MLP: fc1 truncated to rank k")
    axes[0, 1].set(ylim=(dense.mean() - 1.5, dense.mean() + 0.4), title="zoom near the dense accuracy")
    axes[0, 1].legend(fontsize="small", loc="lower right")
    ax2 = axes[0, 2]
    ax2.plot(k, loss.mean(0), "o-", ms=2, color="C1")
    for sp in spikes:
        ax2.axvline(sp, color="C3", lw=0.8, ls=":")
    ax2.set(xscale="log", yscale="log", xlim=(1, 800), xlabel="k (log)", ylabel="test loss (log)")
    ax2.set_title("test loss vs k, k = 1..784")
    ax2.grid(alpha=0.3)
    save_figure(fig, png_path(args, "truncation"))


def C_fc1_kept(k: int) -> float:  # noqa: N802 - fraction of fc1's parameters kept at rank k
    return fc1_params_at_rank(k) / fc1_params_at_rank(784)


def write(args: Any, per_seed: list[dict[str, Any]], have_compress: bool) -> None:
    dense_acc = [r["dense"]["acc"] for r in per_seed]
    dense_params = per_seed[0]["dense"]["params"]
    fc1_dense = per_seed[0]["dense"]["fc1_params"]
    rows = []

    def add(label: str, key: str, sub: Any = None) -> None:
        recs = [r[key] if sub is None else r[key][sub] for r in per_seed]
        acc = [x["acc"] for x in recs]
        delta = [x["acc"] - d for x, d in zip(recs, dense_acc, strict=False)]
        params = [x["params"] for x in recs]
        fc1 = [x["fc1_params"] / fc1_dense for x in recs]
        ranks = [x.get("fc1_rank") for x in recs]
        rank_txt = (
            "dense"
            if all(v is None for v in ranks)
            else ", ".join("-" if v is None else str(v) for v in ranks)
        )
        rows.append(
            [
                label,
                pm(acc, 100),
                pm(delta, 100, 2),
                fmt_int(np.mean(params)),
                f"{100 * (1 - np.mean(params) / dense_params):.1f}%",
                f"{100 * np.mean(fc1):.1f}%",
                rank_txt,
            ]
        )

    add("dense", "dense")
    if have_compress:
        for key, label, _ in [*pruned_arms(args), *control_arms(args)]:
            if key in per_seed[0]["pruned"]:
                add(label, "pruned", key)
        for kb in POST_KEEP_BULK:
            add(
                f"post-training compress, keep_bulk={kb:g}" + (" (default)" if kb == 0 else ""),
                "post",
                kb,
            )
    table = md_table(
        [
            "arm",
            "test acc (%)",
            "delta vs dense (pp, paired)",
            "params as stored",
            "params removed",
            "fc1 params kept",
            "fc1 rank per seed",
        ],
        rows,
    )
    sections = [
        "## Setup\n\n"
        f"MLP [784, 1000, 10] (ReLU, no activation on the logits) on MNIST, trained on the `train` split "
        f"(55,000 images: the training file minus the fixed 5,000-image validation split)"
        f"{' (QUICK: first 6000 images)' if args.quick else ''}, accuracy on the untouched 10k test split "
        "(read once per reported number; every setting here was fixed before this run, none chosen on it). "
        f"Every arm: SGD (momentum 0.9), lr {args.lr:g}, cosine schedule over {args.epochs} epochs, batch "
        "128, "
        "no weight decay, no L1/L2. Pruning during training: "
        f"`RMTPruner(every={args.prune_every}, start={args.prune_start}, ...)` through `rmtprune.train`, "
        "cuts after "
        f"epochs {', '.join(map(str, cut_epochs(args)))}, each keeping n_spikes + floor(f * n_bulk) "
        "triplets of "
        "every layer whose bulk fits (n_bulk = p - n_spikes of the full layer, so a later cut with the "
        "same f "
        "changes nothing); two schedules: "
        + "; ".join(
            f"{label} (f at the cuts: "
            + ", ".join(
                f"{(max(0.0, 1 - e / extra['decay_T']) if 'decay_T' in extra else extra['keep_bulk']):.2f}"
                for e in cut_epochs(args)
            )
            + ")"
            for _, label, extra in pruned_arms(args)
        )
        + ". BEMA alpha 0.25, beta 0.1, KS gate 0.1; optimizer state of the new factors is rebuilt. "
        "Post-training: `rmtprune.compress(dense, config=CompressionConfig(keep_bulk=...))`, no fine-tuning. "
        "Parameters are counted as stored (factored layers count both factors; biases included). "
        "Deltas are paired per seed (arm minus the dense net of the same seed). Controls (issue 14): "
        + "; ".join(label for _, label, _ in control_arms(args))
        + ": `fullrank` re-parametrises fc1 into two factors and rebuilds the optimizer at the first cut, "
        "as the pruned arms do, and removes nothing; the pruned arms' later cuts (which lower the rank "
        "again and reset the factors' optimizer state) have no counterpart in it, so 'arm - fullrank' "
        "is the noise removal plus those later re-factorisations.",
        "## Results (mean +- std over seeds)\n\n" + table,
    ]
    if have_compress:
        sections.append(overhead_section(per_seed))
        for key, _, _ in pruned_arms(args):
            sections.append(decisions_section(per_seed, key))
    sections.append(curve_section(args, per_seed))
    sections.append(targets_section(per_seed, have_compress))
    sections.append(stability_pointer())
    write_report(args, "Experiment 1: MNIST MLP [784, 1000, 10]", sections)


def overhead_section(per_seed: list[dict[str, Any]]) -> str:
    rows = []
    ratios: dict[str, list[float]] = {}
    for r, key in [(r, key) for key in per_seed[0]["pruned"] for r in per_seed]:
        t = r["pruned"][key]["timings"]
        ratio = t["prune"] / t["total"]
        ratios.setdefault(key, []).append(ratio)
        td = r["dense"]["timings"]
        rows.append(
            [
                f"{key} s{r['seed']}",
                f"{t['train']:.1f}",
                f"{t['prune']:.2f}",
                f"{t['eval']:.1f}",
                f"{t['total']:.1f}",
                f"{100 * ratio:.2f}%",
                f"{td['train']:.1f}",
                f"{td['total']:.1f}",
            ]
        )
    summary = "; ".join(
        f"'{key}' **{100 * mean_std(v)[0]:.2f}% +- {100 * mean_std(v)[1]:.2f}%**" for key, v in ratios.items()
    )
    return (
        "## Cost of pruning during training\n\n"
        "Seconds of the pruned run spent in training steps, inside the cuts (`RMTPruner.prune`: SVD, BEMA "
        "fit, "
        "factoring, optimizer rebuild), in evaluation, and in total (including loading the data), "
        "next to the dense run of the same seed. The machine is shared with other jobs, so absolute "
        "times are noisy; the ratio is within one run.\n\n"
        + md_table(
            [
                "arm, seed",
                "pruned: train s",
                "prune s",
                "eval s",
                "total s",
                "prune / total",
                "dense: train s",
                "dense: total s",
            ],
            rows,
        )
        + f"\n\nPruning overhead (prune s / total s): {summary} of the training run (target <= 5%)."
    )


def decisions_section(per_seed: list[dict[str, Any]], key: str) -> str:
    r = per_seed[0]
    rows = []
    for d in r["pruned"][key]["decisions"]:
        rows.append(
            [
                d.get("epoch"),
                d.get("layer"),
                d.get("action"),
                d.get("rank_before"),
                d.get("rank_after"),
                d.get("n_spikes"),
                d.get("n_bulk"),
                "-" if d.get("ks") is None else f"{d['ks']:.3f}",
                (d.get("reason") or "")[:80],
            ]
        )
    epochs = [
        [
            m["epoch"],
            f"{100 * m['test_acc']:.2f}",
            "-" if m.get("test_acc_before_prune") is None else f"{100 * m['test_acc_before_prune']:.2f}",
            fmt_int(m["params"]),
        ]
        for m in r["pruned"][key]["metrics"]
    ]
    return (
        f"## Pruning decisions during training, arm '{key}' (seed {r['seed']})\n\n"
        + md_table(
            ["epoch", "layer", "action", "rank before", "rank after", "n_spikes", "n_bulk", "ks", "reason"],
            rows,
        )
        + "\n\nPer epoch (seed {}):\n\n".format(r["seed"])
        + md_table(["epoch", "test acc (%)", "test acc before the cut (%)", "params"], epochs)
    )


def curve_section(args: Any, per_seed: list[dict[str, Any]]) -> str:
    k = per_seed[0]["curve"]["k"]
    acc = np.array([r["curve"]["acc"] for r in per_seed]) * 100
    dense = np.array([r["dense"]["acc"] for r in per_seed]) * 100
    show = [0, 1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 87, 90, 100, *EXTRA_K]
    rows = []
    for kk in show:
        if kk not in k:
            continue
        i = k.index(kk)
        d = acc[:, i] - dense
        rows.append(
            [
                kk,
                f"{100 * (1 - C_fc1_kept(kk)):.1f}%",
                pm(acc[:, i] / 100, 100),
                f"{d.mean():+.2f} +- {d.std(ddof=1) if len(d) > 1 else 0:.2f}",
            ]
        )
    spikes = [r["curve"]["n_spikes"] for r in per_seed]
    # smallest k whose accuracy is within 0.2 pp of the dense net, per seed
    k_ok = []
    for r, d in zip(per_seed, dense, strict=False):
        a = np.array(r["curve"]["acc"]) * 100
        k_ok.append(next((kk for kk, v in zip(k, a, strict=False) if v >= d - 0.2), None))
    at_spikes = []
    for r, d in zip(per_seed, dense, strict=False):
        sp = r["curve"]["n_spikes"]
        if sp in k:
            at_spikes.append(r["curve"]["acc"][k.index(sp)] * 100 - d)
    return (
        "## Truncation curve of the first layer\n\n"
        "The dense net of each seed; fc1 (1000 x 784) keeps its top-k singular triplets, every other weight "
        "untouched, no fine-tuning. 'fc1 params removed' counts fc1 stored as two factors at rank k "
        "(k (1000 + 784) + 1000 bias) against the dense 785,000.\n\n"
        + md_table(["k", "fc1 params removed", "test acc (%)", "delta vs dense (pp)"], rows)
        + f"\n\nBEMA rank of fc1 (n_spikes above the MP edge + TW margin) per seed: {spikes}; "
        f"KS of the fit: {[round(r['curve']['ks'], 3) for r in per_seed]}. "
        f"Accuracy at k = n_spikes vs dense: {', '.join(f'{v:+.2f}' for v in at_spikes)} pp. "
        f"Smallest k within 0.2 pp of dense, per seed: {k_ok}. "
        f"Figure: `{png_path(args, 'truncation').name}`."
    )


def targets_section(per_seed: list[dict[str, Any]], have_compress: bool) -> str:
    lines = ["## Against the targets", ""]
    dense_acc = np.array([r["dense"]["acc"] for r in per_seed]) * 100
    dm, ds = dense_acc.mean(), dense_acc.std(ddof=1) if len(dense_acc) > 1 else 0.0
    if have_compress:
        for kb in POST_KEEP_BULK:
            removed = [1 - r["post"][kb]["fc1_params"] / r["dense"]["fc1_params"] for r in per_seed]
            delta = [100 * (r["post"][kb]["acc"] - r["dense"]["acc"]) for r in per_seed]
            ok = min(removed) >= 0.8 and max(-d for d in delta) <= 0.2
            lines.append(
                f"- Post-training compression, keep_bulk={kb:g}: fc1 parameters removed "
                f"{100 * np.mean(removed):.1f}% (min {100 * min(removed):.1f}%), accuracy change "
                f"{np.mean(delta):+.2f} pp (worst {min(delta):+.2f} pp): target (>= 80% removed at <= 0.2 "
                "pp loss, "
                f"every seed) **{'met' if ok else 'not met'}**."
            )
        for key in per_seed[0]["pruned"]:
            pa = np.array([r["pruned"][key]["acc"] for r in per_seed]) * 100
            fewer = 1 - np.mean([r["pruned"][key]["params"] / r["dense"]["params"] for r in per_seed])
            delta = [100 * (r["pruned"][key]["acc"] - r["dense"]["acc"]) for r in per_seed]
            mean, _, lo, hi = ci(delta, 0.90)
            eq = equivalent(delta, EQUIV_MARGIN)
            what = "control" if key in ("fullrank", "rank200") else "target"
            lines.append(
                f"- '{key}': {pa.mean():.2f} +- {pa.std(ddof=1) if len(pa) > 1 else 0:.2f}% vs dense "
                f"{dm:.2f} +- {ds:.2f}%, "
                + (f"{100 * fewer:.1f}% fewer" if fewer >= 0 else f"{-100 * fewer:.1f}% more")
                + " parameters; "
                f"paired difference {mean:+.2f} pp, "
                f"90% CI [{lo:+.2f}, {hi:+.2f}]: "
                + (
                    f"equivalent to dense within +-{EQUIV_MARGIN} pp (TOST, 5%)"
                    if eq
                    else f"not shown equivalent within +-{EQUIV_MARGIN} pp"
                )
                + (
                    f"; {what} (equivalent to dense, >= 50% fewer) "
                    f"**{'met' if eq and fewer >= 0.5 else 'not met'}**"
                    if what == "target"
                    else ""
                )
                + "."
            )
            if what == "control":
                continue
            ratios = [
                r["pruned"][key]["timings"]["prune"] / r["pruned"][key]["timings"]["total"] for r in per_seed
            ]
            lines.append(
                f"- Pruning cost ('{key}'): {100 * np.mean(ratios):.2f}% of the run (max "
                f"{100 * max(ratios):.2f}%): "
                f"target <= 5% **{'met' if max(ratios) <= 0.05 else 'not met'}**."
            )
        if "fullrank" in per_seed[0]["pruned"]:
            lines += [
                "",
                "### What the cut adds beyond the re-parametrisation (arm - full-rank control, paired)",
                "",
            ]
            for key in per_seed[0]["pruned"]:
                if key == "fullrank":
                    continue
                d = [100 * (r["pruned"][key]["acc"] - r["pruned"]["fullrank"]["acc"]) for r in per_seed]
                mean, se, lo, hi = ci(d, 0.95)
                verdict = (
                    "above the control"
                    if lo > 0
                    else "below the control"
                    if hi < 0
                    else "no difference shown"
                )
                lines.append(
                    f"- '{key}' - 'fullrank': {mean:+.2f} pp (SE {se:.2f}; "
                    f"95% CI [{lo:+.2f}, {hi:+.2f}]): {verdict}."
                )
            d = [100 * (r["pruned"]["fullrank"]["acc"] - r["dense"]["acc"]) for r in per_seed]
            mean, se, lo, hi = ci(d, 0.95)
            lines.append(
                f"- 'fullrank' - dense (the re-parametrisation alone): {mean:+.2f} pp (SE {se:.2f}; "
                f"95% CI [{lo:+.2f}, {hi:+.2f}])."
            )
    else:
        lines.append("- `rmtprune.compress` was not available when this ran: pruned arms missing.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__, seeds=5, epochs=8, name=NAME)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, every arm (default 0.05)")
    parser.add_argument("--prune-every", type=int, default=3, help="epochs between cuts (default 3)")
    parser.add_argument("--prune-start", type=int, default=1, help="first cut after this epoch (default 1)")
    parser.add_argument(
        "--keep-bulk", type=float, default=0.45, help="bulk fraction kept by the constant arm (default 0.45)"
    )
    parser.add_argument(
        "--decay-T",
        type=float,
        default=None,
        help="T of the decay arm f(e)=max(0,1-e/T) (default: epochs; 0: no decay arm)",
    )
    args = parser.parse_args(argv)
    setup(args, NAME)
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr={args.lr} must be > 0")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
