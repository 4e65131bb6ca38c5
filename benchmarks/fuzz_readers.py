"""Mutation fuzzing of rmtprune's file readers: outcome counts per reader, before vs after a change.

Runs the mutation families of ``tests/test_fuzz_readers.py`` (the same engine, seeds and case
numbering) against whichever ``rmtprune`` is first on ``sys.path``, N inputs per reader, and
prints per reader: inputs tried, loaded, clean error (an ``RmtpruneError``), crash (any other
exception), hang (more than 2 s for one input) and huge allocation (an allocation refused under a
3 GiB address-space cap above the start).

    python benchmarks/fuzz_readers.py                       # the installed rmtprune, 2000 per reader
    python benchmarks/fuzz_readers.py --compare 77f9c77     # that revision vs this tree; writes
                                                            # benchmarks/results/fuzz_readers.md
    python benchmarks/fuzz_readers.py --reader idx --seed 0 --case 17 -v   # reproduce one case

``--compare`` checks the revision out in a temporary git worktree and runs this script once with
``PYTHONPATH=<worktree>/src`` and once with this tree's ``src`` (separate processes), then removes
the worktree.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _env import git_revision, machine_line  # noqa: E402


def _engine():
    """``tests/test_fuzz_readers.py`` as a module (the engine is shared with the test suite)."""
    spec = importlib.util.spec_from_file_location("fuzz_engine", REPO / "tests" / "test_fuzz_readers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_engine"] = mod
    spec.loader.exec_module(mod)
    return mod


def run(readers: list[str], n: int, seed: int) -> dict:
    """Fuzz each reader in this process; return counts, crash kinds and timings as plain JSON."""
    F = _engine()
    import rmtprune

    out = {"rmtprune": str(Path(rmtprune.__file__).parent), "seed": seed, "n": n, "readers": {}}
    with tempfile.TemporaryDirectory(prefix="rmtprune-fuzz-") as tmp:
        for reader in readers:
            codes: list[str] = []
            summary = F.fuzz(reader, n, seed, Path(tmp) / "case", record=codes)
            kinds: Counter = Counter()
            example: dict[str, int] = {}
            for res in summary.failures:
                key = f"{res.outcome}: {res.detail.splitlines()[0][:90]}" if res.detail else res.outcome
                key = key.split(" (")[0] if res.outcome == "hang" else key
                kinds[key] += 1
                example.setdefault(key, res.index)
            out["readers"][reader] = {
                "counts": {o: summary.counts.get(o, 0) for o in F.OUTCOMES},
                "seconds": summary.seconds,
                "slowest": summary.slowest,
                "kinds": [[k, c, example[k]] for k, c in kinds.most_common()],
                "codes": "".join(codes),
            }
            counts = out["readers"][reader]["counts"]
            print(
                f"{reader:20s} {n:6d}  "
                + "  ".join(f"{o} {counts[o]}" for o in F.OUTCOMES)
                + f"  ({summary.seconds:.1f} s)",
                flush=True,
            )
    return out


def table(result: dict, outcomes: tuple[str, ...]) -> list[str]:
    """Markdown table of one run."""
    lines = [
        "| reader | inputs | " + " | ".join(outcomes) + " | time (s) |",
        "|---|---:|" + "---:|" * len(outcomes) + "---:|",
    ]
    total: Counter = Counter()
    for reader, r in result["readers"].items():
        n = sum(r["counts"].values())
        total.update(r["counts"])
        total["inputs"] += n
        lines.append(
            f"| {reader} | {n} | "
            + " | ".join(str(r["counts"][o]) for o in outcomes)
            + f" | {r['seconds']:.1f} |"
        )
    lines.append(f"| **all** | {total['inputs']} | " + " | ".join(str(total[o]) for o in outcomes) + " | |")
    return lines


def kinds(result: dict, limit: int = 12) -> list[str]:
    """The distinct failure kinds of a run (most frequent first), with a case that shows each."""
    rows = []
    for reader, r in result["readers"].items():
        for kind, count, index in r["kinds"]:
            rows.append((count, reader, kind, index))
    rows.sort(key=lambda t: -t[0])
    out = [
        f"- {reader}: {count} x `{kind.replace('`', chr(39))}` (e.g. case {index})"
        for count, reader, kind, index in rows[:limit]
    ]
    if len(rows) > limit:
        out.append(f"- ... and {len(rows) - limit} more kinds")
    return out or ["- none"]


def changes(before: dict, after: dict) -> list[str]:
    """Per reader, how many inputs changed outcome between the runs (e.g. loaded -> clean error)."""
    names = {"L": "loaded", "E": "clean error", "C": "crash", "H": "hang", "A": "huge allocation"}
    out = []
    for reader, b in before["readers"].items():
        a = after["readers"].get(reader)
        if not a or not b.get("codes") or not a.get("codes"):
            continue
        moved = Counter((x, y) for x, y in zip(b["codes"], a["codes"], strict=False) if x != y)
        for (x, y), count in sorted(moved.items(), key=lambda t: -t[1]):
            first = next(
                i for i, (p, q) in enumerate(zip(b["codes"], a["codes"], strict=False)) if (p, q) == (x, y)
            )
            out.append(f"- {reader}: {count} x {names[x]} -> {names[y]} (e.g. case {first})")
    return out or ["- none"]


def _subprocess_run(src: Path, args: argparse.Namespace, out_json: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--n",
        str(args.n),
        "--seed",
        str(args.seed),
        "--json",
        str(out_json),
        *sum((["--reader", r] for r in args.reader or []), []),
    ]
    print(f"$ PYTHONPATH={src} {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out_json.read_text())


def compare(args: argparse.Namespace) -> None:
    """Run the fuzzer against revision ``args.compare`` and against this tree; write the report."""

    def git(*cmd: str) -> str:
        run = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True)
        return run.stdout.strip()

    rev = git("rev-parse", "--short", args.compare)
    head = git("rev-parse", "--short", "HEAD")
    dirty = ", ".join(
        "`" + line[3:].rsplit("/", 1)[-1] + "`"
        for line in git("status", "--porcelain", "--", "src").splitlines()
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmtprune-fuzz-cmp-") as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            before = _subprocess_run(tree / "src", args, Path(tmp) / "before.json")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
        after = _subprocess_run(REPO / "src", args, Path(tmp) / "after.json")
    total = time.perf_counter() - t0
    F = _engine()
    outcomes = F.OUTCOMES
    cmd = "python benchmarks/fuzz_readers.py --compare " + args.compare
    if args.n != F.CASES_PER_READER:
        cmd += f" --n {args.n}"
    if args.seed:
        cmd += f" --seed {args.seed}"
    lines = [
        "# Fuzzing the file readers: before and after",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        machine_line(),
        f"- revision: {git_revision()}",
        f"- Revisions: before = `{rev}`, after = `{head}`"
        + (f" plus uncommitted changes to {dirty}" if dirty else ""),
        f"- Command: `{cmd}` (total {total:.0f} s)",
        f"- Inputs: {args.n} mutated inputs per reader, seed {args.seed}, made from the seed files in "
        "`tests/fuzz_corpus/seeds` by the mutation families of `tests/test_fuzz_readers.py` (bit flips, "
        "interesting bytes and integers, byte inserts/deletes, truncation, JSON-aware edits of headers, "
        "manifests and indexes: values replaced by ints, floats, Infinity/NaN, 1e400, huge or negative "
        "numbers, lists, null, strings, deep nesting; zip members edited inside consistent archives). "
        "Both runs see exactly the same inputs.",
        "- Readers: `safetensors-header`, `safetensors-body`, `sharded-index`, `torch-zip` (zip archives) "
        "and `torch-legacy` (pre-1.6 `torch.save` pickles) go through "
        "`rmtprune.weights_file` (`list_tensors`, `iter_tensors`) and `rmtprune.analyze_file` (named "
        "`rmtprune.checkpoint` and `analyze_checkpoint` before 0.2); `idx` through "
        "`rmtprune.zoo.data.read_idx`; `sparse-format` through `rmtprune.sparse_format.load_sparse`; "
        "`manifest` (the rmtprune manifest in a safetensors header) through `rmtprune.load`, from the "
        "file alone and into a fresh model.",
        "- Outcomes: *loaded* (the reader returned), *clean error* (a one-line `RmtpruneError`), *crash* "
        "(any other exception, a traceback for the user), *hang* (more than 2 s for one input), "
        "*huge allocation* (an allocation refused under an address-space cap 3 GiB above the start). "
        "No reader wrote a file or executed code in either run (the readers only read; "
        "`torch.load` runs with `weights_only=True`).",
        "",
        f"## Before (`{rev}`)",
        "",
        *table(before, outcomes),
        "",
        "Failure kinds:",
        "",
        *kinds(before),
        "",
        f"## After (`{head}`)",
        "",
        *table(after, outcomes),
        "",
        "Failure kinds:",
        "",
        *kinds(after),
        "",
        "## Inputs whose outcome changed",
        "",
        "Same input, before -> after (reproduce one with `--reader R --case I -v`, with and without "
        "`PYTHONPATH=<old tree>/src`):",
        "",
        *changes(before, after),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def one_case(args: argparse.Namespace) -> None:
    """Rebuild case ``args.case`` of one reader, run it, say what happened (``-v``: the traceback)."""
    F = _engine()
    reader = (args.reader or [F.READERS[0]])[0]
    with tempfile.TemporaryDirectory(prefix="rmtprune-case-") as tmp:
        case = F.REGISTRY[reader].make(F.case_rng(args.seed, reader, args.case))
        path = F._write_case(case, Path(tmp))
        print(f"{reader} seed={args.seed} case={args.case} (from {case.note}): {path.name}")
        for rel, data in case.files.items():
            print(f"  {rel}: {len(data)} bytes, starts {data[:80]!r}")
        if args.keep:
            dest = Path(args.keep)
            dest.mkdir(parents=True, exist_ok=True)
            for rel, data in case.files.items():
                (dest / rel).write_bytes(data)
            print(f"  files kept in {dest}")
        with F.bounded():
            t0 = time.perf_counter()
            try:
                F.REGISTRY[reader].load(path)
                print(f"loaded ({time.perf_counter() - t0:.3f} s)")
            except BaseException as exc:  # noqa: BLE001 - reporting is the point
                outcome, detail = F._classify(exc)
                print(f"{outcome} ({time.perf_counter() - t0:.3f} s): {detail.splitlines()[0]}")
                if args.verbose:
                    traceback.print_exception(type(exc), exc, exc.__traceback__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="inputs per reader (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reader", action="append", help="only this reader (repeatable); default all")
    ap.add_argument("--json", help="write the raw counts here")
    ap.add_argument(
        "--compare", metavar="REV", help="run against git revision REV and this tree; write --out"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "fuzz_readers.md"))
    ap.add_argument("--case", type=int, help="run only this case index (of the first --reader)")
    ap.add_argument("--keep", help="with --case: also write the case's files to this folder")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.case is not None:
        one_case(args)
        return
    if args.compare:
        compare(args)
        return
    F = _engine()
    readers = args.reader or list(F.READERS)
    result = run(readers, args.n, args.seed)
    print("\n".join(table(result, F.OUTCOMES)))
    print("\n".join(kinds(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
