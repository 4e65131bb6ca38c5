"""Which layers the KS gate calibrated by size accepts that the fixed 0.1 gate refused (or the reverse).

The old gate accepted a fit when ``ks <= 0.1``; the new one when ``ks <= max(0.1, q_99%(p, gamma))``
(``rmtprune.spectral.gate``), ``q`` the 99% quantile of the statistic on true MP bulks of that size.
The new gate is never stricter at the same ``ks_max``, so a layer can only flip from refused to
accepted, and only where ``q > 0.1``, i.e. for small ``p`` (about p < 22 at alpha = 0.25).

For every fitted layer of MiniLM-L6 and SmolLM2-135M (safetensors, ``~/.cache/rmtprune/real``) and
of every trained model cached by the experiments (``runs/bench-cache/*.pt``: MNIST/Fashion MLPs
and CNNs, dense and pruned arms), this lists per model the layers accepted by the old and the new
gate, every flipped layer with its ``p``, ``gamma``, ``ks``, gate and p-value, and what the pure
test (``ks_max = 0``) would accept. The experiments whose models have a flipped layer are the ones
to rerun. Fits are taken with the gate off (``ks_max = inf``), so both gates judge the same fit.

Writes ``benchmarks/results/gate_changes.md`` (+ ``.json``). Rerun: ``python benchmarks/gate_changes.py``
(a few minutes on one core; ``--skip-real`` leaves out the two transformers).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _env import git_revision, machine_line  # noqa: E402

import rmtprune  # noqa: E402
from rmtprune._atomic import atomic_write_text  # noqa: E402
from rmtprune.config import FitConfig  # noqa: E402
from rmtprune.spectral import DEFAULT_KS_MAX  # noqa: E402
from rmtprune.spectral.gate import format_pvalue, ks_threshold, null_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gate_changes.md"
CACHE = ROOT / "runs" / "bench-cache"
REAL = Path.home() / ".cache" / "rmtprune" / "real"
REAL_MODELS = {"minilm-l6": REAL / "minilm-l6" / "model.safetensors", "smollm2-135m": REAL / "smollm2-135m"}


def _no_metrics(fn: Any) -> dict[str, Any]:
    """``metrics=False`` where the analysis function has it (the ESD metrics are not needed here)."""
    return {"metrics": False} if "metrics" in inspect.signature(fn).parameters else {}


def layer_rows(model_name: str, layers: list[Any]) -> list[dict[str, Any]]:
    """One record per fitted layer: p, gamma, ks, old/new/pure verdicts, gate, p-value."""
    rows = []
    for la in layers:
        fit = la.fit
        if fit is None:
            continue
        old = bool(fit.sigma2 > 0 and fit.ks <= DEFAULT_KS_MAX)
        rows.append(
            {
                "model": model_name,
                "layer": la.name,
                "shape": list(fit.shape),
                "p": fit.p,
                "gamma": fit.gamma,
                "ks": fit.ks,
                "q99": ks_threshold(fit.p, fit.gamma, alpha=fit.alpha),
                "gate": fit.gate(DEFAULT_KS_MAX),
                "pvalue": fit.ks_pvalue,
                "old": old,
                "new": fit.accepted(DEFAULT_KS_MAX),
                "pure": fit.accepted(0.0),
            }
        )
    return rows


def real_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, path in REAL_MODELS.items():
        if not path.exists():
            print(f"{name}: {path} missing, skipped", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        res = rmtprune.analyze_file(
            path, ks_max=math.inf, progress=False, **_no_metrics(rmtprune.analyze_file)
        )
        rows += layer_rows(name, res.layers)
        print(f"{name}: {len(res.layers)} layers in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def cached_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    fit = FitConfig(ks_max=math.inf)
    for path in sorted(Path(args.cache).glob("*.pt")):
        run = torch.load(path, map_location="cpu", weights_only=False)
        model = run.get("model") if isinstance(run, dict) else None
        if not isinstance(model, torch.nn.Module):
            continue
        res = rmtprune.analyze(model.eval(), fit, **_no_metrics(rmtprune.analyze))
        rows += layer_rows(path.stem, list(res))
    print(f"cached models: {len({r['model'] for r in rows})}", file=sys.stderr)
    return rows


def group_of(model: str) -> str:
    """``fashion-mlp-dense-<key>`` -> ``fashion-mlp-dense`` (one line per experiment arm)."""
    return re.sub(r"-[0-9a-f]{16}$", "", model)


def _shape(r: dict[str, Any]) -> str:
    return "x".join(map(str, r["shape"]))


def per_arm_layer(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One line per (arm, layer), the seeds of an arm pooled: ks range, MP null q99, new gate, verdicts."""
    seen, out = set(), []
    for r in rows:
        key = (group_of(r["model"]), r["layer"])
        if key in seen:
            continue
        seen.add(key)
        same = [x for x in rows if (group_of(x["model"]), x["layer"]) == key]
        ks = [x["ks"] for x in same]
        out.append(
            [key[0], key[1], _shape(r), r["p"], len(same), f"{min(ks):.3f}-{max(ks):.3f}", f"{r['q99']:.3f}",
             f"{r['gate']:.3f}", f"{sum(x['new'] for x in same)}/{len(same)}"]
        )  # fmt: skip
    return out


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


NEAR_HEAD = ["arm", "layer", "matrix", "p", "models", "ks", "MP null q99", "new gate", "accepted (new)"]


def report(args: argparse.Namespace, rows: list[dict[str, Any]], wall: float) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(group_of(r["model"]), []).append(r)
    summary, floor = [], null_table().pvalue_floor
    for g, rs in groups.items():
        n_models = len({r["model"] for r in rs})
        pv = np.array([r["pvalue"] for r in rs])
        summary.append(
            [g, n_models, len(rs), sum(r["old"] for r in rs), sum(r["new"] for r in rs),
             sum(r["new"] != r["old"] for r in rs), sum(r["pure"] for r in rs),
             sum(r["p"] < 24 for r in rs), f"{np.mean(pv <= floor):.2f}", format_pvalue(float(np.median(pv)))]
        )  # fmt: skip
    flips = [r for r in rows if r["new"] != r["old"]]
    flip_rows = [
        [r["model"], r["layer"], _shape(r), r["p"], f"{r['gamma']:.3g}", f"{r['ks']:.3f}", f"{r['gate']:.3f}",
         format_pvalue(r["pvalue"]), "refused -> accepted" if r["new"] else "accepted -> refused"]
        for r in flips
    ]  # fmt: skip
    near = sorted(
        (r for r in rows if not r["new"] and r["ks"] <= 0.15),
        key=lambda r: (group_of(r["model"]), r["layer"]),
    )
    near_rows = per_arm_layer(near)
    small_rows = per_arm_layer(sorted((r for r in rows if r["p"] < 24), key=lambda r: group_of(r["model"])))
    cache = args.cache.relative_to(ROOT) if args.cache.is_relative_to(ROOT) else args.cache
    lines = [
        "# Gate changes: the fixed KS gate 0.1 against the gate calibrated by size",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        machine_line(),
        f"- revision: {git_revision()}",
        f"- command: `{args.command}`; wall time {wall / 60:.1f} min",
        "- old gate: `ks <= 0.1`; new gate: `ks <= max(0.1, q_99%(p, gamma))` (the default `ks_max = 0.1`, "
        "eps = 0.01, alpha = 0.25); pure test: `ks <= q_99%(p, gamma)` (`ks_max = 0`). Fits with the gate "
        "off.",
        f"- models: {', '.join(REAL_MODELS) if not args.skip_real else '(transformers skipped)'}, and every "
        f"trained model under {cache}.",
        "",
        "## Per model (cached runs grouped by experiment arm)",
        "",
        "p-value: P(KS of a true MP bulk of that size >= the layer's ks), from the null table "
        "(clipped to [0.001, 0.75]).",
        "",
        md_table(
            [
                "model / arm",
                "models",
                "fitted layers",
                "old gate accepts",
                "new gate accepts",
                "flipped",
                "pure test accepts",
                "layers with p < 24",
                "share p-value <= 0.001",
                "median p-value",
            ],
            summary,
        ),  # fmt: skip
        "",
        f"## Flipped layers ({len(flips)})",
        "",
        md_table(["model", "layer", "matrix", "p", "gamma", "ks", "new gate", "p-value", "change"], flip_rows)
        if flip_rows
        else "None.",
        "",
        "## Refused by both gates with ks <= 0.15 (the near misses, one line per arm and layer)",
        "",
        md_table(NEAR_HEAD, near_rows) if near_rows else "None.",
        "",
        "## Layers with p < 24 (the only sizes where the new gate is above 0.1 at alpha = 0.25)",
        "",
        md_table(NEAR_HEAD, small_rows) if small_rows else "None.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE, help="folder of cached trained runs (*.pt)")
    ap.add_argument("--skip-real", action="store_true", help="leave out MiniLM-L6 and SmolLM2-135M")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.command = "python benchmarks/gate_changes.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.cache = args.cache.resolve()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = ([] if args.skip_real else real_models(args)) + cached_models(args)
    text = report(args, rows, time.perf_counter() - t0)
    atomic_write_text(args.out, text)
    # One layer per line: the file stays diffable.
    lines = ",\n".join(json.dumps(r) for r in rows)
    atomic_write_text(args.out.with_suffix(".json"), f"[\n{lines}\n]\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
