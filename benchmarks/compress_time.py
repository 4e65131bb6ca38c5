"""Compress time of SmolLM2-135M on this machine, phase by phase (issue 13's target: minutes).

What ``rmtprune compress MODEL_DIR OUT --target 0.8 --calibration TEXT --calibration-samples 128``
does, timed in-process: load the model directory, cut the calibration text into windows of 256
tokens, collect each block layer's input second moment (:func:`rmtprune.calibration.collect`), plan
(the BEMA fits, the whitened SVDs, the generalized-MP edges, the allocation) and apply. The
calibration text is the Python-docs *calibration* split of the real-model harness
(``benchmarks/fetch_real.sh`` caches it); the model is the harness's SmolLM2-135M-Instruct.

Rerun: ``python benchmarks/compress_time.py`` (about 10-15 min on 2 cores); ``--samples 16`` for a
quick look. Writes ``benchmarks/results/compress_time_smollm2.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _real_data as data  # noqa: E402
from _report import machine, md_table  # noqa: E402
from real_models import git_revision  # noqa: E402

import rmtprune  # noqa: E402
from rmtprune._atomic import atomic_write_text  # noqa: E402
from rmtprune.calibration import collect, token_windows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compress_time_smollm2.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--target", type=float, default=0.8, help="fraction of the block weights kept")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results markdown")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rev = git_revision()
    phases: list[tuple[str, float]] = []
    t = time.perf_counter()
    path = data.item_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    phases.append(("load the model directory", time.perf_counter() - t))
    t = time.perf_counter()
    text = "\n\n".join(data.doc_text("calib"))
    batches = token_windows(tok, text, args.samples, args.seq_len)
    phases.append((f"tokenize: {len(batches)} windows of {args.seq_len} tokens", time.perf_counter() - t))
    layers = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    ]
    t = time.perf_counter()
    calib = collect(model, batches, layers=layers, held_out=0.0, progress=True)
    phases.append((f"calibrate: input moments of {len(layers)} layers", time.perf_counter() - t))
    t = time.perf_counter()
    plan = rmtprune.plan(
        model,
        rmtprune.CompressionConfig(target=args.target, include=layers),
        calibration=calib,
        keep_svd=True,
        progress=True,
    )
    phases.append(
        ("plan: BEMA fits, whitened SVDs, generalized-MP edges, allocation", time.perf_counter() - t)
    )
    t = time.perf_counter()
    rmtprune.apply(model, plan, progress=True)
    phases.append(
        (f"apply: {sum(lp.action == 'factor' for lp in plan)} layers factored", time.perf_counter() - t)
    )
    total = sum(s for _, s in phases)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    rows = [[name, f"{s:.1f}", f"{100 * s / total:.0f}%"] for name, s in phases]
    rows.append(["total", f"{total:.1f}", "100%"])
    table = md_table(["phase", "seconds", "share"], rows)
    print(table)
    cmd = "python benchmarks/compress_time.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    head = [
        "# Compress time of SmolLM2-135M with calibration (issue 13)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; git revision {rev}",
        f"- machine: {machine()} (torch threads: {args.threads}; other jobs may have shared it: see the "
        f"notes), Python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `{cmd.strip()}`",
        f"- {args.samples} calibration windows of {args.seq_len} tokens (Python-docs calibration split), "
        f"`target={args.target}` over the {len(layers)} block Linear layers, `allocation='rmt'`, whitened; "
        f"kept {plan.budget['kept']:.4f}; peak resident memory {rss:.2f} GB",
        "",
        table,
        "",
    ]
    atomic_write_text(args.out, "\n".join(head))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
