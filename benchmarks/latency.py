"""CPU inference latency of compressed vs dense models, and the cost of compressing them.

Trains the reference MLP ``[784, 1000, 10]`` and CNN (``cnn``: conv 32, 64 + fc 128) on MNIST
briefly, compresses each with the default rule (``bema``, spikes only), and measures in one run:

- median forward latency, dense and compressed, at batch 1 and batch 256 (eval mode, inference
  mode, after warm-up), against the parameter ratio (target at batch 256: latency ratio <= params
  ratio + 0.15);
- the time of ``rmtprune.compress`` (plan + apply) against the bare ``torch.linalg.svd`` time of
  the same layers in the same precision (target <= 1.3x); also the two-pass path ``plan()`` then
  ``apply()`` (singular values first, vectors only for the layers cut), for comparison.

Writes ``benchmarks/results/latency.md``. Rerun: ``python benchmarks/latency.py`` (about 2-4 min
on 2 cores). ``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported: on a shared machine the
default spinning OpenMP threads made LAPACK calls up to 100x slower and the timings meaningless.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _env import git_revision  # noqa: E402
from _measure import latency_ms  # noqa: E402
from torch import nn  # noqa: E402

import rmtprune  # noqa: E402
from rmtprune._atomic import atomic_write_text  # noqa: E402
from rmtprune._format import table as format_table  # noqa: E402
from rmtprune.layers import handler_for  # noqa: E402
from rmtprune.zoo.data import batches, load_dataset  # noqa: E402
from rmtprune.zoo.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "latency.md"


def train(model: nn.Module, data, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches(data, 128, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = 0
    for x, y in batches(data, 1000):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data)


def paired_latency(dense: nn.Module, comp: nn.Module, x: torch.Tensor, repeats: int, rounds: int):
    """Median over interleaved rounds, so load changes on a shared machine hit both models alike."""
    d, c = [], []
    for _ in range(rounds):
        d.append(latency_ms(dense, x, repeats, warmup=max(3, repeats // 10)))
        c.append(latency_ms(comp, x, repeats, warmup=max(3, repeats // 10)))
    return statistics.median(d), statistics.median(c)


def bare_svd_seconds(model: nn.Module, dtype: torch.dtype) -> float:
    """Time of ``torch.linalg.svd`` (thin, with vectors) of every prunable layer's matrix."""
    total = 0.0
    for _, mod in model.named_modules():
        h = handler_for(mod)
        if h is None or h.factored or h.unsupported(mod):
            continue
        W = h.matrix(mod).detach()
        W = W.T if W.shape[0] < W.shape[1] else W  # the faster (tall) orientation, as rmtprune uses
        t0 = time.perf_counter()
        torch.linalg.svd(W.to(dtype), full_matrices=False)  # conversion to float64 included
        total += time.perf_counter() - t0
    return total


def compress_seconds(model: nn.Module) -> tuple[float, float, nn.Module, rmtprune.Plan]:
    """(compress time, plan()+apply() two-pass time, compressed model, report)."""
    m1 = copy.deepcopy(model)
    t0 = time.perf_counter()
    _, report = rmtprune.compress(m1)
    t_one = time.perf_counter() - t0
    m2 = copy.deepcopy(model)
    t0 = time.perf_counter()
    p = rmtprune.plan(m2)
    rmtprune.apply(m2, p)
    t_two = time.perf_counter() - t0
    return t_one, t_two, m1, report


_KERNELS = ("aten::mkldnn_convolution", "aten::thnn_conv2d", "aten::addmm", "aten::mm", "aten::_convolution")


@torch.inference_mode()
def kernel_share(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(ms per forward in conv/linear kernels, ms in everything else), from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    for _ in range(2):
        model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(x)
    kern = other = 0.0
    for ev in prof.key_averages():
        if ev.key in _KERNELS:
            kern += ev.self_cpu_time_total
        elif ev.key.startswith("aten::"):
            other += ev.self_cpu_time_total
    return kern / 3e3, other / 3e3


@torch.inference_mode()
def macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of the prunable (dense or factored) layers, from one forward pass."""
    from rmtprune.surgery import _collect

    total = [0]
    hooks = []
    for e in _collect(model):
        if e.handler is None or e.reason:
            continue
        m, n = e.handler.matrix_shape(e.module)
        k = e.handler.current_rank(e.module)
        w = k * (m + n) if e.handler.factored else m * n

        def hook(_mod, _inp, out, w=w, m=m):
            total[0] += w * (out.numel() // (m * out.shape[0]))

        hooks.append(e.module.register_forward_hook(hook))
    model.eval()
    model(x[:1])
    for h in hooks:
        h.remove()
    return total[0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    ap.add_argument("--cnn-train", type=int, default=20000, help="training images for the CNN (20000)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (median, default 5)")
    ap.add_argument("--cost-rounds", type=int, default=7, help="interleaved compression-cost rounds (7)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--data-dir", default=None, help="folder with mnist/ (default $RMTPRUNE_DATA or ../shared/data)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data_dir = args.data_dir or os.environ.get("RMTPRUNE_DATA") or str(ROOT.parent / "shared" / "data")
    train_ds = load_dataset("mnist", "train", data_dir=data_dir)
    test_ds = load_dataset("mnist", "test", data_dir=data_dir)
    models = {
        "MLP 784-1000-10": (build_model("mlp:1000", train_ds.input_shape, 10), train_ds),
        "CNN conv32-conv64-fc128": (
            build_model("cnn", train_ds.input_shape, 10),
            train_ds.subset(args.cnn_train),
        ),
    }
    rows_lat, rows_cost, rows_layers, rows_kern, rows_acc = [], [], [], [], []
    notes: list[str] = []
    for name, (model, data) in models.items():
        t0 = time.perf_counter()
        train(model, data, args.epochs, 1e-3, seed=0)
        t_train = time.perf_counter() - t0
        acc_dense = accuracy(model, test_ds)

        # interleaved rounds (bare SVD, compress, plan()+apply()) so load changes hit all three alike;
        # ratios are the median of the per-round ratios
        runs = []
        for _ in range(args.cost_rounds):
            t_b = bare_svd_seconds(model, torch.float64)
            runs.append((t_b, *compress_seconds(model)))
        t_svd = statistics.median(r[0] for r in runs)
        t_one = statistics.median(r[1] for r in runs)
        t_two = statistics.median(r[2] for r in runs)
        r_one = statistics.median(r[1] / r[0] for r in runs)
        r_two = statistics.median(r[2] / r[0] for r in runs)
        comp, report = runs[0][3], runs[0][4]
        acc_comp = accuracy(comp, test_ds)
        p_ratio = n_params(comp) / n_params(model)
        rows_cost.append(
            [
                name,
                f"{t_svd:.3f}",
                f"{t_one:.3f}",
                f"{r_one:.2f}x",
                f"{t_two:.3f}",
                f"{r_two:.2f}x",
            ]
        )
        for lp in report:
            if lp.action != "skip":
                rows_layers.append(
                    [
                        name,
                        lp.name,
                        f"{lp.matrix_shape[0]}x{lp.matrix_shape[1]}",
                        lp.action,
                        f"{lp.rank_before} -> {lp.rank}",
                        str(lp.n_spikes),
                        "" if lp.ks is None else f"{lp.ks:.3f}",
                    ]
                )
        m_ratio = macs(comp, test_ds.x) / macs(model, test_ds.x)
        for batch, repeats in ((1, 200), (256, 20)):
            x = test_ds.x[:batch]
            ld, lc = paired_latency(model, comp, x, repeats, args.rounds)
            ok = lc / ld <= p_ratio + 0.15
            rows_lat.append(
                [
                    name,
                    str(batch),
                    f"{n_params(model):,} -> {n_params(comp):,}",
                    f"{p_ratio:.3f}",
                    f"{m_ratio:.3f}",
                    f"{ld:.3f}",
                    f"{lc:.3f}",
                    f"{lc / ld:.3f}",
                    ("yes" if ok else "NO") if batch == 256 else "-",
                ]
            )
        x = test_ds.x[:256]
        shares = [(kernel_share(model, x), kernel_share(comp, x)) for _ in range(3)]
        kd, od = (statistics.median(sh[0][i] for sh in shares) for i in (0, 1))
        kc, oc = (statistics.median(sh[1][i] for sh in shares) for i in (0, 1))
        rows_kern.append([name, f"{kd:.1f}", f"{kc:.1f}", f"{kc / kd:.3f}", f"{od:.1f}", f"{oc:.1f}"])
        rest = od / (kd + od)
        if lc / ld > p_ratio + 0.15:
            notes.append(
                f"{name}: latency target missed at batch 256 ({lc / ld:.2f} > {p_ratio:.2f} + 0.15). "
                f"Operations rank pruning cannot shrink (pooling, batch norm, activations on full-size "
                f"feature maps) take {rest:.0%} of the dense forward, so even free conv/linear layers "
                f"could not bring the ratio below ~{rest:.2f}; the parameters sit in fc1 (little compute) "
                f"while the time sits in the convolutions and pooling. The conv/linear kernels themselves "
                f"went to {kc / kd:.2f}x (MACs ratio {m_ratio:.2f}: the first conv, 32x9, is too small "
                f"to cut and a rank-4 conv runs below the kernels' peak efficiency)."
            )
        if r_one > 1.3:
            notes.append(
                f"{name}: compress took {r_one:.2f}x the bare SVD time (target 1.3x): the SVDs total only "
                f"{1e3 * t_svd:.0f} ms, and the fixed per-layer work (float64 copy, finiteness check, "
                f"BEMA fit, module construction) adds {1e3 * (t_one - t_svd):.0f} ms."
            )
        rows_acc.append([name, f"{t_train:.0f}", f"{acc_dense:.4f}", f"{acc_comp:.4f}"])
        print(
            f"{name}: accuracy dense {acc_dense:.4f} -> compressed {acc_comp:.4f}, params ratio {p_ratio:.3f}"
        )

    lat = format_table(
        [
            "model",
            "batch",
            "params dense -> comp.",
            "params ratio",
            "MACs ratio (prunable layers)",
            "dense ms",
            "comp. ms",
            "latency ratio",
            "<= params ratio + 0.15",
        ],
        rows_lat,
        markdown=True,
    )
    kern = format_table(
        [
            "model",
            "conv/linear kernels dense ms",
            "comp. ms",
            "ratio",
            "other ops (pool, BN, ReLU, ...) dense ms",
            "comp. ms",
        ],
        rows_kern,
        markdown=True,
    )
    acc = format_table(
        ["model", "train s", "test acc. dense", "test acc. compressed (no fine-tuning)"],
        rows_acc,
        markdown=True,
    )
    cost = format_table(
        ["model", "bare SVD s", "compress s", "ratio", "plan()+apply() s", "ratio"], rows_cost, markdown=True
    )
    layers = format_table(
        ["model", "layer", "matrix", "action", "rank", "spikes", "ks"], rows_layers, markdown=True
    )
    print(lat, kern, cost, layers, acc, sep="\n\n")
    cmd = "python " + shlex.join(["benchmarks/latency.py", *(sys.argv[1:] if argv is None else argv)])
    cpu = platform.processor() or platform.machine()
    omp = os.environ.get("OMP_WAIT_POLICY")
    text = f"""# Latency and compression cost of low-rank layers

- date: {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- revision: {git_revision()}
- machine: 2 CPU cores, no GPU (shared with other jobs while measuring); {cpu}
- torch {torch.__version__}, {args.threads} thread(s), OMP_WAIT_POLICY={omp}, rmtprune {rmtprune.__version__}
- command: `{cmd}`
- models trained {args.epochs} epoch(s) on MNIST (Adam 1e-3, batch 128; CNN on the first
  {args.cnn_train} images), then compressed with the default config (`bema`, keep_bulk=0,
  ks_max=0.1), no fine-tuning.
- latency: median of {args.rounds} interleaved rounds, each the median of 200 (batch 1) or 20
  (batch 256) forward passes after warm-up, eval + inference mode. Ratios are compressed / dense in
  the same run.
- compression cost: {args.cost_rounds} interleaved rounds (bare SVD, `compress`, `plan()+apply()`),
  medians of the times and of the per-round ratios; bare SVD = `torch.linalg.svd(W, full_matrices=False)` in
  float64 (conversion included) of every prunable layer, in its faster (tall) orientation as
  rmtprune computes it (the decomposition rank pruning cannot avoid); `compress` = plan
  (one SVD per layer, top-k triplets kept for the layers it cuts) + apply; `plan()+apply()` =
  svdvals first, then the SVD again for the layers cut.

## Inference latency

{lat}

## Where the time goes at batch 256 (torch profiler, self CPU time per forward)

{kern}

## Plan + apply time vs bare SVD

{cost}

## Ranks chosen by the default rule

{layers}

## Findings

{chr(10).join("- " + n for n in notes) if notes else "- all targets met"}

## Accuracy (context only: the default rule keeps spikes only, and nothing is fine-tuned)

{acc}
"""
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
