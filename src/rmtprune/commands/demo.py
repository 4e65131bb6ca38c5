"""``rmtprune demo``: train a small MLP on MNIST, compress it with the RMT rule, show before/after.

The compressed model gets a short fine-tune after the cut, and so does a copy of the dense model:
the same function, epochs, learning rate, seed (so the same batch order) on the same data, so the
headline difference is compressed + fine-tune against dense + the same fine-tune, not against a
dense model that trained one epoch less. Training and fine-tuning read the ``train`` split
(the training file minus the fixed validation split). The demo chooses nothing by accuracy; the
test split is read only to report numbers, once per number in the table.

About a minute on two CPU cores. Falls back to scikit-learn's bundled 8x8 digits (saying so)
when the MNIST files are neither on disk nor downloadable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

#: The demo's run: the 2023 paper's MNIST net [784, 1000, 10], a short SGD schedule.
DEMO_MODEL = "mlp:1000"
DEMO_EPOCHS = {"mnist": 3, "digits": 30}
DEMO_LR = 0.05
#: Epochs of fine-tuning after the cut (SGD at a fifth of the training learning rate), given to the
#: compressed model and, identically, to a copy of the dense one.
DEMO_FINETUNE = {"mnist": 1, "digits": 5}
DEMO_FINETUNE_LR = DEMO_LR / 5
DEMO_BATCH = 128
LATENCY_BATCH = 256


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo",
        help="train a small MLP on MNIST, compress it, print a before/after table (~1 minute)",
        description=(
            f"Train an MLP {DEMO_MODEL} on MNIST for {DEMO_EPOCHS['mnist']} epochs, compress it with the "
            "default RMT rule (keep the spikes above the Marchenko-Pastur bulk), fine-tune it one epoch, "
            "give a copy of the dense model the identical extra epoch, and print test accuracy, parameters "
            "and CPU latency of all four. Writes the ESD plot of the first layer, the compressed model and a "
            "summary to --out. Uses scikit-learn's 8x8 digits when MNIST is not available."
        ),
    )
    p.add_argument(
        "--out", default="rmtprune-demo", metavar="DIR", help="output directory (default: %(default)s)"
    )
    p.add_argument("--data-dir", default=None, metavar="DIR", help="directory holding mnist/ (IDX files)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument(
        "--force", action="store_true", help="overwrite files in --out that rmtprune did not write"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_out(args: argparse.Namespace) -> None:
    """Refuse, before training, to replace files in --out that rmtprune did not write."""
    from pathlib import Path

    from .._outputs import Output, check_outputs

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    if not out.is_dir():
        return
    files = [
        ("model.safetensors", "weights"),
        ("model.json", "manifest"),
        ("summary.json", "report-json"),
        ("summary.md", "report-md"),
        ("esd_fc1.png", "plot"),
    ]
    check_outputs([Output(out / n, k, f"--out file {n!r}") for n, k in files], force=args.force)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _load(data_dir: str | None) -> str:
    """``"mnist"`` if its files are on disk or can be downloaded, else ``"digits"`` (with a notice)."""
    from ..errors import RmtpruneError
    from ..zoo.data import load_dataset

    try:
        load_dataset("mnist", "train", data_dir=data_dir, download=False)
        return "mnist"
    except RmtpruneError:
        pass
    _say("MNIST files not found locally; trying to download them (11 MB)...")
    try:
        load_dataset("mnist", "train", data_dir=data_dir, download=True)
        return "mnist"
    except RmtpruneError as exc:
        _say(f"could not get MNIST: {exc}")
        _say(
            "falling back to scikit-learn's bundled 8x8 digits (1797 images): "
            "the numbers will differ from MNIST's"
        )
        return "digits"


def latency_ms(
    model: Any, input_shape: tuple[int, ...], batch: int = LATENCY_BATCH, repeats: int = 30
) -> float:
    """Median wall time (ms) of one forward pass on a batch, CPU, no grad, after warm-up."""
    import torch

    x = torch.randn(batch, *input_shape)
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def finetune(model: Any, data: Any, epochs: int, lr: float, seed: int, batch_size: int = DEMO_BATCH) -> Any:
    """A few epochs of plain SGD (momentum 0.9) on ``data``, in place, through the library's one
    fine-tune loop (:func:`rmtprune.finetune.finetune` with an SGD optimizer); returns the model."""
    import math

    import torch

    from ..finetune import finetune as _finetune
    from ..zoo.data import FastLoader

    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(data) / batch_size)
    _finetune(
        model,
        lambda: FastLoader(data, batch_size, shuffle=True, generator=gen),
        steps=steps,
        lr=lr,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
    )
    model.eval()
    return model


def _table(rows: list[list[str]]) -> str:
    """The before/after table: the first column left, the numbers right-aligned."""
    from .._format import table

    return table(rows[0], rows[1:], right=range(1, len(rows[0])))


def run(args: argparse.Namespace) -> int:
    """Run ``rmtprune demo``: train, measure, compress, measure, fine-tune both, measure, report."""
    import copy

    import torch

    from .. import compress, save
    from ..training import writable_dir
    from ..zoo.data import load_dataset

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    _check_out(args)
    out = writable_dir(args.out)

    dataset = _load(args.data_dir)
    model, epochs = _train_dense(args, dataset)
    seconds = {"train": time.perf_counter() - t_start}
    test = load_dataset(dataset, "test", data_dir=args.data_dir)
    shape = tuple(test.input_shape)
    before = _measure(model, test, shape)
    esd = _esd(model, out)
    dense = copy.deepcopy(model)  # the control: gets the same fine-tune as the compressed model

    t0 = time.perf_counter()
    model, report = compress(model)
    seconds["compress"] = time.perf_counter() - t0
    after = _measure(model, test, shape)
    ft_epochs = DEMO_FINETUNE[dataset]
    train_ds = load_dataset(dataset, "train", data_dir=args.data_dir)
    _say(
        f"fine-tuning the compressed model and, identically, the dense one: {ft_epochs} epoch(s) of SGD "
        f"(lr {DEMO_FINETUNE_LR:g}, momentum 0.9, batch {DEMO_BATCH}, seed {args.seed})..."
    )
    t0 = time.perf_counter()
    finetune(model, train_ds, ft_epochs, DEMO_FINETUNE_LR, args.seed)
    seconds["finetune"] = time.perf_counter() - t0
    tuned = _measure(model, test, shape, latency=after["latency_ms"])
    t0 = time.perf_counter()
    finetune(dense, train_ds, ft_epochs, DEMO_FINETUNE_LR, args.seed)
    seconds["finetune_dense"] = time.perf_counter() - t0
    dense_tuned = _measure(dense, test, shape, latency=before["latency_ms"])
    del dense
    save(
        model,
        out / "model.safetensors",
        plan=report,
        factory=DEMO_MODEL,
        factory_args={"input_shape": list(shape), "num_classes": int(test.num_classes)},
    )
    seconds["total"] = time.perf_counter() - t_start
    runs = {"before": before, "dense_tuned": dense_tuned, "after": after, "tuned": tuned}
    sizes = {"train": len(train_ds), "test": len(test)}
    _finish(out, dataset, epochs, (ft_epochs, args.seed), runs, sizes, report, esd, seconds)
    return 0


def _train_dense(args: argparse.Namespace, dataset: str) -> tuple[Any, int]:
    """The dense MLP the demo compresses, trained with the demo's SGD recipe."""
    from ..training import train

    epochs = DEMO_EPOCHS[dataset]
    _say(f"training MLP {DEMO_MODEL} on {dataset} for {epochs} epochs (SGD, lr {DEMO_LR}, momentum 0.9)...")
    result = train(
        dataset=dataset,
        model=DEMO_MODEL,
        epochs=epochs,
        lr=DEMO_LR,
        momentum=0.9,
        batch_size=DEMO_BATCH,
        seed=args.seed,
        prune=False,
        track_spectra=False,
        data_dir=args.data_dir,
        log=lambda line: _say("  " + line),
        progress_bar=False if args.no_progress else None,
    )
    return result.model, epochs


def _measure(model: Any, test: Any, shape: tuple[int, ...], latency: float | None = None) -> dict[str, Any]:
    """Test accuracy and loss, parameters and latency (measured unless given) of ``model``."""
    from ..finetune import evaluate
    from ..zoo.data import batches

    res = evaluate(model, lambda: batches(test, 1024), reduction="sum")
    return {
        "test_acc": res["accuracy"],
        "test_loss": res["loss"],
        "params": sum(p.numel() for p in model.parameters()),
        "latency_ms": latency_ms(model, shape) if latency is None else latency,
    }


def _esd(model: Any, out: Path) -> tuple[str, Any, Path | None]:
    """The first linear layer's analysis and its ESD plot (None when it has no fit)."""
    import torch

    from ..analysis import analyze_tensor
    from ..plotting import plot_esd

    first = next(name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear))
    layer = analyze_tensor(first, model.get_submodule(first).weight)
    path = plot_esd(layer, out / f"esd_{first}.png") if layer.fit is not None else None
    return first, layer, path


def _rows(runs: dict[str, dict], ft_epochs: int) -> list[list[str]]:
    """The table: dense and compressed, each before and after the same fine-tune, and the
    compressed-minus-dense change at equal training (without, then with the fine-tune)."""

    def row(label: str, m: dict) -> list[str]:
        acc, loss, n, lat = m["test_acc"], m["test_loss"], m["params"], m["latency_ms"]
        return [label, f"{100 * acc:.2f}%", f"{loss:.4f}", f"{n:,}", f"{lat:.2f} ms"]

    def change(label: str, dense: dict, comp: dict) -> list[str]:
        return [
            label,
            f"{100 * (comp['test_acc'] - dense['test_acc']):+.2f} pt",
            f"{comp['test_loss'] - dense['test_loss']:+.4f}",
            f"{100 * (comp['params'] / dense['params'] - 1):+.1f}%",
            f"{dense['latency_ms'] / comp['latency_ms']:.1f}x faster",
        ]

    ft = f"+ fine-tune ({ft_epochs} ep)"
    return [
        ["", "test accuracy", "test loss", "parameters", f"latency (batch {LATENCY_BATCH}, median)"],
        row("dense", runs["before"]),
        row(f"dense {ft}", runs["dense_tuned"]),
        row("compressed (the cut)", runs["after"]),
        row(f"compressed {ft}", runs["tuned"]),
        change("change, no fine-tune", runs["before"], runs["after"]),
        change("change, both fine-tuned", runs["dense_tuned"], runs["tuned"]),
    ]


def _finish(
    out: Path,
    dataset: str,
    epochs: int,
    finetune_run: tuple[int, int],
    runs: dict[str, dict],
    sizes: dict[str, int],
    report: Any,
    esd: tuple[str, Any, Path | None],
    seconds: dict[str, float],
) -> None:
    """Print the table and the compression report, and write summary.json and summary.md."""
    import torch

    from .._atomic import atomic_write_text

    ft_epochs, seed = finetune_run
    before, after, tuned, dense_tuned = runs["before"], runs["after"], runs["tuned"], runs["dense_tuned"]
    table = _table(_rows(runs, ft_epochs))
    delta = 100 * (tuned["test_acc"] - dense_tuned["test_acc"])
    headline = (
        f"compressed + fine-tune vs dense + the same fine-tune: {delta:+.2f} pt test accuracy "
        f"({100 * tuned['test_acc']:.2f}% vs {100 * dense_tuned['test_acc']:.2f}%), "
        f"{100 * (tuned['params'] / before['params'] - 1):+.1f}% parameters"
    )
    _say("")
    _say(
        f"MLP {DEMO_MODEL} on {dataset}, compressed with the default RMT rule "
        f"(spikes above the MP edge kept); both models then get the same {ft_epochs}-epoch fine-tune:"
    )
    _say(table)
    _say(headline)
    _say("")
    for line in _report_lines(report):
        _say(("  " + line).rstrip())
    summary = {
        "format": "rmtprune-demo-summary",
        "dataset": dataset,
        "model": DEMO_MODEL,
        "epochs": epochs,
        "data": {"train_split": "train", "train_size": sizes["train"], "test_size": sizes["test"]},
        "before": before,
        "after": after,
        "finetuned": {"epochs": ft_epochs, **{k: tuned[k] for k in ("test_acc", "test_loss", "params")}},
        "dense_finetuned": {
            "epochs": ft_epochs,
            **{k: dense_tuned[k] for k in ("test_acc", "test_loss", "params")},
        },
        "finetune": {
            "epochs": ft_epochs,
            "lr": DEMO_FINETUNE_LR,
            "momentum": 0.9,
            "batch_size": DEMO_BATCH,
            "seed": seed,
            "split": "train",
            "applied_to": ["compressed", "dense"],
        },
        "dense_acc": before["test_acc"],
        "dense_finetuned_acc": dense_tuned["test_acc"],
        "compressed_acc": after["test_acc"],
        "compressed_finetuned_acc": tuned["test_acc"],
        "delta_pt_vs_dense": round(100 * (after["test_acc"] - before["test_acc"]), 6),
        "delta_pt_vs_dense_finetuned": round(delta, 6),
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", "# rmtprune demo\n\n```\n" + table + "\n```\n\n" + headline + "\n")
    _say("")
    first, layer, path = esd
    if path is not None:
        _say(f"ESD of layer {first!r}: {path}")
    else:
        _say(f"no ESD plot: layer {first!r} has no fit ({layer.verdict}: {layer.message})")
    _say(f"compressed, fine-tuned model: {out / 'model.safetensors'}; summary: {out / 'summary.json'}")
    _say(
        f"done in {seconds['total']:.0f} s (training {seconds['train']:.0f} s, compression "
        f"{seconds['compress']:.1f} s, fine-tuning {seconds['finetune']:.0f} s + "
        f"{seconds['finetune_dense']:.0f} s (dense); torch threads: "
        f"{torch.get_num_threads()})"
    )


def _report_lines(report: Any) -> list[str]:
    """The compression report's per-layer table."""
    return report.table().rstrip().splitlines()
