"""``rmtprune sparsify``: prune a model's weights to a global sparsity with RMT-guided budgets.

Input: ``--model MODULE:FACTORY`` (a zero-argument callable returning the ``nn.Module``) or a
reference model spec (``--model vit:dim=64,depth=4 --dataset fashion-mnist``), with optional
``--weights FILE`` (safetensors, sparse or not, or a torch state dict); or a file written by
``rmtprune sparsify`` (it records how to rebuild its model) or by ``rmtprune compress`` as the
first positional argument. Output: ``OUT`` (safetensors, sparse layers stored sparsely), plus
``OUT``'s report as JSON and Markdown; every file is written atomically.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

#: CLI flag -> (SparsifyConfig field, type, metavar).
_FLAGS: dict[str, tuple[str, type, str | None]] = {
    "--target": ("target", float, "S"),
    "--budget": ("budget", str, None),
    "--cycles": ("n_cycles", int, "N"),
    "--max-layer-sparsity": ("max_layer_sparsity", float, "S"),
    "--budget-power": ("budget_power", float, "P"),
    "--theta": ("theta", float, "THETA"),
    "--c-min": ("c_min", float, "C"),
    "--q": ("q", float, "Q"),
    "--alpha": ("alpha", float, "A"),
    "--beta": ("beta", float, "B"),
    "--ks-max": ("ks_max", float, "KS"),
    "--cycle-steps": ("cycle_steps", int, "N"),
    "--l1": ("l1", float, "MU1"),
    "--l2": ("l2", float, "MU2"),
    "--group-lasso": ("group_lasso", float, "MU"),
    "--finetune-epochs": ("finetune_epochs", float, "E"),
    "--lr": ("lr", float, "LR"),
    "--storage": ("storage", str, None),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sparsify`` and its options."""
    import dataclasses

    from ..sparsify import BUDGETS, SparsifyConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SparsifyConfig)}
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(SparsifyConfig)}
    p = subparsers.add_parser(
        "sparsify",
        help="prune weights to a global sparsity with RMT-guided per-layer budgets",
        description=(
            "Sparsify the Linear/Conv layers of a model (Berlyand et al. 2025): sparsify the singular "
            "vectors of the noise part, prune by magnitude with per-layer budgets set by the Marchenko-"
            "Pastur fit, over cycles with a growing target; with --dataset, regularised fine-tuning per "
            "cycle and a short fine-tune. Writes OUT (sparse safetensors) and its report."
        ),
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[INPUT] OUT",
        help="INPUT: a model file written by rmtprune (omit it with --model); OUT: output .safetensors",
    )
    p.add_argument("--model", metavar="MODULE:FACTORY|SPEC", help="model factory or reference model spec")
    p.add_argument("--weights", metavar="FILE", help="weights for --model (safetensors or torch state dict)")
    p.add_argument("--config", metavar="JSON", help="SparsifyConfig as a JSON file (flags override it)")
    choices = {"budget": BUDGETS, "storage": ("auto", "bitmask", "csr")}
    for flag, (name, typ, metavar) in _FLAGS.items():
        p.add_argument(
            flag,
            dest=name,
            type=typ,
            metavar=metavar,
            choices=choices.get(name),
            default=argparse.SUPPRESS,
            help=f"{helps[name]} (default: {defaults[name]:g})"
            if isinstance(defaults[name], float)
            else f"{helps[name]} (default: {defaults[name]})",
        )
    p.add_argument(
        "--include", action="append", metavar="REGEX", default=argparse.SUPPRESS, help=helps["include"]
    )
    p.add_argument(
        "--exclude", action="append", metavar="REGEX", default=argparse.SUPPRESS, help=helps["exclude"]
    )
    p.add_argument(
        "--no-sv", dest="sv_sparsify", action="store_false", default=argparse.SUPPRESS, help="skip step 1"
    )
    p.add_argument(
        "--refit", dest="refit", action="store_true", default=argparse.SUPPRESS, help=helps["refit"]
    )
    p.add_argument(
        "--dataset", metavar="NAME", help="fine-tune on this dataset's train split, evaluate on test"
    )
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset files")
    p.add_argument("--batch-size", type=int, default=128, metavar="N", help="fine-tuning batch size (128)")
    p.add_argument("--train-subset", type=int, metavar="N", help="fine-tune on the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning batch order (0)")
    p.add_argument(
        "--report", metavar="PREFIX", help="report paths PREFIX.json and PREFIX.md (default: OUT's)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the per-layer plan; modify and write nothing"
    )
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace) -> Any:
    from ..sparsify import SparsifyConfig

    base: dict[str, Any] = {}
    if args.config:
        try:
            base = SparsifyConfig.from_json(Path(args.config).read_text()).to_dict()
        except OSError as exc:
            raise OSError(f"cannot read --config {args.config!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"--config {args.config!r}: {exc}") from None
    names = [f for f, _, _ in _FLAGS.values()] + ["include", "exclude", "sv_sparsify", "refit"]
    for name in names:
        if hasattr(args, name):
            base[name] = getattr(args, name)
    return SparsifyConfig(**base)


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {spec!r} must be MODULE:FACTORY or a model spec such as vit:dim=64")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"--model {spec!r}: {attr!r} is not callable")
    return obj


def _build(spec: str, dataset: str | None, data_dir: str | None) -> Any:
    from torch import nn

    from ..models import MODEL_FAMILIES, build_model

    family = spec.partition(":")[0].strip().lower()
    if family in MODEL_FAMILIES:
        if not dataset:
            raise ValueError(
                f"--model {spec!r} is a reference model spec: give --dataset for its input shape"
            )
        from ..data import load_dataset

        ds = load_dataset(dataset, "test", data_dir=data_dir)
        return build_model(spec, ds.input_shape, ds.num_classes)
    model = _import_factory(spec)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_weights(model: Any, path: str) -> None:
    import torch

    from ..errors import CheckpointError
    from ..sparse_format import load_model

    if not Path(path).is_file():
        raise CheckpointError(f"--weights {path!r} does not exist")
    if path.endswith(".safetensors"):
        load_model(path, model)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"--weights {path!r} is not a readable torch state dict ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"--weights {path!r} does not fit the model: {str(exc).splitlines()[0]}"
        ) from None


def _load_input(args: argparse.Namespace, src: str | None) -> tuple[Any, dict[str, Any]]:
    """The model to sparsify and how to rebuild it (recorded in OUT's metadata)."""
    from ..errors import CheckpointError

    if args.model:
        if src is not None:
            raise ValueError("give either INPUT or --model, not both")
        model = _build(args.model, args.dataset, args.data_dir)
        if args.weights:
            _load_weights(model, args.weights)
        return model, {"model": args.model, "dataset": args.dataset}
    if src is None:
        raise ValueError("give INPUT (a model file written by rmtprune) or --model MODULE:FACTORY")
    if args.weights:
        raise ValueError("--weights goes with --model; INPUT already holds the weights")
    from ..sparse_format import load_model, load_sparse

    if not Path(src).is_file():
        raise CheckpointError(f"INPUT {src!r} does not exist")
    meta: dict[str, Any] = {}
    try:
        _, _, meta = load_sparse(src)
    except CheckpointError:
        meta = {}
    if meta.get("model"):  # written by rmtprune sparsify: rebuild from its recorded factory
        model = _build(meta["model"], meta.get("dataset") or args.dataset, args.data_dir)
        load_model(src, model)
        return model, {"model": meta["model"], "dataset": meta.get("dataset") or args.dataset}
    try:
        from .. import io as rio
    except ImportError:
        raise CheckpointError(
            f"INPUT {src!r} records no model factory; use --model MODULE:FACTORY --weights {src}"
        ) from None
    model = rio.load(src)
    return model, {"source": str(src)}


def _data(args: argparse.Namespace) -> tuple[Any, Any]:
    if not args.dataset:
        return None, None
    import torch

    from ..data import batches, load_dataset

    train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    if args.train_subset:
        train = train.subset(args.train_subset)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    gen = torch.Generator().manual_seed(args.seed)
    return batches(train, args.batch_size, shuffle=True, generator=gen), batches(test, 1000)


def run(args: argparse.Namespace) -> int:
    """Run ``rmtprune sparsify``."""
    from .._atomic import atomic_write_text, check_writable_dir
    from ..sparse_format import save_model
    from ..sparsify import plan_sparsity, sparsify

    if len(args.paths) > 2:
        raise ValueError(f"expected [INPUT] OUT, got {len(args.paths)} paths")
    src, out = (args.paths[0], args.paths[1]) if len(args.paths) == 2 else (None, args.paths[0])
    config = _config(args)
    show = False if args.no_progress else None
    if not out.endswith(".safetensors"):
        raise ValueError(f"OUT {out!r} must end in .safetensors")
    prefix = args.report or str(Path(out).with_suffix("")) + ".report"
    if not args.dry_run:
        check_writable_dir(out)
        check_writable_dir(prefix + ".json")
    model, source = _load_input(args, src)
    if args.dry_run:
        report = plan_sparsity(model, config, show=show)
        print(report.table())
        print(report.summary())
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        return 0
    data, eval_data = _data(args)
    model, report = sparsify(model, config, data=data, eval_data=eval_data, show_progress=show)
    save_model(out, model, metadata={**source, "sparsify": config.to_dict()}, fmt=config.storage)
    atomic_write_text(prefix + ".json", report.to_json() + "\n")
    atomic_write_text(prefix + ".md", report.to_markdown())
    if not args.quiet:
        print(report.table())
        print()
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.summary())
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 1024:.1f} KiB), {prefix}.json, {prefix}.md")
    return 0
