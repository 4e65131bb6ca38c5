"""Data-parallel training on real data: does ``rmtprune train --nproc 2`` follow the one-process run?

For MNIST and Fashion-MNIST, the MLP [784, 1000, 10] is trained for a few epochs with a cut after
every epoch, once in one process and once as 2 DDP ranks (gloo, the CPU), with the same seed and
global batch. Reported per dataset: whether every epoch's per-layer ranks are equal, the largest
per-epoch differences of the training loss and of the val and test accuracy, and the wall time of
each launch. The wall times are for information only: 2 ranks with one thread each on this 2-core
machine, against one process with one thread and with two (the same cores used two ways).

Run: ``python benchmarks/ddp_check.py [--epochs 3] [--datasets mnist,fashion-mnist]``; writes
``benchmarks/results/ddp_check.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _env import git_revision, machine_line
from _report import md_table

from rmtprune._atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "ddp_check"


def _run(args: list[str], threads: int) -> float:
    """Seconds of one ``rmtprune train`` invocation (raises if it fails)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmtprune",
            "train",
            *args,
            "--threads",
            str(threads),
            "--quiet",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise SystemExit(f"rmtprune train failed ({res.returncode}): {res.stderr[-1500:]}")
    return time.perf_counter() - t0


def _compare(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> dict[str, Any]:
    ranks = [{k: v["rank"] for k, v in r["layers"].items()} for r in one]
    ranks2 = [{k: v["rank"] for k, v in r["layers"].items()} for r in two]
    out: dict[str, Any] = {"ranks_equal": ranks == ranks2, "ranks": ranks, "ranks_2proc": ranks2}
    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "test_loss"):
        out[f"max_diff_{key}"] = max(abs(a[key] - b[key]) for a, b in zip(one, two, strict=True))
    out["final_test_acc"] = [one[-1]["test_acc"], two[-1]["test_acc"]]
    return out


def check(dataset: str, epochs: int, work: Path) -> dict[str, Any]:
    common = [
        "--dataset", dataset, "--model", "mlp:1000", "--epochs", str(epochs), "--batch-size", "128",
        "--lr", "0.05", "--lr-schedule", "cosine", "--seed", "0", "--prune-every", "1", "--keep-bulk", "0.45",
    ]  # fmt: skip
    times: dict[str, float] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    arms = (
        ("1 process, 1 thread", [], 1),
        ("2 processes, 1 thread each", ["--nproc", "2"], 1),
        ("1 process, 2 threads", [], 2),
    )
    for name, extra, threads in arms:
        out = work / f"{dataset}-{len(times)}"
        times[name] = _run(["--out", str(out), *common, *extra], threads)
        runs[name] = json.loads((out / "metrics.json").read_text())
        print(f"{dataset}: {name}: {times[name]:.1f} s", flush=True)
    cmp = _compare(runs["1 process, 1 thread"], runs["2 processes, 1 thread each"])
    # The control: the same one-process run with 2 threads sums in another order too.
    control = _compare(runs["1 process, 1 thread"], runs["1 process, 2 threads"])
    return {"dataset": dataset, "epochs": epochs, "seconds": times, **cmp, "control_2_threads": control}


def _row(label: str, cmp: dict[str, Any], seconds: str) -> list[str]:
    """A table row: ``cmp`` (:func:`_compare` against the one-process one-thread run) of one run."""
    return [
        label,
        "yes" if cmp["ranks_equal"] else "NO",
        ", ".join(str(v) for v in cmp["ranks_2proc"][-1].values()),
        f"{cmp['max_diff_train_loss']:.1e}",
        f"{100 * cmp['max_diff_val_acc']:.3f}",
        f"{100 * cmp['max_diff_test_acc']:.3f}",
        f"{100 * cmp['final_test_acc'][0]:.2f} / {100 * cmp['final_test_acc'][1]:.2f}",
        seconds,
    ]


def render(results: list[dict[str, Any]], command: str) -> str:
    rows = []
    for r in results:
        rows.append(_row(f"{r['dataset']}, control: 1 process with 2 threads", r["control_2_threads"], ""))
        rows.append(_row(r["dataset"], r, " / ".join(f"{v:.0f}" for v in r["seconds"].values())))
    table = md_table(
        ["dataset", "ranks equal every epoch", "final ranks (fc1, head)", "max diff train loss",
         "max diff val acc (pp)", "max diff test acc (pp)", "final test acc 1 proc / 2 proc (%)",
         "wall s: 1 proc 1 thr / 2 proc / 1 proc 2 thr"],
        rows,
    )  # fmt: skip
    return "\n".join(
        [
            "# DDP on real data: `rmtprune train --nproc 2` against the one-process run",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine_line()}",
            f"- revision: {git_revision()}",
            f"- command: `{command}`",
            "",
            "MLP [784, 1000, 10], SGD momentum 0.9, lr 0.05, cosine, global batch 128, seed 0, a cut after "
            "every epoch (constant f = 0.45), the default 5,000-image validation split and stability "
            "tracking. The 2-process run is 2 gloo ranks on the CPU, each with half of every global "
            "batch. The differences are the largest over the epochs, against the one-process "
            "one-thread run. The control row is the same one-process run with 2 threads: its sums "
            "run in another order too, so it shows how far float-order differences alone carry "
            "three epochs of training.",
            "",
            table,
            "",
            "The wall times include starting the processes, loading the data and writing the run's "
            "files. This machine has 2 cores shared with other jobs, so they say nothing about scaling; "
            "DDP is for more cores or GPUs than one process uses well.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--datasets", default="mnist,fashion-mnist")
    args = p.parse_args(argv)
    command = (
        "python benchmarks/ddp_check.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    with tempfile.TemporaryDirectory(prefix="ddp_check.") as tmp:
        results = [check(d, args.epochs, Path(tmp)) for d in args.datasets.split(",")]
    text = render(results, command)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    atomic_write_text(RESULTS.with_suffix(".md"), text)
    atomic_write_text(RESULTS.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
