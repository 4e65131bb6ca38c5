"""Scale benchmark: ``rmtprune analyze`` on a synthetic sharded safetensors checkpoint of >= 4 GB.

Writes a float32 checkpoint in the Hugging Face sharded layout (``model-0000k-of-0000n.safetensors``
plus ``model.safetensors.index.json``) with Llama-style tensor names: a large vocabulary
embedding and LM head, ``--layers`` blocks of attention (q, k, v, o) and MLP (gate, up, down)
matrices, and 1-D norms. Every matrix is seeded Gaussian noise plus a known number of planted
rank-one spikes, so the analysis has a right answer.

Then it runs the real CLI, ``rmtprune analyze DIR --json OUT --no-progress``, as a subprocess and
measures its peak resident set size (``ru_maxrss`` of that child from ``wait4``, plus a poll of
``/proc/PID/status`` that splits anonymous from file-backed memory) and its wall and CPU time.
The baseline, measured in this process on the same tensors loaded one at a time, is bare
float64 ``torch.linalg.svdvals``. Targets (GitHub issue 6): peak RSS <= 3 x the largest tensor
+ 500 MiB; wall time close to the bare ``svdvals`` time.

The default mix is chosen so that the two passes fit in ~15 minutes on 2 shared cores: narrow
matrices (hidden size 1024) cost little SVD time per byte, while the 128256 x 1024 embedding
(501 MiB) sets the memory target.

Run from the repository root::

    python benchmarks/scale.py    # 4.46 GB (4.15 GiB) checkpoint; writes benchmarks/results/scale.md
    python benchmarks/scale.py --layers 2 --vocab 32000 --generate-only --keep   # small smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _env import git_revision, versions
from safetensors import safe_open
from safetensors.torch import save_file

from rmtprune._atomic import atomic_path, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "scale.md"
MIB = 2**20
NOISE_STD = 0.02

#: Packages whose versions the report names.
PACKAGES = ("rmtprune", "torch", "safetensors", "numpy")


@dataclass
class TensorSpec:
    """One tensor of the synthetic checkpoint: name, shape and planted spike count (matrices only)."""

    name: str
    shape: tuple[int, ...]
    spikes: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4


def llama_like_specs(vocab: int, hidden: int, intermediate: int, layers: int, seed: int) -> list[TensorSpec]:
    """Tensor list of a Llama-style decoder (untied head), planted spikes 0-8 per matrix (seeded)."""
    rng = np.random.default_rng(seed)

    def mat(name: str, shape: tuple[int, int]) -> TensorSpec:
        return TensorSpec(name, shape, int(rng.integers(0, 9)))

    specs = [mat("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        specs.append(TensorSpec(f"{pre}.input_layernorm.weight", (hidden,)))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append(mat(f"{pre}.self_attn.{proj}.weight", (hidden, hidden)))
        specs.append(TensorSpec(f"{pre}.post_attention_layernorm.weight", (hidden,)))
        specs.append(mat(f"{pre}.mlp.gate_proj.weight", (intermediate, hidden)))
        specs.append(mat(f"{pre}.mlp.up_proj.weight", (intermediate, hidden)))
        specs.append(mat(f"{pre}.mlp.down_proj.weight", (hidden, intermediate)))
    specs.append(TensorSpec("model.norm.weight", (hidden,)))
    specs.append(mat("lm_head.weight", (vocab, hidden)))
    return specs


def make_tensor(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """Noise ``N(0, 0.02**2)`` plus ``spec.spikes`` rank-one spikes 1.5-4x the noise edge (float32)."""
    if len(spec.shape) == 1:
        return 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
    m, n = spec.shape
    w = NOISE_STD * torch.randn((m, n), generator=gen)
    r = spec.spikes
    if r:
        u = torch.linalg.qr(torch.randn((m, r), generator=gen))[0]
        v = torch.linalg.qr(torch.randn((n, r), generator=gen))[0]
        theta = (1.5 + 2.5 * torch.rand(r, generator=gen)) * NOISE_STD * (m**0.5 + n**0.5)
        w.addmm_(u * theta, v.T)
    return w


def write_checkpoint(specs: list[TensorSpec], directory: Path, shard_bytes: int, seed: int) -> list[Path]:
    """Write ``specs`` as HF-style shards of at most ``shard_bytes`` plus the index json; returns shards."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    paths = []
    for k, group in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {spec.name: make_tensor(spec, gen) for spec in group}
        with atomic_path(directory / fname) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
        weight_map.update({spec.name: fname for spec in group})
        paths.append(directory / fname)
        print(
            f"wrote {fname} ({sum(s.nbytes for s in group) / MIB:.0f} MiB, {len(group)} tensors)", flush=True
        )
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    atomic_write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------- measurements


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of a live process in KiB (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_cli(ckpt: Path, json_out: Path, threads: int, log: Path) -> dict[str, Any]:
    """Run ``rmtprune analyze`` as a child; return rc, wall, CPU, ru_maxrss and polled memory peaks."""
    exe = shutil.which("rmtprune")
    cmd = [exe, "analyze", str(ckpt), "--json", str(json_out), "--no-progress"] if exe else None
    if cmd is None:
        cmd = [sys.executable, "-c", "import sys; from rmtprune.cli import main; sys.exit(main())"]
        cmd += ["analyze", str(ckpt), "--json", str(json_out), "--no-progress"]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()
    with open(log, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)

        def poll() -> None:
            while not done.is_set():
                for key, val in _proc_status(proc.pid).items():
                    if key in peaks:
                        peaks[key] = max(peaks[key], val)
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss_mib": usage.ru_maxrss / 1024,
        "poll_peak_mib": {k: v / 1024 for k, v in peaks.items()},
    }


def bare_svdvals(specs: list[TensorSpec], ckpt: Path) -> dict[str, float]:
    """Load each matrix alone, cast to float64, ``svdvals`` (tall side): summed load, cast, SVD times (s)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    totals = {"load": 0.0, "cast": 0.0, "svdvals": 0.0, "svdvals_cpu": 0.0}
    for spec in specs:
        if len(spec.shape) < 2:
            continue
        t0 = time.perf_counter()
        with safe_open(str(ckpt / index[spec.name]), framework="pt") as f:
            w = f.get_tensor(spec.name)
        t1 = time.perf_counter()
        w64 = w.reshape(w.shape[0], -1).to(torch.float64)
        if w64.shape[0] < w64.shape[1]:
            w64 = w64.T  # the tall orientation, as rmtprune does: same values, LAPACK is faster on it
        t2, c2 = time.perf_counter(), time.process_time()
        torch.linalg.svdvals(w64)
        totals["svdvals"] += time.perf_counter() - t2
        totals["svdvals_cpu"] += time.process_time() - c2
        totals["load"] += t1 - t0
        totals["cast"] += t2 - t1
        del w, w64
    return totals


def read_report(path: Path) -> list[dict[str, Any]]:
    """Per-layer records of the CLI's JSON report (a list, or a dict holding a ``layers`` list)."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        for key in ("layers", "results", "analysis"):
            if isinstance(data.get(key), list):
                return data[key]
        return []
    return data if isinstance(data, list) else []


def spike_check(specs: list[TensorSpec], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Found vs planted spike counts: exact hits, one extra, other misses; verdict counts."""
    planted = {s.name: s.spikes for s in specs if len(s.shape) == 2}
    hits = fitted = extra_one = 0
    verdicts: dict[str, int] = {}
    for rec in records:
        name = rec.get("layer", rec.get("name"))
        verdict = str(rec.get("verdict"))
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        if name in planted and rec.get("n_spikes") is not None:
            fitted += 1
            hits += int(rec["n_spikes"] == planted[name])
            extra_one += int(rec["n_spikes"] == planted[name] + 1)
    return {"hits": hits, "fitted": fitted, "extra_one": extra_one, "verdicts": verdicts}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256, help="rows of the embedding and LM head")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=29, help="decoder blocks")
    parser.add_argument("--shard-mib", type=int, default=1024, help="maximum shard size")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads for the CLI and baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the scratch checkpoint dir")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (its path is printed)")
    parser.add_argument(
        "--ckpt",
        type=Path,
        default=None,
        help="reuse a checkpoint this script wrote with the same options (kept)",
    )
    parser.add_argument("--generate-only", action="store_true", help="write the checkpoint and stop")
    parser.add_argument("--skip-baseline", action="store_true", help="do not time bare svdvals")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    specs = llama_like_specs(args.vocab, args.hidden, args.intermediate, args.layers, args.seed)
    total = sum(s.nbytes for s in specs)
    largest = max(specs, key=lambda s: s.nbytes)
    started = datetime.now(timezone.utc)
    if args.ckpt is not None:
        ckpt, args.keep, gen_s = args.ckpt, True, float("nan")
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        if index["metadata"]["total_size"] != total or set(index["weight_map"]) != {s.name for s in specs}:
            raise SystemExit(f"{ckpt} was not written by this script with these options")
        shards = sorted(set(index["weight_map"].values()))
    else:
        parent = args.workdir or Path(tempfile.gettempdir())
        free = shutil.disk_usage(parent).free
        if free < total * 1.2 + 2**30:
            raise SystemExit(
                f"need ~{total * 1.2 / 2**30:.1f} GiB free under {parent}, have {free / 2**30:.1f} GiB"
            )
        ckpt = Path(tempfile.mkdtemp(prefix="rmtprune-scale-", dir=parent))
    print(
        f"checkpoint {ckpt}: {len(specs)} tensors, {total / 1e9:.2f} GB, "
        f"largest {largest.name} {largest.shape}"
    )
    try:
        if args.ckpt is None:
            t0 = time.perf_counter()
            shards = write_checkpoint(specs, ckpt, args.shard_mib * MIB, args.seed)
            gen_s = time.perf_counter() - t0
            print(f"generated in {gen_s:.0f}s", flush=True)
        if args.generate_only:
            return 0
        json_out = ckpt.parent / (ckpt.name + "-report.json")
        cli = run_cli(ckpt, json_out, args.threads, ckpt.parent / (ckpt.name + "-cli.log"))
        print(f"cli: {cli}", flush=True)
        log_tail = (ckpt.parent / (ckpt.name + "-cli.log")).read_text()[-2000:]
        if cli["rc"] != 0:
            print(log_tail)
            raise SystemExit(f"rmtprune analyze failed with exit code {cli['rc']}")
        records = read_report(json_out)
        check = spike_check(specs, records)
        base = None if args.skip_baseline else bare_svdvals(specs, ckpt)
        print(f"baseline: {base}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            for extra in ("-report.json", "-cli.log"):
                (ckpt.parent / (ckpt.name + extra)).unlink(missing_ok=True)
        else:
            print(f"kept {ckpt}")

    target = 3 * largest.nbytes / MIB + 500
    n_mat = sum(len(s.shape) == 2 for s in specs)
    cmd = "python benchmarks/scale.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    rows = [
        (
            "checkpoint",
            f"{len(shards)} shards, {len(specs)} tensors ({n_mat} matrices), {total / 1e9:.2f} GB float32",
        ),
        (
            "largest tensor",
            f"`{largest.name}` {largest.shape[0]}x{largest.shape[1]}, {largest.nbytes / MIB:.0f} MiB",
        ),
        ("peak RSS of `rmtprune analyze` (ru_maxrss)", f"{cli['maxrss_mib']:.0f} MiB"),
        (
            "  polled peaks: anon / file-backed",
            "{RssAnon:.0f} / {RssFile:.0f} MiB".format(**cli["poll_peak_mib"]),
        ),
        (
            "target: 3 x largest + 500 MiB",
            f"{target:.0f} MiB -> {'met' if cli['maxrss_mib'] <= target else 'NOT met'}",
        ),
        ("peak RSS / largest tensor", f"{cli['maxrss_mib'] / (largest.nbytes / MIB):.2f}"),
        ("wall time of `rmtprune analyze`", f"{cli['wall']:.1f} s (CPU {cli['cpu']:.1f} s)"),
    ]
    if base is not None:
        rows += [
            (
                "bare float64 svdvals, same matrices",
                f"{base['svdvals']:.1f} s (CPU {base['svdvals_cpu']:.1f} s)",
            ),
            ("  + loading / float64 cast", f"{base['load']:.1f} s / {base['cast']:.1f} s"),
            ("analyze wall / svdvals wall", f"{cli['wall'] / base['svdvals']:.2f}"),
            ("analyze CPU / svdvals CPU", f"{cli['cpu'] / base['svdvals_cpu']:.2f}"),
        ]
    rows += [
        ("verdicts", ", ".join(f"{k}: {v}" for k, v in sorted(check["verdicts"].items()))),
        (
            "planted spike count recovered",
            f"exactly: {check['hits']}/{check['fitted']} matrices; one extra (the noise edge eigenvalue "
            f"above the TW 0.9 quantile, expected ~10% of the time at beta=0.1): {check['extra_one']}; "
            f"other: {check['fitted'] - check['hits'] - check['extra_one']}",
        ),
        ("generation time (not part of the benchmark)", "reused (--ckpt)" if args.ckpt else f"{gen_s:.0f} s"),
    ]
    lines = [
        "# Scale: `rmtprune analyze` on a sharded >= 4 GB safetensors checkpoint",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- revision: {git_revision()}",
        "- machine: 2 CPU cores, no GPU; other processes shared the CPU during the run; "
        f"CLI and baseline ran with {args.threads} torch/BLAS thread(s); the checkpoint was in the page "
        "cache",
        f"- versions: {versions(*PACKAGES)}, Python {platform.python_version()}",
        f"- command: `{cmd}`",
        f"- CLI command measured: `rmtprune analyze CKPT_DIR --json REPORT.json --no-progress` "
        f"(OMP/MKL/OPENBLAS_NUM_THREADS={args.threads})",
        f"- model: Llama-style, vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, untied LM head; noise N(0, {NOISE_STD}^2) + 0-8 planted spikes per matrix",
        "- one run of each (the CLI first, then the baseline in this process)",
        "",
        "| quantity | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
