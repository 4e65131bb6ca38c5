"""``rmtprune sparsify``: prune a model's weights to a global sparsity with RMT-guided budgets.

Same input/output conventions as ``rmtprune compress``. Input: ``--model MODULE:FACTORY`` (a
zero-argument callable returning the ``nn.Module``) or a reference model spec (``--model
vit:dim=64,depth=4 --dataset fashion-mnist``), with optional ``--weights FILE`` (safetensors or
an rmtprune model file, or a torch state dict loaded with ``weights_only=True``); or
``MODEL_FILE``, a file written by ``rmtprune compress`` or ``rmtprune sparsify`` whose manifest
records how to rebuild the model (factored layers and masks included). Output: ``OUT``
(``.safetensors``, sparse layers stored sparsely, manifest embedded), ``OUT`` with suffix
``.json`` (the manifest), and the report as ``<stem>.report.json`` and ``<stem>.report.md``.
Output paths are checked before any work and the four files renamed into place only when all are
written, as in ``rmtprune compress`` (see ``docs/security.md``). The summary line gives two counts:
the *nonzero values* kept and what is *stored incl. index bytes* (values plus each pruned weight's
bitmask/CSR pattern, in bytes and parameter-equivalents). ``--device cuda[:N]`` runs the fits'
upcast SVDs, the calibration and the fine-tuning with the model on a GPU, as in ``rmtprune compress``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._calibration import add_calibration_args, calibration_batches
from ._model_input import (
    add_model_args,
    add_safety_flags,
    check_dir_outputs,
    check_model_outputs,
    check_trainable_dtype,
    inputs_on,
    is_model_dir,
    model_from_args,
    to_device,
    write_model_outputs,
)
from ._options import add_device_flag, add_flags, check_device, given

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
    "--noise": ("noise", str, None),
    "--cycle-steps": ("cycle_steps", int, "N"),
    "--l1": ("l1", float, "MU1"),
    "--l2": ("l2", float, "MU2"),
    "--group-lasso": ("group_lasso", float, "MU"),
    "--finetune-epochs": ("finetune_epochs", float, "E"),
    "--lr": ("lr", float, "LR"),
    "--lr-schedule": ("schedule", str, None),
    "--warmup": ("warmup", float, "F"),
    "--storage": ("storage", str, None),
    "--score": ("score", str, None),
    "--allocation": ("allocation", str, None),
    "--budget-range": ("budget_range", float, "R"),
    "--rmt-metric": ("rmt_metric", str, None),
    "--outlier-m": ("outlier_m", float, "M"),
    "--alpha-fit": ("alpha_fit", str, None),
}
#: The SparsifyConfig fields set by the pattern and on/off options.
_OTHER_FIELDS = ("include", "exclude", "sv_sparsify", "refit", "protect_last")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sparsify`` and its options."""
    import dataclasses

    from ..finetune import SCHEDULES
    from ..sparsity import SparsifyConfig, budget_names
    from ..sparsity.config import STORAGE
    from ..sparsity.layerwise import ALLOCATIONS, ALPHA_FITS, RMT_METRICS
    from ..sparsity.scores import SCORES

    fields = dataclasses.fields(SparsifyConfig)
    helps = {f.name: f.metadata.get("help", "") for f in fields}
    # Floats shown with :g in the help ("0.00133333", "1e-06").
    shown = {f.name: f"{f.default:g}" for f in fields if isinstance(f.default, float)}
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
    add_model_args(p)
    p.add_argument("--config", metavar="JSON", help="SparsifyConfig as a JSON file (flags override it)")
    choices = {
        "budget": budget_names(),
        "storage": STORAGE,
        "schedule": SCHEDULES,
        "score": SCORES,
        "allocation": ALLOCATIONS,
        "rmt_metric": RMT_METRICS,
        "alpha_fit": ALPHA_FITS,
    }
    add_flags(p, SparsifyConfig, _FLAGS, choices=choices, defaults=shown)
    add_calibration_args(p)
    p.add_argument(
        "--include", action="append", metavar="PATTERN", default=argparse.SUPPRESS, help=helps["include"]
    )
    p.add_argument(
        "--exclude", action="append", metavar="PATTERN", default=argparse.SUPPRESS, help=helps["exclude"]
    )
    p.add_argument(
        "--no-sv",
        dest="sv_sparsify",
        action="store_false",
        default=argparse.SUPPRESS,
        help="skip the singular-vector step",
    )
    p.add_argument(
        "--refit", dest="refit", action="store_true", default=argparse.SUPPRESS, help=helps["refit"]
    )
    p.add_argument(
        "--protect-last",
        dest="protect_last",
        action="store_true",
        default=argparse.SUPPRESS,
        help=helps["protect_last"] + " (off by default)",
    )
    p.add_argument(
        "--dataset",
        metavar="NAME",
        help="fine-tune on this dataset's train split, evaluate on its test split (and shape --model specs)",
    )
    p.add_argument("--input-shape", metavar="C,H,W", help="input shape for a --model spec without --dataset")
    p.add_argument(
        "--num-classes", type=int, metavar="N", help="classes for a --model spec without --dataset"
    )
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset files")
    p.add_argument("--batch-size", type=int, default=128, metavar="N", help="fine-tuning batch size (128)")
    p.add_argument("--train-subset", type=int, metavar="N", help="fine-tune on the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning batch order (0)")
    p.add_argument(
        "--report", metavar="PREFIX", help="report paths PREFIX.json and PREFIX.md (default: OUT's)"
    )
    add_safety_flags(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the per-layer plan; modify and write nothing"
    )
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_flag(p, "sparsify")
    return p


def _config(args: argparse.Namespace) -> Any:
    from ..sparsity import SparsifyConfig

    base: dict[str, Any] = {}
    if args.config:
        try:
            base = SparsifyConfig.from_json(Path(args.config).read_text()).to_dict()
        except OSError as exc:
            raise OSError(f"cannot read --config {args.config!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"--config {args.config!r}: {exc}") from None
    base.update(given(args, [f for f, _, _ in _FLAGS.values()] + list(_OTHER_FIELDS)))
    return SparsifyConfig(**base)


def _data(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    """Fine-tuning and evaluation batches, the splits moved once to the model's device, the images
    in its dtype (the batch order is drawn on the CPU: the same on every device)."""
    if not args.dataset:
        return None, None
    import dataclasses

    import torch

    from ..zoo.data import FastLoader, load_dataset

    train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    if args.train_subset:
        train = train.subset(args.train_subset)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    [x_train, x_test] = inputs_on([train.x, test.x], model)  # type: ignore[misc]
    train = dataclasses.replace(train, x=x_train, y=train.y.to(x_train.device))
    test = dataclasses.replace(test, x=x_test, y=test.y.to(x_test.device))
    gen = torch.Generator().manual_seed(args.seed)
    return FastLoader(train, args.batch_size, shuffle=True, generator=gen), FastLoader(test, 1000)


def run(args: argparse.Namespace) -> int:
    """Run ``rmtprune sparsify``."""
    from .. import __version__
    from .. import io as rio
    from .._format import dumps
    from ..sparsity import plan_sparsity, sparsify

    if len(args.paths) > 2:
        raise ValueError(f"expected [MODEL_FILE] OUT, got {len(args.paths)} paths")
    src, out = (args.paths[0], args.paths[1]) if len(args.paths) == 2 else (None, args.paths[0])
    config = _config(args)
    device = check_device(args.device, "sparsify")
    show = False if args.no_progress else None
    directory = is_model_dir(src)
    out_path = Path(out).expanduser()
    if directory:
        if args.report:
            raise ValueError("--report goes with file outputs; a model directory holds its report.json/.md")
        if not args.dry_run:
            out_path, report_json, report_md = check_dir_outputs(args, src, out)  # type: ignore[arg-type]
    else:
        if out_path.suffix != ".safetensors":
            raise ValueError(f"OUT {out!r} must end in .safetensors")
        prefix = args.report or str(out_path.with_suffix("")) + ".report"
        report_json, report_md = Path(prefix + ".json").expanduser(), Path(prefix + ".md").expanduser()
        if not args.dry_run:
            check_model_outputs(args, src, out_path, report_json, report_md)
    model, factory, fargs, _ = model_from_args(args, src)
    calib = calibration_batches(args, src if directory else None, args.data_dir)
    model = to_device(model, device)
    calib = inputs_on(calib, model)
    if args.dry_run:
        plan = plan_sparsity(model, config, show=show, calibration=calib).report()
        print(plan.table() if not args.quiet else plan.summary())
        if not args.quiet:
            print(plan.summary())
        for w in plan.warnings:
            print(f"rmtprune: warning: {w}", file=sys.stderr)
        print("dry run: nothing written")
        return 0
    data, eval_data = _data(args, model)
    if data is not None and (config.cycle_steps > 0 or config.finetune_epochs > 0):
        check_trainable_dtype(model, "--dataset (fine-tuning)")
    model, report = sparsify(
        model, config, data=data, eval_data=eval_data, show_progress=show, calibration=calib
    )
    body = {"format": "rmtprune-sparsify-report", "rmtprune_version": __version__}
    body.update(report.to_dict())
    texts = (dumps(body, indent=2, sort_keys=True) + "\n", report.to_markdown())
    size = write_model_outputs(
        model,
        out_path,
        report_json,
        report_md,
        factory=factory,
        factory_args=fargs,
        reports=lambda _: texts,
        src=src,
        force=args.force,
        storage=config.storage,
    )
    if not args.quiet:
        print(report.table())
        print()
    for w in report.warnings:
        print(f"rmtprune: warning: {w}", file=sys.stderr)
    print(report.summary())
    if directory:
        print(f"wrote {out_path}/ ({size / 1024:.1f} KiB of weights; load it with rmtprune.load(DIR))")
    else:
        print(
            f"wrote {out_path} ({size / 1024:.1f} KiB), {rio.manifest_path(out_path).name}, "
            f"{report_json}, {report_md}"
        )
    return 0
