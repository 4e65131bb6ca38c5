"""Whole-process cost of ``rmtprune analyze FILE.safetensors``: start, read, analyse, write JSON.

On MiniLM-L6 (``~/.cache/rmtprune/real/minilm-l6/model.safetensors``), in one run, interleaved
rounds (medians), every process with the same thread count:

(a) ``python -m rmtprune analyze model.safetensors --json out.json`` as a subprocess (numpy only:
    torch is never imported for a safetensors file);
(b) a subprocess script that loads the same safetensors with torch, builds ``nn.Linear`` modules
    of its 2-D encoder/pooler weights and runs WeightWatcher 0.7.7 ``analyze(mp_fit=True)`` on them;
(c) the bare in-process ``torch.linalg.svdvals`` (float64, tall orientation) of the matrices (a)
    analyses (the floor: no spectral analysis skips the singular values).

Targets: a / b <= 1/20, a / c <= 2. Also: start times (``--version``, ``analyze --help``), at this
revision and, with ``--before REV``, at an older one (its ``src`` extracted with ``git archive``);
``--plots`` cost against the analysis; and the thread settings on a quiet and a busy machine (two
``python -c "while 1: pass"`` burners beside it): one thread per core (``--threads 0``) with
``OMP_WAIT_POLICY=PASSIVE`` (set by the CLI) and ``ACTIVE``, and one thread (``analyze``'s default
since this measurement).

Rerun (about 5-10 min on 2 shared cores)::

    python benchmarks/analyze_start.py --before c0d309a --plots-before 3947878
    # writes benchmarks/results/analyze_start.md/.json; --plots-before: the last matplotlib revision
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import git_revision, versions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "analyze_start.md"
MODEL = Path("~/.cache/rmtprune/real/minilm-l6/model.safetensors").expanduser()
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

WW_SCRIPT = r"""
import logging, sys, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
from safetensors.torch import load_file
import weightwatcher as ww
sd = load_file(sys.argv[1])
layers = []
for name, t in sorted(sd.items()):
    if t.ndim == 2 and t.is_floating_point() and ("encoder" in name or "pooler" in name):
        lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=False)
        lin.weight.data = t.float()
        layers.append(lin)
model = torch.nn.Sequential(*layers)
df = ww.WeightWatcher(model=model).analyze(mp_fit=True)
print(len(df))
"""


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys of the child) of one subprocess run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def env_with(src: Path | None, threads: int | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and k != "OMP_WAIT_POLICY"}
    if threads is not None:
        env.update({k: str(threads) for k in THREAD_VARS})
    if src is not None:
        env["PYTHONPATH"] = str(src)
    env.update(extra)
    return env


def bare_svdvals_seconds(threads: int) -> float:
    """In-process float64 ``svdvals`` of every 2-D/4-D float tensor ``analyze`` fits (p >= 10)."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    mats = []
    for t in load_file(str(MODEL)).values():
        if t.is_floating_point() and t.ndim in (2, 4):
            m = t.reshape(t.shape[0], -1)
            m = m.T if m.shape[0] < m.shape[1] else m
            if min(m.shape) >= 10:
                mats.append(m.contiguous())
    t0 = time.perf_counter()
    for m in mats:
        torch.linalg.svdvals(m.to(torch.float64))
    return time.perf_counter() - t0


def start_times(src: Path | None, rounds: int) -> dict[str, float]:
    out = {}
    for label, argv in (("--version", ["--version"]), ("analyze --help", ["analyze", "--help"])):
        env = env_with(src, 1)
        runs = [run_timed([sys.executable, "-m", "rmtprune", *argv], env)[0] for _ in range(rounds)]
        out[label] = statistics.median(runs)
    return out


def analyze_cmd(out_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rmtprune",
        "analyze",
        str(MODEL),
        "--json",
        str(out_dir / "out.json"),
        "--force",
        "--no-progress",
        *extra,
    ]


def whole_process(args: argparse.Namespace, tmp: Path, before: Path | None) -> dict[str, object]:
    """Interleaved rounds of (a), (b), (c) and (a) at the older revision; medians and ratios."""
    env = env_with(None, args.threads)
    rows: list[dict[str, float]] = []
    for r in range(args.rounds):
        row = {}
        row["a_wall"], row["a_cpu"] = run_timed(analyze_cmd(tmp), env)
        if before is not None:
            row["a_before_wall"], row["a_before_cpu"] = run_timed(
                analyze_cmd(tmp), env_with(before, args.threads)
            )
        if r < args.ww_rounds:  # minutes each: fewer rounds
            row["b_wall"], row["b_cpu"] = run_timed([sys.executable, "-c", WW_SCRIPT, str(MODEL)], env)
        row["c"] = bare_svdvals_seconds(args.threads)
        rows.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    keys = {k for row in rows for k in row}
    med = {k: statistics.median(row[k] for row in rows if k in row) for k in keys}
    ratios = {"a/c": statistics.median(row["a_wall"] / row["c"] for row in rows)}
    with_b = [row for row in rows if "b_wall" in row]
    if with_b:
        ratios["a/b"] = statistics.median(row["a_wall"] / row["b_wall"] for row in with_b)
    return {"rounds": rows, "median": med, "ratios": ratios}


def plots_cost(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """``analyze`` with and without ``--plots`` (interleaved); plot time = the difference.

    With ``--plots-before REV``, the same pair of runs at that revision in each round too (its
    ``src`` on PYTHONPATH), so the before/after ratio comes from the same rounds on the same load.
    """
    revs: list[tuple[str, Path | None]] = [("now", None)]
    if args.plots_before:
        revs.append((args.plots_before, extract(args.plots_before, tmp)))
    out: dict[str, dict] = {label: {"rounds": []} for label, _ in revs}
    for _ in range(args.plot_rounds):
        for label, src in revs:
            env = env_with(src, None)  # the CLI's defaults: one BLAS thread, the plot workers
            shutil.rmtree(tmp / "plots", ignore_errors=True)
            a = run_timed(analyze_cmd(tmp), env)
            p = run_timed(analyze_cmd(tmp, "--plots", str(tmp / "plots")), env)
            row = {"analyze_wall": a[0], "with_plots_wall": p[0], "analyze_cpu": a[1], "with_plots_cpu": p[1]}
            row["plots_over_analysis"] = (p[0] - a[0]) / a[0]
            row["n_plots"] = len(list((tmp / "plots").glob("*.png")))
            out[label]["rounds"].append(row)
            print(f"plots {label}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    for label, _ in revs:
        rows = out[label]["rounds"]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["plots_wall"] = med["with_plots_wall"] - med["analyze_wall"]
        med["n_plots"] = rows[-1]["n_plots"]
        out[label].update(med)
    return out


def plots_table(args: argparse.Namespace, plots: dict[str, object]) -> list[str]:
    """The ``--plots`` section of the report: one row per revision (medians over the rounds)."""
    head = ["revision", "analyze wall s", "with --plots wall s", "plots wall s", "plots / analysis"]
    head += ["plots cpu s", "target", "PNGs"]
    rows = []
    for label, p in plots.items():
        ratio = p["plots_over_analysis"]
        rows.append(
            [
                "this one" if label == "now" else f"at {label}",
                f"{p['analyze_wall']:.2f}",
                f"{p['with_plots_wall']:.2f}",
                f"{p['plots_wall']:.2f}",
                f"{ratio:.2f}",
                f"{p['with_plots_cpu'] - p['analyze_cpu']:.2f}",
                "<= 1.5: " + ("met" if ratio <= 1.5 else "MISSED"),
                str(p["n_plots"]),
            ]
        )
    lines = [
        "",
        "## --plots (CLI defaults: one BLAS thread, one plot worker per core)",
        "",
        f"{args.plot_rounds} interleaved rounds, medians; plots / analysis is the median over the rounds "
        "of (with --plots - without) / without. This revision draws the ESD and summary figures with "
        "Pillow (`_analyze_plots.py`); 3947878 drew them with matplotlib.",
        "",
        table(head, rows),
    ]
    return lines


def thread_table(args: argparse.Namespace, tmp: Path) -> list[dict[str, object]]:
    """One thread per core with PASSIVE and ACTIVE waiting, and one thread (the CLI's default for
    analyze), quiet and with 2 burners."""
    configs = (
        ("--threads 0 (one per core), OMP_WAIT_POLICY=PASSIVE", env_with(None, None), ("--threads", "0")),
        (
            "--threads 0 (one per core), OMP_WAIT_POLICY=ACTIVE",
            env_with(None, None, OMP_WAIT_POLICY="ACTIVE"),
            ("--threads", "0"),
        ),
        ("--threads 1 (the default)", env_with(None, None), ()),
    )
    out = []
    for load in ("quiet", "2 burners"):
        burners = []
        if load != "quiet":
            burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
            time.sleep(1.0)
        try:
            for label, env, extra in configs:
                runs = [run_timed(analyze_cmd(tmp, *extra), env) for _ in range(args.thread_rounds)]
                out.append(
                    {
                        "load": load,
                        "config": label,
                        "wall": statistics.median(r[0] for r in runs),
                        "cpu": statistics.median(r[1] for r in runs),
                    }
                )
                print(
                    f"{load:10s} {label}: {out[-1]['wall']:.2f} s wall, {out[-1]['cpu']:.2f} s cpu",
                    flush=True,
                )
        finally:
            for b in burners:
                b.kill()
                b.wait()
    return out


def extract(rev: str, tmp: Path) -> Path:
    """The ``src`` tree of git revision ``rev`` in ``tmp`` (for PYTHONPATH)."""
    dest = tmp / f"src-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(args: argparse.Namespace, res: dict[str, object]) -> str:
    w = res["whole"]
    med, ratios = w["median"], w["ratios"]
    lines = [
        "# `rmtprune analyze` of a safetensors file, whole process (MiniLM-L6)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPU cores, no GPU, shared with other jobs (times are indicative, "
        f"ratios are of the same rounds); Python {platform.python_version()}, "
        f"{versions('numpy', 'torch', 'safetensors', 'weightwatcher', 'matplotlib')}",
        f"- revision: {git_revision()}" + (f"; before = {args.before}" if args.before else ""),
        f"- command: `{args.command}`",
        f"- model: {MODEL} ({MODEL.stat().st_size / 1e6:.0f} MB)",
        f"- threads for (a), (b), (c): {args.threads}; {args.rounds} interleaved rounds, medians "
        f"((b) in the first {args.ww_rounds}: it takes minutes)",
        "",
        "## Whole process",
        "",
    ]
    rows = [["(a) `rmtprune analyze F --json J` (subprocess)", f"{med['a_wall']:.2f}", f"{med['a_cpu']:.2f}"]]
    if "a_before_wall" in med:
        rows.append(
            [
                f"(a) at {args.before} (torch reader and analysis)",
                f"{med['a_before_wall']:.2f}",
                f"{med['a_before_cpu']:.2f}",
            ]
        )
    if "b_wall" in med:
        rows.append(
            [
                "(b) WeightWatcher 0.7.7 `analyze(mp_fit=True)` script",
                f"{med['b_wall']:.2f}",
                f"{med['b_cpu']:.2f}",
            ]
        )
    rows.append(["(c) bare float64 `svdvals` of the same matrices (in-process)", f"{med['c']:.2f}", "-"])
    lines.append(table(["what", "wall s", "cpu s"], rows))
    lines.append("")
    tgt = []
    if "a/b" in ratios:
        ok = ratios["a/b"] <= 1 / 20
        verdict = "met" if ok else "MISSED"
        tgt.append(f"- a / b = {ratios['a/b']:.3f} (1/{1 / ratios['a/b']:.1f}); target <= 1/20: {verdict}")
    ok = ratios["a/c"] <= 2
    tgt.append(f"- a / c = {ratios['a/c']:.2f}; target <= 2: {'met' if ok else 'MISSED'}")
    lines += tgt + ["", "## Start time (median wall s of a subprocess)", ""]
    st = res["start"]
    head = ["command", "now"] + ([f"at {args.before}"] if "before" in st else [])
    srows = []
    for k in st["now"]:
        srows.append(
            [f"`rmtprune {k}`", f"{st['now'][k]:.2f}"]
            + ([f"{st['before'][k]:.2f}"] if "before" in st else [])
        )
    lines.append(table(head, srows))
    if "plots" in res:
        lines += plots_table(args, res["plots"])
    if "threads" in res:
        lines += ["", "## Threads, quiet and busy (2 CPU burners beside it)", ""]
        lines.append(
            table(
                ["load", "setting", "wall s", "cpu s"],
                [[r["load"], r["config"], f"{r['wall']:.2f}", f"{r['cpu']:.2f}"] for r in res["threads"]],
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads of (a), (b), (c) (default 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plot-rounds", type=int, default=2)
    ap.add_argument("--thread-rounds", type=int, default=2)
    ap.add_argument("--before", metavar="REV", help="also time the CLI of this git revision")
    ap.add_argument("--ww-rounds", type=int, default=1, help="rounds that also run (b), WeightWatcher (1)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--plots-before", metavar="REV", help="also time --plots at this git revision")
    ap.add_argument("--no-threads", action="store_true", help="skip the quiet/busy thread table")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.command = shlex.join(
        ["python", "benchmarks/analyze_start.py", *(argv if argv is not None else sys.argv[1:])]
    )
    res: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        before = extract(args.before, tmp) if args.before else None
        res["start"] = {"now": start_times(None, 5)}
        if before is not None:
            res["start"]["before"] = start_times(before, 5)
        print(res["start"], flush=True)
        res["whole"] = whole_process(args, tmp, before)
        if not args.no_plots:
            res["plots"] = plots_cost(args, tmp)
            print(res["plots"], flush=True)
        if not args.no_threads:
            res["threads"] = thread_table(args, tmp)
    text = report(args, res)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
