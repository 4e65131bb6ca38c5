"""Layerwise sparsity allocation on SmolLM2-135M: RMT against uniform Wanda, OWL and AlphaPruning (issue 13).

Every method prunes the decoder blocks' linear layers (210 ``nn.Linear``: q/k/v/o and gate/up/down
of 30 blocks; not the embeddings or the tied head) to exactly the same global sparsity, one-shot,
no fine-tuning, all through ``rmtprune.sparsify`` (``sv_sparsify=False``: the weights are only
masked):

- ``magnitude``: ``budget="uniform"``, ``score="magnitude"`` (data-free);
- ``wanda``: ``budget="uniform"``, Wanda's ``|W_ij| * ||X_j||_2`` per output row (arXiv:2306.11695);
- ``owl``: OWL's outlier-ratio allocation per block (M = 5, lambda = 0.08; arXiv:2310.05175), Wanda;
- ``alphapruning``: AlphaPruning's ESD-exponent allocation per block (alpha_peak, eps = 0.3;
  arXiv:2410.10912), Wanda;
- ``rmt-wanda`` (ours): per-layer sparsity from the MP/BEMA fit (``budget="rmt"``), Wanda within
  each layer; ``rmt_metric``, the band ``eps`` and per-layer vs per-block chosen on a validation
  slice at 70% (pre-registered in the results file before anything is evaluated);
- ``rmt-magnitude``: the same allocation with magnitude within each layer (data-free).

Data (``benchmarks/_real_data.py``): calibration windows of 256 tokens drawn (by seed) from the
Python-docs calibration split; the validation slice from the validation split when
``_real_data`` has one, else extra calibration-split windows never drawn for calibration;
evaluation perplexity on held-out Python-docs windows (in-domain) and on an out-of-domain text
(``_real_data.ood_text`` when present and cached, else WordNet glosses and examples of the
evaluation split as a running text). Each calibration seed draws different windows; the data-free
methods do not depend on it.

Run: ``python benchmarks/sparsify_real.py`` (writes ``benchmarks/results/sparsify_real.md`` and
``.json``); ``--quick`` for a smoke run (a few windows, one sparsity, one seed, a small grid).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_data as data  # noqa: E402
from _cli import QUICK_OUT, RESULTS, command_line, log  # noqa: E402
from _env import versions  # noqa: E402
from _report import dump_json, machine, md_table  # noqa: E402
from _stats import mean_std  # noqa: E402
from fetch_real import default_cache  # noqa: E402
from real_models import block_linears, git_revision, lm_eval, token_windows  # noqa: E402

from rmtprune._atomic import atomic_write_text  # noqa: E402

#: Method -> SparsifyConfig fields (the rmt ones get the validation winner added).
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"budget": "uniform", "score": "magnitude"},
    "wanda": {"budget": "uniform", "score": "wanda"},
    "owl": {"budget": "owl", "score": "wanda"},
    "alphapruning": {"budget": "alphapruning", "score": "wanda"},
    "rmt-wanda": {"budget": "rmt", "score": "wanda"},
    "rmt-magnitude": {"budget": "rmt", "score": "magnitude"},
}
DATA_FREE = ("magnitude", "rmt-magnitude")
#: The pre-registered validation grid of the rmt budget (``--quick`` uses its first two of each).
GRID = {
    "rmt_metric": ("bulk_energy", "bulk_fraction", "spike_mass"),
    "budget_range": (0.05, 0.1, 0.2),
    "allocation": ("layer", "block"),
}
SELECT_AT = 0.7


# ====================================================================== data
def windows_of(tok: Any, text: str, n: int, seq_len: int) -> torch.Tensor:
    """``n x seq_len`` token ids of ``text`` (non-overlapping windows from its start)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {n} x {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def ood_source(cache: Path) -> tuple[str, str]:
    """The out-of-domain evaluation text and its description (``ood_text`` if present, else WordNet)."""
    if hasattr(data, "ood_text"):
        try:
            return data.ood_text(cache, "eval"), "`_real_data.ood_text(split='eval')`"
        except (data.CacheMissingError, ValueError, OSError) as exc:
            log(f"ood_text unavailable ({exc}); using WordNet glosses")
    parts = []
    for pos in ("noun", "verb", "adj", "adv"):
        for s in data.wordnet(pos, cache):
            if s.split == "eval":
                parts.append(f"{s.lemmas[0]}: {s.definition}." + "".join(f' "{e}."' for e in s.examples))
    return "\n".join(parts), 'WordNet 3.0 evaluation-split synsets, `lemma: definition. "examples"` per line'


def load(args: argparse.Namespace) -> dict[str, Any]:
    """The model, its block layers, the calibration pool, the validation and evaluation windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = data.item_path("smollm2-135m", args.cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    layers = block_linears(model, "model.layers.")
    n_eval = args.tokens // args.eval_len
    b: dict[str, Any] = {"model": model, "tok": tok, "layers": layers}
    has_val = "validation" in getattr(data, "SPLITS", ())
    pool_n = args.pool + (0 if has_val else args.val_windows)
    pool = token_windows(tok, "calib", pool_n, args.calib_len, args.cache)
    if has_val:
        b["val"] = token_windows(tok, "validation", args.val_windows, args.calib_len, args.cache)
        b["val_source"] = (
            "the `validation` split of `_real_data` (documents in neither calibration nor evaluation)"
        )
    else:
        b["val"] = pool[args.pool :]
        b["val_source"] = "the calibration split's windows after the calibration pool (never drawn)"
    b["pool"] = pool[: args.pool]
    b["eval_in"] = token_windows(tok, "eval", n_eval, args.eval_len, args.cache)
    text, b["ood_source"] = ood_source(args.cache)
    b["eval_ood"] = windows_of(tok, text, n_eval, args.eval_len)
    return b


def calibration(b: dict[str, Any], seed: int, n: int) -> Any:
    """Seed ``seed``'s draw of ``n`` pool windows, collected for the block layers (batches of 4)."""
    from rmtprune.calibration import collect

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(b["pool"].shape[0], generator=g)[:n]
    w = b["pool"][idx]
    batches = [{"input_ids": w[i : i + 4]} for i in range(0, n, 4)]
    return collect(b["model"], batches, layers=b["layers"], held_out=0.0)


# ====================================================================== runs
_FITS: dict[tuple, list[tuple[Any, float]]] = {}


def cache_fits() -> None:
    """Fit the dense weights once: every run starts from them, so its fits are the same (~30 s a run)."""
    import rmtprune.sparsity.core as core

    fit_layers = core.fit_layers

    def cached(model: nn.Module, layers: list, fit: Any, show: bool | None) -> None:
        key = (tuple(x.name for x in layers), repr(fit))
        if key not in _FITS:
            fit_layers(model, layers, fit, show)
            _FITS[key] = [(x.analysis, x.sigma) for x in layers]
        for x, (a, sigma) in zip(layers, _FITS[key], strict=True):
            x.analysis, x.sigma = a, sigma

    core.fit_layers = cached


def prune(b: dict[str, Any], fields: dict[str, Any], target: float, calib: Any) -> tuple[nn.Module, Any]:
    """A pruned copy of the dense model and the sparsify report."""
    import rmtprune

    model = copy.deepcopy(b["model"])
    cfg = rmtprune.SparsifyConfig(
        target=target, include=list(b["layers"]), sv_sparsify=False, n_cycles=1, **fields
    )
    _, report = rmtprune.sparsify(
        model, cfg, calibration=calib if fields.get("score") == "wanda" else None, show_progress=False
    )
    return model, report


def ppl(model: nn.Module, windows: torch.Tensor) -> float:
    return float(lm_eval(model, windows)["ppl"])


def validate(b: dict[str, Any], calib: Any, args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered grid on the validation slice at 70%; the winner, and context rows."""
    rows = []
    grid = {k: v[:1] for k, v in GRID.items()} if args.quick else GRID
    for name in ("wanda",) if args.quick else ("wanda", "owl", "alphapruning"):  # context, not the choice
        t0 = time.perf_counter()
        model, _ = prune(b, METHODS[name], SELECT_AT, calib)
        rows.append({"method": name, "val_ppl": ppl(model, b["val"]), "s": time.perf_counter() - t0})
        log(f"[validation] {name}: {rows[-1]['val_ppl']:.3f}")
    for metric in grid["rmt_metric"]:
        for eps in grid["budget_range"]:
            for alloc in grid["allocation"]:
                fields = {
                    **METHODS["rmt-wanda"],
                    "rmt_metric": metric,
                    "budget_range": eps,
                    "allocation": alloc,
                }
                model, _ = prune(b, fields, SELECT_AT, calib)
                rows.append({"method": "rmt-wanda", "rmt_metric": metric, "budget_range": eps,
                             "allocation": alloc, "val_ppl": ppl(model, b["val"])})  # fmt: skip
                log(f"[validation] rmt {metric} eps={eps} {alloc}: {rows[-1]['val_ppl']:.3f}")
                out["validation"] = rows
    best = min((r for r in rows if r["method"] == "rmt-wanda"), key=lambda r: r["val_ppl"])
    return {k: best[k] for k in ("rmt_metric", "budget_range", "allocation")}


def measure(
    b: dict[str, Any], method: str, fields: dict[str, Any], target: float, calib: Any, seed: int | None
) -> dict[str, Any]:
    """One method at one sparsity: achieved sparsity, perplexities, per-layer sparsities."""
    t0 = time.perf_counter()
    model, report = prune(b, fields, target, calib)
    prune_s = time.perf_counter() - t0
    row = {"method": method, "target": target, "seed": seed, "achieved": report.achieved,
           "ppl_in": ppl(model, b["eval_in"]), "ppl_ood": ppl(model, b["eval_ood"]), "prune_s": prune_s,
           "layers": {r.name: round(r.sparsity, 5) for r in report.layers}}  # fmt: skip
    took = time.perf_counter() - t0
    log(f"[{method} @ {target:.0%} seed {seed}] achieved {row['achieved']:.4%}: "
        f"ppl in {row['ppl_in']:.3f} ood {row['ppl_ood']:.3f} ({took:.0f} s)")  # fmt: skip
    return row


# ====================================================================== report
def _cell(rows: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows]
    if not vals:
        return "-"
    m, s = mean_std(vals)
    return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} +- {s:.2f}"


def results_table(rows: list[dict[str, Any]], dense: dict[str, float]) -> str:
    head = ["method", "sparsity", "achieved", "draws", "ppl in-domain", "ppl out-of-domain"]
    body = [["dense", "0%", "0%", "-", f"{dense['in']:.2f}", f"{dense['ood']:.2f}"]]
    for t in sorted({r["target"] for r in rows}):
        for m in METHODS:
            sel = [r for r in rows if r["method"] == m and r["target"] == t]
            if sel:
                body.append([m, f"{t:.0%}", f"{max(r['achieved'] for r in sel):.4%}", str(len(sel)),
                             _cell(sel, "ppl_in"), _cell(sel, "ppl_ood")])  # fmt: skip
    return md_table(head, body)


def block_profile(rows: list[dict[str, Any]], target: float) -> str:
    """Per-type mean sparsity (q/k/v/o/gate/up/down) of each allocator at ``target``, first draw."""
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    body = []
    for m in METHODS:
        sel = [r for r in rows if r["method"] == m and r["target"] == target]
        if not sel:
            continue
        lay = sel[0]["layers"]
        cells = []
        for k in kinds:
            v = [s for n, s in lay.items() if n.endswith(k)]
            cells.append(f"{sum(v) / len(v):.1%}" if v else "-")
        thirds = [[s for n, s in lay.items() if int(n.split(".")[2]) * 3 // 30 == j] for j in range(3)]
        cells += [f"{sum(v) / len(v):.1%}" if v else "-" for v in thirds]
        body.append([m, *cells])
    head = ["method", *kinds, "blocks 0-9", "10-19", "20-29"]
    return md_table(head, body)


def write(args: argparse.Namespace, out: dict[str, Any], final: bool = False) -> None:
    """The markdown (pre-registration first; tables as they fill) and the JSON."""
    lines = [
        "# Layerwise sparsity allocation on SmolLM2-135M (issue 13): RMT vs uniform Wanda, OWL, AlphaPruning",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"git revision at the start {args.revision}",
        f"- machine: {machine()} (shared with other jobs; torch threads: {args.threads})",
        f"- versions: {versions('torch', 'transformers', 'numpy')}",
        f"- command: `{args.command}` (cache: `benchmarks/fetch_real.sh`)",
        f"- wall time: {(args.wall_before + time.perf_counter() - args.t0) / 60:.1f} min"
        + ("" if final else " (run in progress)")
        + ("; QUICK smoke run, not a result" if args.quick else ""),
        "- SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF (its weights carry 4-bit quantisation noise).",
        "- every method: the 210 decoder-block linear layers, exactly the target sparsity over them (the "
        "*achieved* column), one-shot through `rmtprune.sparsify`, `sv_sparsify=False`, no fine-tuning.",
        f"- calibration: {args.calib} windows of {args.calib_len} tokens drawn per seed from a pool of "
        f"{args.pool} Python-docs calibration-split windows; seeds {args.seed_list}.",
        f"- validation: {args.val_windows} windows of {args.calib_len} tokens from "
        f"{out.get('val_source', '?')}.",
        f"- evaluation: {args.tokens} tokens per domain in windows of {args.eval_len}: in-domain Python-docs "
        f"evaluation split; out-of-domain {out.get('ood_source', '?')}.",
        "",
        "## Pre-registration (written before any evaluation)",
        "",
        "- The rmt budget's `rmt_metric` in {" + ", ".join(GRID["rmt_metric"]) + "}, `budget_range` (eps) in "
        "{" + ", ".join(map(str, GRID["budget_range"])) + "} and `allocation` in {layer, block} are chosen "
        f"together by the lowest validation perplexity at {SELECT_AT:.0%} sparsity with Wanda scores and the "
        "seed-0 calibration. The winner is then used unchanged for `rmt-wanda` and `rmt-magnitude` at every "
        "sparsity and seed. The evaluation windows are not read before the choice.",
        "- OWL and AlphaPruning run with their papers' settings (M = 5, lambda = 0.08; alpha_peak, "
        "eps = 0.3, block-wise); they are not tuned. Their validation perplexities are context only.",
        "- Success (the issue's target): `rmt-wanda` below `wanda`, `owl` and `alphapruning` in both "
        "domains at 60% and 70% beyond the spread over calibration draws, and within it at 50%.",
    ]
    if out.get("validation"):
        body = [[r["method"], r.get("rmt_metric", "-"), r.get("budget_range", "-"), r.get("allocation", "-"),
                 f"{r['val_ppl']:.3f}"] for r in out["validation"]]  # fmt: skip
        lines += [
            "",
            f"## Validation at {SELECT_AT:.0%} (seed-0 calibration)",
            "",
            f"Dense validation perplexity: {out.get('dense_val', float('nan')):.3f}.",
            "",
            md_table(["method", "rmt_metric", "eps", "allocation", "validation ppl"], body),
        ]
    if out.get("chosen"):
        lines += ["", f"Chosen: `{out['chosen']}`."]
    if out.get("rows"):
        dense = out["dense"]
        top = max(r["target"] for r in out["rows"])
        lines += ["", "## Results (perplexity; mean +- std over calibration draws where there are several)",
                  "", results_table(out["rows"], dense), "",
                  f"## Where each allocator puts the sparsity ({top:.0%}, first draw)", "",
                  "Mean layer sparsity per projection type and per third of the depth.", "",
                  block_profile(out["rows"], top)]  # fmt: skip
    lines += ["", *args.notes] if args.notes else []
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    out["wall_s"] = args.wall_before + time.perf_counter() - args.t0
    dump_json(args.out.with_suffix(".json"), {"command": args.command, "revision": args.revision, **out})


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sparsities", default="0.5,0.6,0.7", help="comma list of global sparsities")
    p.add_argument("--seeds", type=int, default=3, help="calibration draws (seeds 0..n-1)")
    p.add_argument("--seed-sparsities", default="0.7", help="sparsities that get every draw (default 0.7)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows per draw")
    p.add_argument("--pool", type=int, default=128, help="calibration-split windows the draws come from")
    p.add_argument("--val-windows", type=int, default=8, help="validation windows")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per domain")
    p.add_argument("--calib-len", type=int, default=256, help="calibration and validation window length")
    p.add_argument("--eval-len", type=int, default=512, help="evaluation window length")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: LAPACK crawls on 2 busy cores)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny data, 70% only, one seed, small grid"
    )
    p.add_argument("--cache", type=Path, default=None, help=f"real-model cache (default {default_cache()})")
    p.add_argument("--out", type=Path, default=None, help="results markdown")
    p.add_argument("--note", dest="notes", action="append", default=[], help="a line added at the end")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its JSON: keep its validation choice and measured rows",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sparsities, args.seeds, args.calib, args.pool = "0.7", 1, 4, 8
        args.val_windows, args.tokens = 2, 512
    args.target_list = [float(s) for s in args.sparsities.split(",") if s]
    args.seed_list = list(range(args.seeds))
    seeded = args.seed_sparsities or args.sparsities
    args.seeded = {float(s) for s in seeded.split(",") if s}
    args.cache = (args.cache or default_cache()).expanduser()
    args.out = args.out or (QUICK_OUT if args.quick else RESULTS) / "sparsify_real.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.command, args.t0, args.revision = command_line(), time.perf_counter(), git_revision()
    args.wall_before = 0.0
    return args


def resumed(args: argparse.Namespace) -> dict[str, Any]:
    """The interrupted run's results (``--resume``), checked to be of the same settings."""
    import ast
    import json

    path = args.out.with_suffix(".json")
    old = json.loads(path.read_text())
    keep = ("sparsities", "seeds", "seed_sparsities", "calib", "pool", "val_windows", "tokens", "calib_len",
            "eval_len", "quick")  # fmt: skip
    mine = {k: str(v) for k, v in vars(args).items()}
    diff = [k for k in keep if old["args"].get(k) != mine.get(k)]
    if diff or "chosen" not in old:
        raise SystemExit(f"--resume: {path} is of other settings ({diff}) or has no validation choice")
    args.wall_before = float(old.get("wall_s", 0.0))
    first = old.get("notes", ast.literal_eval(old["args"].get("notes", "[]")))
    args.notes = first + args.notes
    args.notes.append(
        f"- resumed with `{args.command}` (revision {args.revision}) after an interruption; "
        f"{len(old.get('rows', []))} rows and the validation choice kept from the first part "
        f"(revision {old.get('revision')})."
    )
    return {k: old[k] for k in ("args", "validation", "dense_val", "chosen", "dense", "rows") if k in old}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cache_fits()
    out: dict[str, Any] = (
        resumed(args) if args.resume else {"args": {k: str(v) for k, v in vars(args).items()}}
    )
    out["notes"] = args.notes
    write(args, out)  # the pre-registration, before anything is measured
    b = load(args)
    out.update({k: b[k] for k in ("val_source", "ood_source")})
    calibs: dict[int, Any] = {}
    if "chosen" not in out:
        calibs[0] = calibration(b, 0, args.calib)
        out["dense_val"] = ppl(b["model"], b["val"])
        out["chosen"] = validate(b, calibs[0], args, out)
        write(args, out)
    chosen = out["chosen"]
    log(f"chosen on validation: {chosen}")
    if "dense" not in out:
        out["dense"] = {"in": ppl(b["model"], b["eval_in"]), "ood": ppl(b["model"], b["eval_ood"])}
    rows: list[dict[str, Any]] = out.setdefault("rows", [])
    done = {(r["method"], r["target"], r["seed"]) for r in rows}
    for seed in args.seed_list:
        for target in args.target_list:
            if seed > 0 and target not in args.seeded:
                continue
            for method, fields in METHODS.items():
                if (seed > 0 and method in DATA_FREE) or (method, target, seed) in done:
                    continue
                if seed not in calibs:  # the same draw as before an interruption: seeded
                    calibs[seed] = calibration(b, seed, args.calib)
                if method.startswith("rmt"):
                    fields = {**fields, **chosen}
                rows.append(measure(b, method, fields, target, calibs[seed], seed))
                write(args, out)
    write(args, out, final=True)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
