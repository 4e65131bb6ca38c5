"""``rmtprune analyze FILE``: fit the Marchenko-Pastur bulk of every weight matrix of a weights file."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from .._format import table
from ..config import DEFAULT_NOISE
from ..spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX, NOISE_MODELS
from ._options import add_threads_flag, set_threads

_COLUMNS = (
    "layer",
    "shape",
    "gamma",
    "sigma2",
    "s_plus",
    "spikes",
    "bulk",
    "ks",
    "pl_alpha",
    "hill",
    "srank",
    "verdict",
    "note",
)
#: ESD metrics (:class:`rmtprune.spectral.esd_metrics.ESDMetrics`) and correlation-trap fields
#: (``TrapReport``) as CSV columns, prefixed (their ``alpha`` is not the fit's BEMA ``alpha``).
_METRIC_FIELDS = (
    "alpha",
    "alpha_xmin",
    "alpha_ks",
    "alpha_n_tail",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "mp_softrank",
    "entropy",
    "alpha_hill",
    "log_alpha_norm",
    "alpha_sigma",
)
_TRAP_FIELDS = ("rand_max_eigenvalue", "rand_mp_edge", "n_traps", "rand_distance")
_CSV_FIELDS = (
    "layer",
    "shape",
    "matrix_shape",
    "dtype",
    "verdict",
    "gamma",
    "sigma2",
    "lambda_plus",
    "s_plus",
    "n_spikes",
    "n_bulk",
    "bulk_fraction",
    "ks",
    "ks_gate",
    "ks_pvalue",
    "noise",
    "tail_ratio",
    "tail_heavy",
    "alpha",
    "beta",
    *(f"esd_{k}" for k in _METRIC_FIELDS),
    *(f"trap_{k}" for k in _TRAP_FIELDS),
    "message",
)

_EPILOG = """\
verdicts:
  fit          MP-like bulk (ks <= the gate): spikes above s_plus are signal, the bulk is noise
  no-mp-bulk   ks > the gate (or no positive bulk): the layer would not be pruned
  the gate is max(--ks-max, q), q the 99% quantile of the KS distance of a true MP bulk of the
  layer's size (above 0.1 only for p < ~23); JSON/CSV give it (ks_gate) and the layer's p-value
  (ks_pvalue: how often a true MP bulk of that size is at least as far from MP)
  too-small    fewer than 10 singular values: no fit
  invalid      NaN or Inf weights (the other layers are still analysed; exit status 1)
metrics (every fitted layer; JSON "metrics", CSV esd_*): pl_alpha is the power-law exponent of the
  tail of the eigenvalue density (Clauset-Shalizi-Newman fit, as WeightWatcher), hill the Hill
  estimate of it, srank the stable rank ||W||_F^2 / ||W||_2^2; the summary line averages them.
ignored (counted in the summary): 1-D tensors (biases, norms), non-float tensors, 3-D and 5-D+ tensors.

patterns: --include/--exclude are shell globs, as in compress and sparsify; a regular expression
(with ^ $ ( ) + | \\ { }, or .* inside a name) is still accepted until the next release, with a
warning saying how to write it as a glob.
exit status: 0 all layers analysed, 1 some layer is invalid, 2 bad input or arguments.
outputs: --json/--csv are never FILE, and an existing file there that rmtprune did not
write is refused unless --force; each is written atomically.
formats: .safetensors file; directory of safetensors shards (with or without *.safetensors.index.json);
torch.save state dict (.pt/.pth/.bin/.ckpt, loaded with weights_only=True; pickles that need code
execution are refused). Tensors are read one at a time: memory stays near the largest tensor.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` and its options."""
    p = subparsers.add_parser(
        "analyze",
        help="fit the Marchenko-Pastur bulk of every weight matrix in a weights file",
        description=(
            "Spectral analysis of every 2-D and 4-D floating-point tensor of a weights file: singular "
            "values, BEMA fit of the Marchenko-Pastur bulk, Tracy-Widom edge, number of spikes above "
            "it, and the KS distance that gates whether the bulk is MP-like. Prints a table and a summary."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="a .safetensors file, a shard directory or a .pt/.pth/.bin")
    p.add_argument("--json", metavar="FILE", help="write the full analysis as JSON (atomic)")
    p.add_argument("--csv", metavar="FILE", help="write one row per analysed layer as CSV (atomic)")
    p.add_argument(
        "--plots",
        metavar="DIR",
        help="write one spectrum PNG per fitted layer and summary.png to DIR (created if its parent exists)",
    )
    p.add_argument(
        "--include",
        metavar="GLOB",
        action="append",
        default=[],
        help=(
            "analyse only tensors whose name, or the name of a module holding them, matches the glob "
            "(fc1, features.*, *.bias); repeatable, any match keeps"
        ),
    )
    p.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        default=[],
        help="skip tensors whose name, or the name of a module holding them, matches the glob; repeatable",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"BEMA trim fraction in (0, 0.5) (default: {DEFAULT_ALPHA})",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=DEFAULT_BETA,
        help=f"Tracy-Widom level: the edge is the 1-beta quantile (default: {DEFAULT_BETA})",
    )
    p.add_argument(
        "--ks-max",
        type=float,
        default=DEFAULT_KS_MAX,
        metavar="KS",
        help=(
            f"misfit tolerated by the gate on the KS distance to the fitted MP law (the size term is "
            f"added, see below); 0: the pure 1%% test; inf turns the gate off (default: {DEFAULT_KS_MAX})"
        ),
    )
    p.add_argument(
        "--noise",
        choices=NOISE_MODELS,
        default=DEFAULT_NOISE,
        help=(
            "noise model of the edge: mp (Tracy-Widom edge), resample (heavy-tailed entries: simulated "
            "Student-t nulls matched to the entries' tail), gamma (BEMA's Gamma model), auto (resample "
            f"where the tail test on the entries fires, else mp) (default: {DEFAULT_NOISE})"
        ),
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite --json/--csv files and --plots PNGs that exist but were not written by rmtprune",
    )
    p.add_argument(
        "--randomize",
        action="store_true",
        help="also report correlation traps: the spectrum of each fitted weight with its entries shuffled",
    )
    p.add_argument(
        "--conv-metrics",
        choices=("matrix", "ww"),
        default="matrix",
        help=(
            "reading of conv (4-D) weights for the ESD metrics only: matrix, out x (in*kh*kw) as the fit "
            "(default), or ww, WeightWatcher 0.7.7's pooled kh*kw slices out x in (alpha comparable to WW's)"
        ),
    )
    p.add_argument(
        "--device",
        metavar="DEV",
        help=(
            "run the Gram/eigenvalue step on this torch device (cuda, cuda:1), float64, same-shape "
            "tensors batched; falls back to the CPU with a warning (default: numpy on the CPU, no torch)"
        ),
    )
    add_threads_flag(p, default="1, the least slowed down on a busy machine; see docs/analyze.md")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return p


def _finite(value: Any) -> Any:
    """``value``, or None for a missing, NaN or infinite number."""
    return value if value is not None and value == value and abs(value) != float("inf") else None


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(la: Any) -> list[str]:
    f, m = la.fit, la.metrics
    return [
        la.name,
        "x".join(str(v) for v in la.shape),
        _fmt(f and f.gamma, ".3f"),
        _fmt(f and f.sigma2, ".3e"),
        _fmt(f and f.s_plus, "#.4g"),
        _fmt(f and f.n_spikes, "d"),
        _fmt(f and f.n_bulk, "d"),
        _fmt(f and f.ks, ".3f"),
        _fmt(_finite(m and m.alpha), ".2f"),
        _fmt(_finite(m and m.alpha_hill), ".2f"),
        _fmt(_finite(m and m.stable_rank), ".3g"),
        la.verdict,
        la.message,
    ]


def format_table(analysis: Any) -> str:
    """The table printed by ``rmtprune analyze`` (one row per analysed layer; numbers right-aligned)."""
    rows = [_row(la) for la in analysis.layers]
    head = list(_COLUMNS)
    if not any(r[-1] for r in rows):
        head, rows = head[:-1], [r[:-1] for r in rows]
    left = {0, len(_COLUMNS) - 2, len(_COLUMNS) - 1}  # layer, verdict, note
    for i in set(range(len(head))) - left:  # right-align the numbers: pad them to the column width
        w = max(len(r[i]) for r in [head, *rows])
        head[i] = head[i].rjust(w)
        for r in rows:
            r[i] = r[i].rjust(w)
    return table(head, rows)


#: The summary metrics printed (all are in the JSON ``summary``), with their format.
_SUMMARY_SHOWN = (
    ("alpha", ".2f"),
    ("alpha_weighted", ".2f"),
    ("alpha_hill", ".2f"),
    ("log_norm", ".3f"),
    ("log_spectral_norm", ".3f"),
    ("stable_rank", ".1f"),
)


def summary_line(summary: dict[str, Any] | None) -> str:
    """One line of the model-level ESD summary (means over the layers with a fit), "" without one."""
    if not summary:
        return ""
    parts = [f"{k}={format(summary[k], spec)}" for k, spec in _SUMMARY_SHOWN if k in summary]
    if not parts:  # e.g. only all-zero matrices: no metric could be computed
        return ""
    n = int(summary.get("n_layers", 0))
    # "with a fit": verdict fit or no-mp-bulk (the metrics do not depend on the gate)
    return f"ESD metrics, mean over {n} layer{'' if n == 1 else 's'} with a fit: " + ", ".join(parts)


def _csv_text(analysis: Any) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for la in analysis.layers:
        d = la.to_dict()
        d["shape"] = "x".join(str(v) for v in d["shape"])
        d["matrix_shape"] = "x".join(str(v) for v in d["matrix_shape"])
        d["bulk_fraction"] = la.fit.bulk_fraction if la.fit is not None else None
        for prefix, sub in (("esd_", d.get("metrics")), ("trap_", d.get("traps")), ("tail_", d.get("tail"))):
            for k, v in (sub or {}).items():
                d[prefix + k] = v
        w.writerow({k: ("" if d.get(k) is None else d[k]) for k in _CSV_FIELDS})
    return buf.getvalue()


def _plot_name(name: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"
    stem = "esd-" + stem[:150]
    out, k = stem, 2
    while out in used:
        out, k = f"{stem}-{k}", k + 1
    used.add(out)
    return out + ".png"


def _check_outputs(args: argparse.Namespace) -> Path | None:
    """Fail before the analysis, not after it, when an output cannot or must not be written.

    ``--json``/``--csv`` may not be FILE (or a file of the analysed shard directory),
    each other, a directory, or an existing file rmtprune did not write (unless ``--force``).
    """
    from .._atomic import check_writable_dir
    from .._outputs import Output, check_outputs
    from ..errors import RmtpruneError

    outputs = [
        Output(Path(getattr(args, opt)).expanduser(), f"analysis-{opt}", f"--{opt}")
        for opt in ("json", "csv")
        if getattr(args, opt) is not None
    ]
    ckpt = Path(args.file).expanduser()
    sidecar = ckpt.with_suffix(".json") if ckpt.suffix == ".safetensors" else None  # rmtprune's manifest
    check_outputs(outputs, inputs=[args.file, sidecar], force=args.force)
    if args.plots is None:
        return None
    from ..plotting import MISSING_MATPLOTLIB, have_matplotlib

    if not have_matplotlib():  # before the analysis, which may take minutes
        raise RmtpruneError(f"--plots needs matplotlib, and {MISSING_MATPLOTLIB}")
    plots = Path(args.plots).expanduser()
    if plots.exists() and not plots.is_dir():
        raise RmtpruneError(f"--plots {args.plots!r} exists and is not a directory")
    check_writable_dir(plots)
    if plots.is_dir():
        check_outputs([Output(plots / "summary.png", "plot", "--plots file")], force=args.force)
    for o in outputs:  # --json/--csv must not be among the PNGs --plots DIR will draw
        if o.path.parent.resolve() == plots.resolve() and o.path.suffix == ".png":
            raise RmtpruneError(
                f"{o.label} {str(o.path)!r} is inside --plots {args.plots!r}; choose another path"
            )
    if ckpt.is_dir() and plots.exists() and plots.resolve() == ckpt.resolve():
        raise RmtpruneError(f"--plots {args.plots!r} is the analysed directory; choose another one")
    return plots


def run(args: argparse.Namespace) -> int:
    """Analyse FILE, print the table and summary, write the requested outputs."""
    from .._atomic import atomic_write_text
    from ..weights_analysis import analyze_file

    set_threads(args.threads)
    plots = _check_outputs(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        analysis = analyze_file(
            args.file,
            include=args.include or None,
            exclude=args.exclude or None,
            alpha=args.alpha,
            beta=args.beta,
            ks_max=args.ks_max,
            noise=args.noise,
            progress=False if args.no_progress else None,
            device=args.device,
            randomize=args.randomize,
            conv=args.conv_metrics,
        )
    for w in caught:  # a regex --include/--exclude: one line saying how to write it as a glob
        if issubclass(w.category, (DeprecationWarning, RuntimeWarning)):  # and CUDA not available
            print(f"rmtprune: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if analysis.layers:
        print(format_table(analysis))
    else:
        print("no 2-D or 4-D floating-point tensors to analyse")
    where = f"{analysis.path} ({analysis.format}" + "".join(f", unwrapped {k!r}" for k in analysis.unwrapped)
    print(f"{where}): {analysis.summary()}")
    line = summary_line(analysis.metrics_summary())
    if line:
        print(line)
    tested = [la for la in analysis.layers if la.tail is not None]
    heavy = [la for la in tested if la.tail.heavy]
    if heavy and analysis.noise == "mp":
        print(
            f"heavy-tailed entries in {len(heavy)} of {len(tested)} tested layers (tail test, "
            "docs/spectral.md): the mp edge may count false spikes there; "
            "--noise auto fits them with a heavy-tailed null"
        )

    if args.json is not None:
        text = json.dumps(analysis.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write_text(args.json, text)
    if args.csv is not None:
        atomic_write_text(args.csv, _csv_text(analysis))
    if plots is not None:
        written = _write_plots(analysis, plots, enable=False if args.no_progress else None, force=args.force)
        print(f"wrote {written} plots to {plots}")
    if analysis.has_invalid:
        names = ", ".join(repr(n) for n in analysis.invalid_layers)
        print(
            f"rmtprune: {len(analysis.invalid_layers)} layer(s) with NaN or Inf weights: {names}",
            file=sys.stderr,
        )
        return 1
    return 0


def _write_plots(analysis: Any, plots: Path, enable: bool | None, force: bool = False) -> int:
    from .._outputs import Output, check_outputs
    from ..plotting import draw_plots

    used: set[str] = {"summary"}
    fitted = [la for la in analysis.layers if la.fit is not None]
    names = [_plot_name(la.name, used) for la in fitted]
    # PNGs of these names already in DIR must be plots rmtprune drew (or --force): checked for all
    # before the first is written.
    targets = [plots / n for n in names] + ([plots / "summary.png"] if analysis.layers else [])
    if plots.is_dir():
        check_outputs([Output(t, "plot", "--plots file") for t in targets], force=force)
    plots.mkdir(exist_ok=True)
    # The summary first: the largest figure starts while the workers take the layers.
    jobs = [("summary", analysis, plots / "summary.png")] if analysis.layers else []
    jobs += [("esd", la, plots / name) for la, name in zip(fitted, names, strict=True)]
    return len(draw_plots(jobs, progress=enable))
