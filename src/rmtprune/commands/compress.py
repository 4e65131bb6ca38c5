"""``rmtprune compress``: cut the noise of every prunable layer as low-rank factors and save the model.

Input: ``--model MODULE:FACTORY`` (a zero-argument callable returning the ``nn.Module``) or a
reference model spec (``--model mlp:1000 --dataset mnist``), with optional ``--weights FILE``
(safetensors, an rmtprune model file, or a torch state dict loaded with ``weights_only=True``);
or ``MODEL_FILE``, a file written by rmtprune whose manifest records how to rebuild the model.
Output: ``OUT`` (``.safetensors`` with the manifest embedded), ``OUT`` with suffix ``.json`` (the
manifest), and the report as ``<stem>.report.json`` and ``<stem>.report.md``. Every output path is
checked before any work (never a directory, never one of the inputs, never a file of that name that
rmtprune did not write unless ``--force``); the four files are written under temporary names and
renamed only when all are complete, so a failure or Ctrl-C leaves every file as it was, and
``OUT == MODEL_FILE`` re-cuts in place safely. ``--device cuda[:N]`` runs the whole command on a
GPU (:func:`._options.check_device`: no GPU is exit status 2, not a CPU fallback).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
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
    shape_arg,
    to_device,
    write_model_outputs,
)
from ._options import (
    add_compression_flags,
    add_device_flag,
    add_threads_flag,
    check_device,
    compression_overrides,
    set_threads,
)

_EPILOG = """\
actions: factor (replaced by two thin layers), dense-truncate (rank-k weight written back dense),
keep (analysed, left as is: no MP-like bulk, too small, or factoring would not pay), skip (not
analysed: unsupported type, grouped conv, or not selected by --include/--exclude).
patterns: shell globs on dotted layer names; a name without wildcards also matches as a suffix.
outputs: OUT (.safetensors), OUT.json (manifest), OUT.report.json and OUT.report.md (stem-based);
all renamed into place only when all are written; sidecars rmtprune did not write are never replaced
(--force overrides). A MODEL_FILE's recorded MODULE:FACTORY is not run unless --trust-factory.
device: --device cuda[:N] moves the model, calibration and recovery to the GPU; SVDs run in
float32/64 there, a float16/bfloat16 model keeps its dtype; OUT is written from CPU tensors.
exit status: 0 done, 2 bad input or arguments (no prunable layer, bad file, missing directory,
--device not available).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``compress`` and its options."""
    p = subparsers.add_parser(
        "compress",
        help="replace noisy layers by low-rank factors (Marchenko-Pastur / BEMA rank)",
        description=(
            "Fit the Marchenko-Pastur bulk of every Linear/Conv1d/Conv2d layer, keep the spikes above\n"
            "the Tracy-Widom edge (plus --keep-bulk of the bulk), and store each layer whose rank drops\n"
            "as two thin layers. Prints the per-layer plan and totals; writes OUT and its report."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, optional_paths=True)
    p.add_argument("--dataset", metavar="NAME", help="dataset giving input shape and classes of a model spec")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset files")
    p.add_argument(
        "--input-shape", metavar="C,H,W", help="shape of one input sample, for conv MACs (and model specs)"
    )
    p.add_argument("--num-classes", type=int, metavar="N", help="output classes of a model spec")
    p.add_argument("--config", metavar="JSON", help="CompressionConfig as a JSON file (flags override it)")
    add_compression_flags(p, include_help="layers to compress", exclude_help="layers to leave")
    add_calibration_args(p, recover=True)
    add_safety_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the per-layer plan only; write nothing")
    p.add_argument("--quiet", action="store_true", help="print only the totals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_flag(p)
    add_device_flag(p, "compress")
    return p


# ---------------------------------------------------------------------- arguments
def _paths(args: argparse.Namespace) -> tuple[str | None, str | None]:
    paths = list(args.paths)
    if len(paths) > 2:
        raise ValueError(f"expected [MODEL_FILE] OUT, got {len(paths)} paths")
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) == 1:
        if args.model:
            return None, paths[0]
        if args.dry_run:
            return paths[0], None
        raise ValueError("give MODEL_FILE OUT, or --model MODULE:FACTORY with OUT")
    if args.model and args.dry_run:
        return None, None
    raise ValueError("give [MODEL_FILE] OUT (or --model MODULE:FACTORY --dry-run)")


def _config(args: argparse.Namespace) -> Any:
    from ..config import CompressionConfig

    base: dict[str, Any] = {}
    if args.config:
        try:
            base = CompressionConfig.from_json(Path(args.config)).to_dict()
        except (OSError, ValueError, TypeError) as exc:
            raise type(exc)(f"--config {args.config!r}: {exc}") from None
    base.update(compression_overrides(args))  # flags left out are absent (argparse.SUPPRESS)
    return CompressionConfig(**base)


# ---------------------------------------------------------------------- run
def _human_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _outputs(args: argparse.Namespace, ckpt: str | None, out: str) -> tuple[Path, Path, Path]:
    """Check OUT and its sidecars before any work: refuse inputs, directories, users' files.
    For a model directory, OUT is a directory holding the reports."""
    if ckpt is not None and is_model_dir(ckpt):
        return check_dir_outputs(args, ckpt, out)
    out_path = Path(out).expanduser()
    if out_path.suffix != ".safetensors":
        raise ValueError(f"OUT {out!r} must end in .safetensors")
    stem = out_path.with_suffix("")
    report_json, report_md = Path(f"{stem}.report.json"), Path(f"{stem}.report.md")
    check_model_outputs(args, ckpt, out_path, report_json, report_md)
    return out_path, report_json, report_md


def run(args: argparse.Namespace) -> int:
    """Run ``rmtprune compress``."""
    import torch

    set_threads(getattr(args, "threads", None))

    from .. import io as rio
    from ..surgery import apply, plan

    ckpt, out = _paths(args)
    config = _config(args)
    if args.calibration and config.target is None and config.target_macs is None:
        raise ValueError("--calibration needs a budget: add --target F (or --target-macs F)")
    if config.sequential and not args.calibration:
        raise ValueError("--sequential needs --calibration (the batches each block is refit on)")
    device = check_device(args.device, "compress")
    if out is not None and not args.dry_run:
        out_path, report_json, report_md = _outputs(args, ckpt, out)
    model, factory, fargs, size_before = model_from_args(args, ckpt)
    batches = calibration_batches(args, ckpt if is_model_dir(ckpt) else None, args.data_dir)
    model = to_device(model, device)
    batches = inputs_on(batches, model)
    if batches is not None and args.recover_steps and not args.dry_run:
        check_trainable_dtype(model, "--recover-steps")
    teacher = None
    if batches is not None and args.recover_steps and not args.dry_run:
        import copy

        teacher = copy.deepcopy(model)

    example = None
    shape = fargs.get("input_shape") or (shape_arg(args.input_shape) if args.input_shape else None)
    if shape:
        ref = next(model.parameters(), None)
        example = torch.zeros(1, *shape, dtype=ref.dtype if ref is not None else torch.float32, device=device)
    show = False if args.no_progress else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        the_plan = plan(
            model,
            config,
            example_input=example,
            progress=show,
            keep_svd=not args.dry_run,
            calibration=batches,
        )
    for w in caught:
        print(f"rmtprune: warning: {w.message}", file=sys.stderr)

    if args.dry_run:
        print(the_plan.table() if not args.quiet else "\n".join(the_plan.summary_lines()))
        print("dry run: nothing written")
        return 0
    if config.sequential:
        from ..surgery import apply_sequential

        apply_sequential(model, the_plan, batches, progress=show)
    else:
        apply(model, the_plan, progress=show)
    recovery = None
    if teacher is not None and not any(lp.action == "factor" for lp in the_plan):
        print("rmtprune: note: nothing was factored; --recover-steps skipped", file=sys.stderr)
        teacher = None
    if teacher is not None:
        from ..finetune import recover

        recovery = recover(
            model, teacher, batches, steps=args.recover_steps, lr=args.recover_lr, progress=show
        )
        recovery.pop("losses", None)  # the report keeps the summary, not one value per step
        del teacher

    def reports(size_after: int) -> tuple[str, str]:
        files = {"input": ckpt or args.weights, "size_before": size_before, "output": str(out_path)}
        files["size_after"] = size_after
        data = {"format": "rmtprune-compress-report", **the_plan.to_dict()}
        data["files"] = files
        data["recovery"] = recovery
        data["command"] = " ".join(["rmtprune", *sys.argv[1:]]) if sys.argv else "rmtprune compress"
        md = [
            f"# rmtprune compress: {out_path.name}",
            "",
            f"rmtprune {the_plan.rmtprune_version}, rule `{config.rule}`, config in `{report_json.name}`.",
            "",
            the_plan.to_markdown(),
            f"- file size: {_human_bytes(size_before)} -> {_human_bytes(size_after)}",
            "",
        ]
        return json.dumps(data, indent=2) + "\n", "\n".join(md)

    size_after = write_model_outputs(
        model,
        out_path,
        report_json,
        report_md,
        factory=factory,
        factory_args=fargs,
        reports=reports,
        plan=the_plan,
        src=ckpt,
        force=args.force,
    )
    if not args.quiet:
        print(the_plan.table(), end="")
    else:
        print("\n".join(the_plan.summary_lines()))
    if recovery is not None:
        print(
            f"recovery: {args.recover_steps} steps, loss {recovery.get('loss_start', float('nan')):.4g} -> "
            f"{recovery.get('loss_end', float('nan')):.4g}"
        )
    print(f"file size: {_human_bytes(size_before)} -> {_human_bytes(size_after)}")
    if is_model_dir(ckpt):
        print(f"wrote {out_path}/ (load it with rmtprune.load({str(out_path)!r}))")
    else:
        print(f"wrote {out_path}, {rio.manifest_path(out_path).name}, {report_json.name}, {report_md.name}")
    return 0
