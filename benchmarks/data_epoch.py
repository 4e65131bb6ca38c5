"""Is an epoch of the MNIST MLP data-bound? Time data iteration against a full training epoch.

Measures, in one run on MNIST train (60000 images): the first (decode) and second (cached) call
of ``load_dataset``; one epoch of iteration alone with ``FastLoader`` (shuffled, batch 128); one
epoch of SGD training of the MLP [784, 1000, 10] with ``FastLoader``; the same training on
batches gathered beforehand (no data work inside the loop); and, as designs we avoid, one epoch
of iteration with one ``index_select`` per batch and with ``torch.utils.data.DataLoader`` over a
``TensorDataset``.

Run: ``python benchmarks/data_epoch.py [--threads 1,2] [--repeats R]``; writes
``benchmarks/results/data_epoch.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _env import git_revision
from torch import nn

from rmtprune._atomic import atomic_write_text
from rmtprune.zoo.data import FastLoader, clear_cache, load_dataset, seed_everything
from rmtprune.zoo.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "data_epoch.md"


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(ds, bs: int, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """Median seconds of one epoch of each kind of work, at the current torch thread count."""
    gen = seed_everything(0)
    model = build_model("mlp:1000", ds.input_shape, ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def iterate_fast() -> None:
        for _x, _y in FastLoader(ds, bs, shuffle=True, generator=gen):
            pass

    def iterate_per_batch() -> None:  # the naive design: one gather per batch
        perm = torch.randperm(len(ds), generator=gen)
        for s in range(0, len(ds), bs):
            idx = perm[s : s + bs]
            ds.x.index_select(0, idx), ds.y.index_select(0, idx)

    tds = torch.utils.data.TensorDataset(ds.x, ds.y)

    def iterate_dataloader() -> None:
        for _x, _y in torch.utils.data.DataLoader(tds, batch_size=bs, shuffle=True, generator=gen):
            pass

    def train_fast() -> None:
        for x, y in FastLoader(ds, bs, shuffle=True, generator=gen):
            step(x, y)

    pre = [(x.clone(), y.clone()) for x, y in FastLoader(ds, bs, shuffle=True, generator=gen)]

    def train_pregathered() -> None:
        for x, y in pre:
            step(x, y)

    out = {}
    for label, fn in [
        (ITER_FAST, iterate_fast),
        ("iteration only, one index_select per batch", iterate_per_batch),
        ("iteration only, DataLoader(TensorDataset)", iterate_dataloader),
    ]:
        out[label] = statistics.median(_timed(fn) for _ in range(repeats))
    # the two training variants alternate, so drifts in machine load hit both alike
    t_fast, t_pre = [], []
    for _ in range(repeats):
        t_fast.append(_timed(train_fast))
        t_pre.append(_timed(train_pregathered))
    out[TRAIN_FAST], out[TRAIN_PRE] = statistics.median(t_fast), statistics.median(t_pre)
    return out


ITER_FAST = "iteration only, FastLoader"
TRAIN_FAST = "train epoch, FastLoader"
TRAIN_PRE = "train epoch, batches gathered beforehand"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts to try (default 1,2)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each timed epoch (median kept)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    bs = args.batch_size

    clear_cache()
    t_first = _timed(lambda: load_dataset("mnist", "train"))
    t_cached = _timed(lambda: load_dataset("mnist", "train"))
    ds = load_dataset("mnist", "train")

    results = {}
    for th in threads:
        torch.set_num_threads(th)
        results[th] = _measure(ds, bs, args.repeats)

    cmd = "python benchmarks/data_epoch.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = "| what | " + " | ".join(f"{th} thread{'s' * (th > 1)} (s)" for th in threads) + " |"
    lines = [
        "# Data iteration vs. an MNIST MLP epoch",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- revision: {git_revision()}",
        f"- machine: 2 CPU cores, no GPU ({platform.machine()}, torch {torch.__version__}; shared with "
        f"other jobs: load average {os.getloadavg()[0]:.1f} at the end, so absolute times are inflated)",
        f"- command: `{cmd.strip()}` (RMTPRUNE_DATA pointing at the IDX files)",
        f"- MLP [784, 1000, 10], SGD lr 0.01 momentum 0.9, batch {bs}, 60000 images, "
        f"{-(-len(ds) // bs)} steps per epoch; median of {args.repeats} epochs",
        f"- load_dataset('mnist', 'train'): first call {t_first:.2f} s (sha256 + gunzip + normalise), "
        f"second call {t_cached * 1e3:.2f} ms (memory cache)",
        "",
        head,
        "|---|" + "---:|" * len(threads),
    ]
    for label in results[threads[0]]:
        lines.append(f"| {label} | " + " | ".join(f"{results[th][label]:.3f}" for th in threads) + " |")
    lines.append("")
    for th in threads:
        r = results[th]
        lines.append(
            f"- {th} thread(s): FastLoader iteration is {100 * r[ITER_FAST] / r[TRAIN_FAST]:.1f}% of a "
            f"training epoch; training through FastLoader vs. on batches gathered beforehand: "
            f"{100 * (r[TRAIN_FAST] / r[TRAIN_PRE] - 1):+.1f}%."
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
