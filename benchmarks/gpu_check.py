"""The one prepared GPU check of issue 16: GPU tests, the ViT sparsify benchmark's core, one training run.

For a session lent a GPU (one script, under 10 minutes on an H200), in three parts, each timed on
``--device`` and on the same machine's CPU in the same run, and written to the report as soon as it
is done (a run stopped at its time limit keeps what it finished):

1. ``pytest -m gpu`` (the tests marked ``gpu``: ``compress``/``sparsify``/``train --device cuda``
   end to end, no SVD in half precision); its summary line goes into the report.
2. The core of ``benchmarks/sparsify_vit.py``: the reference ViT
   (``vit:dim=64,depth=4,heads=4,patch=7,mlp_ratio=2``) trained on Fashion-MNIST with that
   script's recipe (Adam 1e-3 cosine, batch 128) on the device, timed per step against the CPU
   (``--cpu-steps`` steps: the CPU's full training time is that per-step time times the steps,
   labelled as extrapolated), then :func:`rmtprune.sparsify` at 50% with ``global``,
   ``rmt-signal`` and ``rmt`` (``sparsify_vit.run_sparse``, its short fine-tune), with and
   without fine-tuning, each on the device and on the CPU from the same trained weights. The
   committed CPU numbers of ``benchmarks/results/sparsify_vit.json`` (1 thread, 2-core box) are
   shown beside them.
3. One DDP-free training run, ``rmtprune train --device DEV`` (``mlp:1000`` on Fashion-MNIST,
   pruning every 2 epochs), as a subprocess on the device and on the CPU: wall time and accuracy.

On the lent machine (no network there; the data travels as a carried ignored folder)::

    mkdir -p runs/data && cp -r ../shared/data/fashion-mnist runs/data/      # here, once
    # device run, carry ["runs/data"], timeout_s 600:
    PYTHONUNBUFFERED=1 PYTHONPATH=src RMTPRUNE_DATA=runs/data python3 benchmarks/gpu_check.py \\
        --device cuda --revision <git short hash> --out $OUT/gpu_check.md

then copy ``gpu_check.md`` and ``.json`` from the returned files into ``benchmarks/results/``. A dry
run on the CPU (``python benchmarks/gpu_check.py --device cpu --quick``, about 2 minutes on 2 cores)
checks the script; it writes ``runs/gpu_check/`` (ignored), labelled as not a GPU result.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparsify_vit as vit  # noqa: E402
from _env import git_revision  # noqa: E402

from rmtprune._atomic import atomic_write_text  # noqa: E402
from rmtprune._format import table  # noqa: E402
from rmtprune.finetune import evaluate  # noqa: E402
from rmtprune.zoo.data import FastLoader, load_dataset  # noqa: E402
from rmtprune.zoo.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMITTED = RESULTS / "sparsify_vit.json"
DATASET = "fashion-mnist"
METHODS = ("global", "rmt-signal", "rmt")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model: nn.Module, data: Any, steps: int, seed: int, device: torch.device) -> float:
    """``sparsify_vit.train_vit``'s recipe (Adam 1e-3, cosine over ``steps``, batch 128) on
    ``device``, with the data held there; returns the seconds of the ``steps`` optimizer steps."""
    loader = FastLoader(data, 128, shuffle=True, generator=torch.Generator().manual_seed(seed), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    done = 0
    _sync(device)
    t0 = time.perf_counter()
    while done < steps:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    _sync(device)
    model.eval()
    return time.perf_counter() - t0


def part_tests(args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess: return code, seconds and the summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs"]
    cmd += ["--continue-on-collection-errors", *args.tests]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}\ntimed out after {args.tests_timeout} s", 124
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln)), "")
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {
        "command": shlex.join(["python", *cmd[1:]]),
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "summary": summary or (lines[-1] if lines else ""),
        "failed": failed[:20],
    }


def part_vit(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train the ViT on the device (and time ``--cpu-steps`` CPU steps), then sparsify it both ways."""
    cpu = torch.device("cpu")
    train_ds = load_dataset(DATASET, "train")
    if args.train_subset:
        train_ds = train_ds.subset(args.train_subset)
    test_ds = load_dataset(DATASET, "test")
    if args.test_subset:
        test_ds = test_ds.subset(args.test_subset)
    steps = args.epochs * math.ceil(len(train_ds) / 128)
    torch.manual_seed(0)
    base = build_model(vit.SPEC, train_ds.input_shape, train_ds.num_classes)
    probe = copy.deepcopy(base)
    _log(f"[vit] training {steps} steps on {device}")
    dev_seconds = _train(base.to(device), train_ds, steps, 0, device)
    cpu_steps = min(args.cpu_steps, steps)
    _log(f"[vit] timing {cpu_steps} training steps on the CPU")
    cpu_seconds = _train(probe, train_ds, cpu_steps, 0, cpu)
    out: dict[str, Any] = {
        "spec": vit.SPEC,
        "dataset": DATASET,
        "train_images": len(train_ds),
        "test_images": len(test_ds),
        "epochs": args.epochs,
        "steps": steps,
        "train_seconds_device": dev_seconds,
        "train_step_ms_device": 1e3 * dev_seconds / steps,
        "cpu_steps": cpu_steps,
        "train_step_ms_cpu": 1e3 * cpu_seconds / cpu_steps,
        "dense_accuracy": evaluate(base, FastLoader(test_ds, 1000, device=device))["accuracy"],
        "sparse": [],
    }
    bench = argparse.Namespace(
        cycles=3, cycle_steps=args.cycle_steps, ft_epochs=args.ft_epochs, ft_lr=3e-4, warmup=0.05
    )
    on = {
        "device": (base, train_ds.to(device), test_ds.to(device)),
        "cpu": (copy.deepcopy(base).to(cpu), train_ds, test_ds),
    }
    for method in args.methods:
        for ft in (False, True):
            for where, (model, data, test) in on.items():
                row = vit.run_sparse(model, method, 0.5, ft, bench, data, FastLoader(test, 1000), 0)
                row["where"] = where
                out["sparse"].append(row)
                _log(
                    f"[vit] {method} ft={ft} {where}: {row['seconds']:.1f} s, accuracy {row['accuracy']:.4f}"
                )
    return out


def part_train(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """``rmtprune train`` as a subprocess on ``device`` and on the CPU: wall time, final accuracy."""
    rows = []
    for label, where in (("device", str(device)), ("cpu", "cpu")):
        out_dir = ROOT / "runs" / "gpu_check" / f"train_{label}"
        cmd = [sys.executable, "-m", "rmtprune", "train", "--dataset", DATASET, "--model", "mlp:1000"]
        cmd += ["--epochs", str(args.train_epochs), "--prune-every", "2", "--seed", "0", "--device", where]
        if args.train_run_subset:
            cmd += ["--train-subset", str(args.train_run_subset)]
        if args.test_subset:
            cmd += ["--test-subset", str(args.test_subset)]
        cmd += ["--out", str(out_dir), "--force", "--no-progress", "--quiet"]
        if label == "cpu":
            cmd += ["--threads", str(args.cpu_threads)]
        _log(f"[train] {label}: {where}")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {
            "where": label,
            "device": where,
            "rc": done.returncode,
            "wall_seconds": seconds,
        }
        row["command"] = shlex.join(["rmtprune", *cmd[3:]])
        if done.returncode != 0:
            row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        else:
            epochs = json.loads((out_dir / "metrics.json").read_text())
            row.update({k: epochs[-1].get(k) for k in ("epoch", "test_acc", "params")})
            row["seconds_train"] = sum(e.get("seconds_train") or 0 for e in epochs)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- report
def _committed() -> dict[str, Any]:
    """The committed CPU numbers of ``sparsify_vit.json`` for Fashion-MNIST (seed 0, 50%), if any."""
    try:
        res = json.loads(COMMITTED.read_text())[DATASET]
    except (OSError, KeyError, ValueError):
        return {}
    rows = {(r["method"], r["ft"]): r for r in res["sparse"] if r["target"] == 0.5 and r["seed"] == 0}
    return {
        "train_seconds": res["dense"].get("train_seconds"),
        "epochs": res["dense"].get("epochs"),
        **{f"{m}/{ft}": rows[(m, ft)] for m, ft in rows},
    }


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _vit_tables(res: dict[str, Any], ref: dict[str, Any]) -> str:
    steps = res["steps"]
    cpu_full = res["train_step_ms_cpu"] * steps / 1e3
    head = ["ViT training", "device", "CPU, same machine", "committed CPU (1 thread, 2-core box)"]
    rows = [
        ["ms per step", _f(res["train_step_ms_device"], ".2f"), _f(res["train_step_ms_cpu"], ".2f"), "-"],
        [
            f"{res['epochs']} epoch(s), {steps} steps, s",
            _f(res["train_seconds_device"]),
            f"{cpu_full:.1f} (extrapolated from {res['cpu_steps']} steps)",
            _f(ref.get("train_seconds")) + f" ({ref.get('epochs')} epochs, 55,000 images)",
        ],
    ]
    out = [table(head, rows, markdown=True), ""]
    out.append(f"Dense test accuracy of the device-trained ViT: {100 * res['dense_accuracy']:.2f}%.")
    head = ["method", "fine-tune", "device s", "CPU s", "CPU / device", "device acc.", "CPU acc."]
    head += ["committed CPU s", "committed acc."]
    rows = []
    by = {(r["method"], r["ft"], r["where"]): r for r in res["sparse"]}
    for m, ft in dict.fromkeys((r["method"], r["ft"]) for r in res["sparse"]):
        d, c, k = by.get((m, ft, "device"), {}), by.get((m, ft, "cpu"), {}), ref.get(f"{m}/{ft}", {})
        ratio = c["seconds"] / d["seconds"] if d and c and d["seconds"] > 0 else None
        rows.append([m, "yes" if ft else "no", _f(d.get("seconds")), _f(c.get("seconds")), _f(ratio, ".2f")])
        rows[-1] += [_f(d.get("accuracy"), ".4f"), _f(c.get("accuracy"), ".4f")]
        rows[-1] += [_f(k.get("seconds")), _f(k.get("accuracy"), ".4f")]
    return "\n".join([*out, "", table(head, rows, markdown=True)])


def _report(args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    lines = [f"# GPU check (issue 16){'' if gpu else ': DRY RUN on the CPU, not a GPU result'}", ""]
    lines += [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- revision: {args.revision}",
        f"- machine: {gpu or 'no GPU'}; {os.cpu_count()} CPU cores ({platform.machine()}), CPU runs on "
        f"{args.cpu_threads} thread(s); torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `{args.command}`",
        "- every time is measured in this run, device and CPU on the same machine, except the "
        "committed column (benchmarks/results/sparsify_vit.json, another machine) and the CPU's "
        "full ViT training (its measured per-step time times the steps)",
        "",
    ]
    t = results.get("tests")
    if t:
        lines += [
            "## 1. Tests marked `gpu`",
            "",
            f"`{t['command']}`: exit {t['rc']}, {t['seconds']:.0f} s",
            "",
        ]
        lines += [f"    {t['summary']}", *[f"    {x}" for x in t["failed"]], ""]
    v = results.get("vit")
    if v:
        lines += [
            f"## 2. ViT sparsify core ({v['spec']}, {v['dataset']}, {v['train_images']:,} training "
            f"images, {v['test_images']:,} test images; sparsity 50%, seed 0)",
            "",
        ]
        lines += [_vit_tables(v, _committed()), ""]
    tr = results.get("train")
    if tr:
        lines += ["## 3. One training run (`rmtprune train`, no DDP)", ""]
        head = ["where", "exit", "wall s", "training s (sum of epochs)", "test acc.", "params", "command"]
        rows = []
        for r in tr:
            params = f"{r['params']:,}" if r.get("params") else r.get("error", "-")
            rows.append([r["where"], r["rc"], _f(r["wall_seconds"]), _f(r.get("seconds_train"))])
            rows[-1] += [_f(r.get("test_acc"), ".4f"), params, f"`{r['command']}`"]
        lines += [table(head, rows, markdown=True), ""]
    return "\n".join(lines)


def _save(args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1))
    atomic_write_text(args.out, _report(args, device, results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check (cuda, cuda:N; cpu: dry run)")
    p.add_argument("--quick", action="store_true", help="a small dry run (2,000 images, 1 epoch)")
    p.add_argument("--out", type=Path, default=None, help="report (.md; .json beside it)")
    p.add_argument("--revision", default=None, help="git revision to report (no git on the GPU machine)")
    p.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1, help="threads of the CPU runs")
    p.add_argument("--parts", default="tests,vit,train", help="which parts to run, in this order")
    p.add_argument("--tests", nargs="+", default=["tests"], help="paths pytest -m gpu collects")
    p.add_argument("--tests-timeout", type=int, default=240)
    p.add_argument("--epochs", type=int, default=15, help="ViT training epochs (sparsify_vit.py: 15)")
    p.add_argument("--train-subset", type=int, default=None, help="ViT: first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="first N test images (ViT and train)")
    p.add_argument("--cpu-steps", type=int, default=100, help="ViT training steps timed on the CPU")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cycle-steps", type=int, default=20, help="sparsify_vit.py's fine-tune: 20 per cycle")
    p.add_argument("--ft-epochs", type=float, default=0.5, help="and 0.5 epochs at the end")
    p.add_argument("--train-epochs", type=int, default=4, help="epochs of the rmtprune train run")
    p.add_argument("--train-run-subset", type=int, default=None, help="its first N training images")
    args = p.parse_args(argv)
    args.command = "python " + shlex.join(
        ["benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.quick:
        args.epochs, args.train_subset, args.test_subset, args.cpu_steps = 1, 2000, 1000, 10
        args.methods, args.cycle_steps, args.ft_epochs = "global,rmt-signal", 5, 0.2
        args.train_epochs, args.train_run_subset, args.tests = 2, 2000, ["tests/test_device.py"]
    args.methods = [m for m in args.methods.split(",") if m]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available (use --device cpu for a dry run)")
    if args.out is None:
        args.out = (
            RESULTS / "gpu_check.md"
            if device.type == "cuda"
            else ROOT / "runs" / "gpu_check" / "gpu_check.md"
        )
    args.revision = args.revision or git_revision()
    torch.set_num_threads(args.cpu_threads)
    data = os.environ.get("RMTPRUNE_DATA") or str(ROOT.parent / "shared" / "data")
    os.environ["RMTPRUNE_DATA"] = str(Path(data).resolve())  # the subprocesses run in the repo root
    results: dict[str, Any] = {"device": str(device), "quick": args.quick}
    t0 = time.perf_counter()
    for part in [x for x in args.parts.split(",") if x]:
        if part == "tests":
            results["tests"] = part_tests(args)
        elif part == "vit":
            results["vit"] = part_vit(args, device)
        elif part == "train":
            results["train"] = part_train(args, device)
        else:
            raise SystemExit(f"--parts: unknown part {part!r} (tests, vit, train)")
        results["seconds"] = time.perf_counter() - t0
        _save(args, device, results)
        _log(f"[{part}] done at {results['seconds']:.0f} s; wrote {args.out}")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
