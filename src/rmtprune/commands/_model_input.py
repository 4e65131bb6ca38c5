"""Model input shared by ``rmtprune compress`` and ``rmtprune sparsify``.

Both take either ``--model MODULE:FACTORY|SPEC [--weights FILE]`` or a MODEL_FILE written by
rmtprune (whose manifest records the factory), and record the factory in OUT's manifest. The model
is read on the CPU, moved to ``--device`` (:func:`to_device`) with its input batches
(:func:`inputs_on`), and moved back to the CPU before OUT is written (:func:`write_model_outputs`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "shape_arg",
    "factory_args",
    "build",
    "load_weights",
    "model_from_args",
    "add_model_args",
    "add_safety_flags",
    "check_model_outputs",
    "write_model_outputs",
    "to_device",
    "inputs_on",
    "check_trainable_dtype",
]


#: Values in one input sample (--input-shape): 2**28 is a 16k x 16k RGB image; more is a typo.
_MAX_INPUT = 2**28


def shape_arg(text: str) -> tuple[int, ...]:
    """Parse ``--input-shape C,H,W``."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape {text!r} must be comma-separated ints, e.g. 1,28,28") from None
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--input-shape {text!r} must be positive ints")
    if math.prod(shape) > _MAX_INPUT:
        raise ValueError(f"--input-shape {text!r} has more than {_MAX_INPUT:,} values per sample")
    return shape


def factory_args(args: argparse.Namespace) -> dict[str, Any]:
    """input_shape / num_classes for a reference model spec, from --dataset or the flags.

    The dataset's shape comes from :data:`rmtprune.data.SHAPES`, so its files are not needed
    (``compress --model mlp:1000 --dataset mnist`` works without the MNIST files).
    """
    out: dict[str, Any] = {}
    if args.dataset:
        from ..zoo.data import dataset_shape

        shape, classes = dataset_shape(args.dataset)
        out = {"input_shape": list(shape), "num_classes": classes}
    if args.input_shape:
        out["input_shape"] = list(shape_arg(args.input_shape))
    if args.num_classes is not None:
        out["num_classes"] = int(args.num_classes)
    return out


def build(spec: str, fargs: dict[str, Any]) -> Any:
    """Build the model of a factory string; a reference spec needs input shape and classes."""
    from .. import io as rio

    if not rio.is_reference_spec(spec):
        return rio.build_factory(spec)
    if not {"input_shape", "num_classes"} <= set(fargs):
        raise ValueError(
            f"--model {spec!r} is a reference model spec: give --dataset (or --input-shape and --num-classes)"
        )
    return rio.build_factory(spec, **fargs)


def load_weights(model: Any, path: str) -> None:
    """Load ``--weights``: an rmtprune/plain safetensors file or a torch state dict (weights_only)."""
    from .. import io as rio
    from ..errors import CheckpointError

    if not Path(path).is_file():
        raise CheckpointError(f"--weights {path!r} does not exist")
    if path.endswith(".safetensors"):
        rio.load(path, model)
        return
    # The hardened reader of `rmtprune analyze` (weights_only, structure walked, sparse/meta/
    # quantized tensors and oversized storages refused by name), not a bare torch.load.
    from ..weights_file import iter_tensors

    state = dict(iter_tensors(path))
    own = model.state_dict()
    for key, t in state.items():
        if key in own and own[key].is_floating_point() and not t.is_floating_point():
            raise CheckpointError(f"--weights {path!r}: tensor {key!r} is {t.dtype}, not a real float")
    rio.check_tensors(model, {k: tuple(v.shape) for k, v in state.items()}, Path(path))
    model.load_state_dict(state, strict=False)


def to_device(model: Any, device: Any) -> Any:
    """Move ``model`` (parameters, buffers, sparsity masks) to ``device`` in place; return it.

    Its dtype is kept: a float16/bfloat16 model stays one. The library works on the device the model
    is on, and upcasts each weight to float32/float64 for every SVD and eigenvalue step (METHOD.md
    section 2), then stores the factors back in the model's dtype.
    """
    return model.to(device)


def _model_dtype_device(model: Any) -> tuple[Any, Any]:
    """The dtype of the model's first floating-point parameter (float32 if none) and its device."""
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    p = next(model.parameters(), None)
    return torch.float32, p.device if p is not None else torch.device("cpu")


def _on(x: Any, device: Any, dtype: Any) -> Any:
    import torch

    if torch.is_tensor(x):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: _on(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on(v, device, dtype) for v in x)
    return x


def inputs_on(batches: list[Any] | None, model: Any) -> list[Any] | None:
    """Calibration ``batches`` on the model's device, floating-point tensors in its dtype (the dtype
    of its first floating parameter), moved once for the whole run; integer tensors (token ids,
    attention masks) keep their dtype. A float16/bfloat16 model is fed its own dtype, as a float32
    model is fed float32 images."""
    if batches is None:
        return None
    dtype, device = _model_dtype_device(model)
    return [_on(b, device, dtype) for b in batches]


def check_trainable_dtype(model: Any, flag: str) -> None:
    """``ValueError`` before any work when ``flag`` would train a float16 model: Adam (the optimizer
    of :func:`rmtprune.finetune.finetune` and :func:`~rmtprune.finetune.recover`) steps the weights
    in their own dtype, and in float16 its ``eps`` (1e-8) is 0, so the first zero gradient gives
    0/0 and the run diverges (measured: ``compress --recover-steps 3`` of a float16 MLP, NaN at step
    2). bfloat16 has float32's range and trains; the cut itself works in any dtype."""
    import torch

    if any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        raise ValueError(
            f"{flag} would train this float16 model in float16, where Adam diverges (its eps, 1e-8, is 0 "
            "in float16); give the model in bfloat16 or float32, or leave out the training"
        )


def _sidecar_unless_in_place(src: str | None, out_path: Path) -> Path | None:
    """MODEL_FILE's own ``.json`` manifest is an input too, except in a re-cut in place (OUT ==
    MODEL_FILE), where it is OUT's manifest and is replaced with it."""
    from .. import io as rio

    if src is None or not src.endswith(".safetensors"):
        return None
    if Path(src).expanduser().resolve() == out_path.resolve():
        return None
    return rio.manifest_path(Path(src).expanduser())


def check_model_outputs(
    args: argparse.Namespace, src: str | None, out_path: Path, report_json: Path, report_md: Path
) -> None:
    """Check OUT, its manifest and the two reports before any work (docs/security.md): none a
    directory or an input (OUT may be MODEL_FILE: a re-cut in place), none a user's file unless
    ``--force``."""
    from .. import io as rio
    from .._outputs import Output, check_outputs

    check_outputs(
        [
            Output(out_path, "out", "OUT"),
            Output(rio.manifest_path(out_path), "manifest", "OUT's manifest"),
            Output(report_json, "report-json", "the JSON report"),
            Output(report_md, "report-md", "the Markdown report"),
        ],
        inputs=[src, _sidecar_unless_in_place(src, out_path), args.weights, args.config],
        force=args.force,
        in_place=Path(src).expanduser() if src else None,
    )


def write_model_outputs(
    model: Any,
    out_path: Path,
    report_json: Path,
    report_md: Path,
    *,
    factory: str,
    factory_args: dict[str, Any],
    reports: Callable[[int], tuple[str, str]],
    plan: Any = None,
    src: str | None = None,
    force: bool = False,
    storage: str = "auto",
) -> int:
    """Write OUT, its manifest and the two reports as one group (the paths checked by
    :func:`check_model_outputs`): each under a temporary name, all renamed into place only when all
    are complete, so a failure or Ctrl-C leaves OUT (even OUT == MODEL_FILE) and its sidecars as they
    were. The model is moved to the CPU first (in place; its dtype kept). ``reports(size_of_OUT)``
    gives the JSON and Markdown texts; ``storage`` is the sparse format of masked weights
    (:func:`rmtprune.io.save`). Returns OUT's size in bytes.

    When the input ``src`` is a model directory, OUT is a directory (checked by
    :func:`check_dir_outputs`) holding the weights and the reports: see :func:`_write_dir_outputs`."""
    model.to("cpu")  # OUT is written from CPU tensors, whatever device the command ran on
    if is_model_dir(src):
        return _write_dir_outputs(
            model,
            out_path,
            src,  # type: ignore[arg-type]
            plan=plan,
            force=force,
            reports=reports,
            storage=storage,
        )
    from .. import io as rio
    from .._atomic import atomic_paths
    from ..errors import RmtpruneError

    targets = [out_path, rio.manifest_path(out_path), report_json, report_md]
    with atomic_paths(targets) as (tmp_w, tmp_j, tmp_rj, tmp_rm):
        rio.write_model(
            model, tmp_w, tmp_j, plan=plan, factory=factory, factory_args=factory_args, storage=storage
        )
        size = os.path.getsize(tmp_w)
        json_text, md_text = reports(size)
        try:
            tmp_rj.write_text(json_text, encoding="utf-8")
            tmp_rm.write_text(md_text, encoding="utf-8")
        except OSError as exc:
            raise RmtpruneError(f"could not write the report: {exc.strerror or exc}") from exc
    return size


def add_model_args(parser: argparse.ArgumentParser, *, optional_paths: bool = False) -> None:
    """The model input every model command takes: ``[MODEL_FILE] OUT``, ``--model``, ``--weights``.

    ``optional_paths`` lets the command run with no path at all (``compress --dry-run``).
    """
    parser.add_argument(
        "paths",
        nargs="*" if optional_paths else "+",
        metavar="[MODEL_FILE] OUT",
        help=(
            "MODEL_FILE: a model file written by rmtprune (omit it with --model), or a Hugging Face model "
            "directory (config.json + safetensors; needs rmtprune[hf]); OUT: output .safetensors, or a "
            "directory when the input is one"
        ),
    )
    parser.add_argument(
        "--model", metavar="MODULE:FACTORY|SPEC", help="model factory or reference model spec"
    )
    parser.add_argument(
        "--weights", metavar="FILE", help="weights for --model (safetensors or torch state dict)"
    )


def add_safety_flags(p: argparse.ArgumentParser) -> None:
    """``--trust-factory`` (let a MODEL_FILE's recorded ``MODULE:FACTORY`` be imported and called)
    and ``--force`` (replace sidecars of OUT's name that rmtprune did not write)."""
    p.add_argument(
        "--trust-factory",
        action="store_true",
        help=(
            "build MODEL_FILE's model with the MODULE:FACTORY its manifest records, which imports and "
            "runs that code (off by default: only rmtprune's mlp/cnn/vit specs are built from a file; "
            "see docs/security.md)"
        ),
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite sidecar/report files of OUT's name even when rmtprune did not write them",
    )


def model_from_args(args: argparse.Namespace, ckpt: str | None) -> tuple[Any, str, dict[str, Any], int]:
    """The model the command line names (MODEL_FILE, or ``--model`` with ``--weights``), its factory
    (for OUT's manifest), factory args, and the input's size in bytes.

    A MODEL_FILE's own factory is built only when it is a reference spec, or with
    ``--trust-factory``: a file never makes rmtprune import code by itself (docs/security.md).
    """
    from .. import io as rio
    from ..errors import CheckpointError

    fargs = factory_args(args)
    if ckpt is not None and Path(ckpt).expanduser().is_dir():
        return _model_from_dir(args, ckpt)
    if ckpt is not None:
        if args.weights:
            raise ValueError("--weights goes with --model alone; MODEL_FILE already holds the weights")
        if not Path(ckpt).is_file():
            raise CheckpointError(f"MODEL_FILE {ckpt!r} does not exist")
        manifest = rio.read_manifest(ckpt) or {}
        if args.model:
            factory = args.model
            fargs = fargs if rio.is_reference_spec(factory) else {}
            model = build(factory, fargs)
            rio.load(ckpt, model)
            return model, factory, fargs, os.path.getsize(ckpt)
        factory = manifest.get("factory")
        if not factory:
            raise CheckpointError(
                f"MODEL_FILE {ckpt!r} records no model factory; add --model MODULE:FACTORY to rebuild it"
            )
        recorded = manifest.get("factory_args") or {}
        spec = rio.is_reference_spec(factory)
        fargs = {**recorded, **fargs} if spec else recorded
        trust = getattr(args, "trust_factory", False)
        model = rio.load(ckpt, trust_factory=trust, factory_args=fargs if spec else None)
        return model, factory, fargs, os.path.getsize(ckpt)
    if not args.model:
        raise ValueError("give [MODEL_FILE] OUT, or --model MODULE:FACTORY with OUT")
    fargs = fargs if rio.is_reference_spec(args.model) else {}
    model = build(args.model, fargs)
    if args.weights:
        load_weights(model, args.weights)
        size = os.path.getsize(args.weights)
    else:
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model, args.model, fargs, size


def _model_from_dir(args: argparse.Namespace, src: str) -> tuple[Any, str, dict[str, Any], int]:
    """A Hugging Face model directory (plain, or written by rmtprune) as a transformers model."""
    from .. import hf

    if args.weights or args.model:
        raise ValueError(f"MODEL_DIR {src!r} holds its own architecture and weights: drop --model/--weights")
    d = Path(src).expanduser()
    model = hf.load_pretrained(d)
    size = sum(p.stat().st_size for p in d.iterdir() if p.suffix == ".safetensors" and p.is_file())
    return model, "", {}, size


def is_model_dir(src: str | None) -> bool:
    """Whether the command's input is a directory (a Hugging Face model, plain or compressed)."""
    return src is not None and Path(src).expanduser().is_dir()


def check_dir_outputs(args: argparse.Namespace, src: str, out: str) -> tuple[Path, Path, Path]:
    """Check OUT_DIR before any work (:func:`rmtprune.hf.check_out_dir`); return it and the paths
    of the JSON and Markdown reports inside it."""
    from .. import hf

    out_dir = hf.check_out_dir(out, inputs=[Path(src)], force=args.force)
    report_json, report_md = (out_dir / name for name in hf.REPORTS)
    return out_dir, report_json, report_md


def _write_dir_outputs(
    model: Any,
    out_dir: Path,
    src: str,
    *,
    plan: Any = None,
    force: bool = False,
    reports: Callable[[int], tuple[str, str]],
    storage: str = "auto",
) -> int:
    """Write OUT_DIR (:func:`rmtprune.hf.save_pretrained`, atomic) with the command's two reports
    inside (:data:`rmtprune.hf.REPORTS`). Returns the size of its weights file in bytes."""
    from .. import hf

    sizes: list[int] = []

    def texts(size: int) -> dict[str, str]:
        sizes.append(size)
        json_text, md_text = reports(size)
        return dict(zip(hf.REPORTS, (json_text, md_text), strict=True))

    hf.save_pretrained(
        model, out_dir, plan=plan, source=Path(src).expanduser(), force=force, reports=texts, storage=storage
    )
    return sizes[0]


#: The former name of :func:`model_from_args` (``sparse_format`` and ``io`` have loaders too).
load_model = model_from_args


def is_spec(spec: str) -> bool:
    """Deprecated (one release): :func:`rmtprune.io.is_reference_spec`."""
    from .. import io as rio

    return rio.is_reference_spec(spec)
