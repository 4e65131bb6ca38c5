"""The manifest of an rmtprune model file: what it records, how it is checked, how a model is rebuilt.

A model file (:func:`rmtprune.save`) carries this JSON manifest in its safetensors header and
beside it: ``format`` (:data:`FORMAT`; files with an earlier name of the format,
:data:`LEGACY_FORMATS`, still load), ``format_version``, the versions, the factory that
rebuilds the architecture, and one record per factored layer (:func:`factored_layers`). Every
field is checked (:func:`check_manifest`, :func:`check_layer_record`) before anything is built or
allocated from it; only rmtprune's own reference specs are built from a file
(:func:`build_from_manifest`), any other factory only when the user trusts it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError
from .lowrank import LowRankModule
from .zoo.models import MAX_SIZE

__all__ = [
    "FORMAT",
    "LEGACY_FORMATS",
    "FORMAT_VERSION",
    "META_KEY",
    "manifest_path",
    "factored_layers",
    "factored_type_names",
    "build_manifest",
    "check_manifest",
    "check_layer_record",
    "read_header",
    "read_manifest",
    "is_reference_spec",
    "build_from_manifest",
    "build_factory",
]

#: Value of the manifest's ``format`` field.
FORMAT = "rmtprune-model"
#: Earlier names of the same format, still read.
LEGACY_FORMATS = ("rmtprune-checkpoint",)
#: Version of the manifest layout.
FORMAT_VERSION = 1
#: Key of the manifest in the safetensors header metadata.
META_KEY = "rmtprune"


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The JSON manifest written beside a ``.safetensors`` model file (same stem, ``.json``)."""
    return Path(path).with_suffix(".json")


def factored_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: spec}`` of the factored layers of ``model``: what :func:`restructure` needs."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankModule) and not any(name.startswith(k + ".") for k in out):
            out[name] = {
                "type": type(mod).__name__,
                "original_type": mod.original_type,
                "rank": int(mod.rank),
                "matrix_shape": list(mod.matrix_shape),
                "weight_shape": list(mod._dense_weight_shape()),
                "bias": mod.bias is not None,
            }
    return out


def build_manifest(
    model: nn.Module,
    plan: Any,
    factory: str | None,
    factory_args: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest :func:`rmtprune.save` writes for ``model``: format, versions, the factory, the
    factored layers (:func:`factored_layers`) and, given the compression ``plan``, its config and fits.
    ``extra`` adds top-level fields (``hf``: the Hugging Face class a directory was built with)."""
    fits = {}
    config = None
    if plan is not None:
        config = plan.config.to_dict()
        for lp in plan:
            if lp.action == "skip":
                continue
            fits[lp.name] = {
                "action": lp.action,
                "rank_before": lp.rank_before,
                "rank": lp.rank,
                "n_spikes": lp.n_spikes,
                "sigma2": lp.sigma2,
                "ks": lp.ks,
            }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rmtprune_version": __version__,
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "factory": factory,
        "factory_args": factory_args or {},
        "params": sum(p.numel() for p in model.parameters()),
        "layers": factored_layers(model),
        "rule": None if config is None else config["rule"],
        "config": config,
        "fits": fits,
        **(extra or {}),
    }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def factored_type_names() -> tuple[str, ...]:
    """Names of the factored layer types a record may name: the factored types of the layer registry
    (:mod:`rmtprune.layers`) and their concrete subclasses (``LowRankLinear``, ``LowRankConv1d``, ...)."""
    from .layers import supported_types

    out: set[str] = set()
    todo = [t for t in supported_types() if issubclass(t, LowRankModule)]
    while todo:
        t = todo.pop()
        todo.extend(t.__subclasses__())
        if t is not LowRankModule and not t.__name__.startswith("_"):
            out.add(t.__name__)
    return tuple(sorted(out))


def check_layer_record(
    name: Any,
    record: Any,
    *,
    where: str = "",
    error: type[Exception] = CheckpointError,
    strict: bool = False,
) -> dict[str, Any]:
    """Check one factored-layer record (an entry of :func:`factored_layers`) and return it.

    ``type`` must be a factored type (:func:`factored_type_names`), ``matrix_shape`` two ints in
    ``[1, 2**31 - 1]``, ``rank`` an int in ``[1, min(m, n)]``, and ``weight_shape`` positive ints,
    ``original_type`` a string and ``bias`` a bool where present (``strict``: they must be present).
    Raises ``error`` with a message starting with ``where`` (default ``layer 'NAME'``), e.g.
    ``"architecture['fc1'] rank=0 must be an int in [1, min(m, n)=48] for matrix 48x48"``; used for
    a model file's manifest and for a training checkpoint's architecture.
    """
    where = where or f"layer {name!r}"

    def want(ok: bool, what: str) -> None:
        if not ok:
            raise error(f"{where} {what}")

    want(
        isinstance(name, str) and bool(name) and isinstance(record, dict),
        "is not a layer record (an object with type, rank, matrix_shape)",
    )
    kinds = factored_type_names()
    want(record.get("type") in kinds, f"type={record.get('type')!r} is not one of {', '.join(kinds)}")
    shape = record.get("matrix_shape")
    want(
        isinstance(shape, (list, tuple))
        and len(shape) == 2
        and all(_is_int(v) and 1 <= v <= MAX_SIZE for v in shape),
        f"matrix_shape={shape!r} is not two positive ints",
    )
    rank = record.get("rank")
    want(
        _is_int(rank) and 1 <= rank <= min(shape),
        f"rank={rank!r} must be an int in [1, min(m, n)={min(shape)}] for matrix {shape[0]}x{shape[1]}",
    )
    wshape = record.get("weight_shape")
    if strict or wshape is not None:
        want(
            isinstance(wshape, (list, tuple)) and all(_is_int(v) and v >= 1 for v in wshape),
            f"weight_shape={wshape!r} is not positive ints",
        )
    if strict or "original_type" in record:
        want(isinstance(record.get("original_type"), str), "original_type is not a name")
    if strict or "bias" in record:
        want(isinstance(record.get("bias"), bool), "bias is not a bool")
    return record


#: A Python class name: what a manifest's ``hf.class`` may be (looked up in ``transformers`` only).
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_hf_record(hf: Any, where: str) -> None:
    """Check a manifest's ``hf`` field (written by :func:`rmtprune.hf.save_pretrained`): an object with
    ``class``, the name of a ``transformers`` model class (a name, never a module path), strings
    ``model_type`` and ``dtype``, and ``files``, each file written mapped to its sha256."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: manifest hf must be an object, got {type(hf).__name__}")
    cls = hf.get("class")
    if not isinstance(cls, str) or not _CLASS_NAME.fullmatch(cls):
        raise CheckpointError(f"{where}: manifest hf.class={cls!r} must be a transformers class name")
    for key in ("model_type", "dtype"):
        v = hf.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > 64):
            raise CheckpointError(f"{where}: manifest hf.{key}={v!r} must be a short string")
    files = hf.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(f, str) and len(f) < 512 and isinstance(h, str) and len(h) == 64 for f, h in files.items()
    ):
        raise CheckpointError(f"{where}: manifest hf.files must map file names to sha256 digests")


def check_manifest(manifest: Any, path: Any = "<manifest>") -> dict[str, Any]:
    """Validate a manifest's structure before anything is built or allocated from it; return it.

    Checks the format (:data:`FORMAT` or a legacy name) and version, that ``factory`` is a string
    (or absent) and ``factory_args`` a dict, and every factored layer (:func:`check_layer_record`).
    Raises :class:`CheckpointError` naming the first bad field. Shapes are checked against the
    file's tensors by :func:`rmtprune.load`.
    """
    where = f"checkpoint {str(path)!r}"
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise CheckpointError(f"{where} has metadata key 'rmtprune' but not an rmtprune manifest")
    version = manifest.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise CheckpointError(f"{where} has a malformed manifest format_version={version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has manifest format_version={version}; this rmtprune reads up to {FORMAT_VERSION}"
        )
    factory = manifest.get("factory")
    if factory is not None and not isinstance(factory, str):
        raise CheckpointError(f"{where}: manifest factory={factory!r} must be a string or null")
    fargs = manifest.get("factory_args")
    if fargs is not None and not isinstance(fargs, dict):
        raise CheckpointError(f"{where}: manifest factory_args must be an object, got {type(fargs).__name__}")
    hf = manifest.get("hf")
    if hf is not None:
        check_hf_record(hf, where)
    layers = manifest.get("layers")
    if layers is None:
        layers = manifest["layers"] = {}
    if not isinstance(layers, dict):
        raise CheckpointError(
            f"{where}: manifest 'layers' must be an object of name -> layer, got {type(layers).__name__}"
        )
    for name, record in layers.items():
        check_layer_record(name, record, where=f"{where}: manifest layer {name!r}")
    return manifest


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Header metadata and tensor shapes of a safetensors file, with clear errors (no tensor is read)."""
    from safetensors import safe_open

    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory: a Hugging Face model directory loads with "
            "rmtprune.load(DIR) (rmtprune.hf.load_pretrained)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    return meta, shapes


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checked manifest of an rmtprune model file (from its safetensors header); None for plain files."""
    meta, _ = read_header(Path(path).expanduser())
    raw = meta.get(META_KEY)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has a corrupt rmtprune manifest: {exc}") from None
    except RecursionError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has an rmtprune manifest nested too deeply"
        ) from None
    return check_manifest(manifest, path)


#: Keys a reference model spec's ``factory_args`` may hold.
_SPEC_ARGS = ("input_shape", "num_classes")
_MAX_DIM = MAX_SIZE  # the largest size a reference spec may ask for, and so a manifest may record


def is_reference_spec(spec: Any) -> bool:
    """Whether ``spec`` names a model family defined by rmtprune itself (``mlp``, ``cnn``, ``vit``)."""
    from .zoo.models import MODEL_FAMILIES

    return isinstance(spec, str) and spec.partition(":")[0].strip().lower() in MODEL_FAMILIES


def _spec_args(spec: str, kwargs: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    """Validated ``input_shape`` and ``num_classes`` of a reference spec (from a file or the user)."""
    unknown = sorted(set(kwargs) - set(_SPEC_ARGS))
    if unknown:
        raise ValueError(
            f"model spec {spec!r}: unknown factory argument {unknown[0]!r} (valid: input_shape, num_classes)"
        )
    if "input_shape" not in kwargs or "num_classes" not in kwargs:
        raise ValueError(f"model spec {spec!r} needs input_shape and num_classes to be built")
    shape, classes = kwargs["input_shape"], kwargs["num_classes"]
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_DIM for v in shape)
    ):
        raise ValueError(f"model spec {spec!r}: input_shape={shape!r} must be 1 to 3 positive ints")
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= _MAX_DIM:
        raise ValueError(f"model spec {spec!r}: num_classes={classes!r} must be a positive int")
    return tuple(shape), classes


def build_from_manifest(
    manifest: dict[str, Any], *, trust_factory: bool = False, path: Any = None
) -> nn.Module:
    """Build a fresh (dense) model with the factory recorded in a manifest.

    Only rmtprune's own reference specs are built from a file (their arguments validated);
    any other ``MODULE:FACTORY`` would run code named by the file and is refused unless
    ``trust_factory=True`` (the analogue of Hugging Face's ``trust_remote_code``).
    """
    where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
    factory = manifest.get("factory")
    args = manifest.get("factory_args") or {}
    if not factory:
        raise CheckpointError(f"{where} records no factory: build the model yourself and pass it to load()")
    if not isinstance(factory, str) or not isinstance(args, dict):
        raise CheckpointError(f"{where} has a malformed factory ({type(factory).__name__}) or factory_args")
    if not is_reference_spec(factory) and not trust_factory:
        raise CheckpointError(
            f"{where} names the factory {factory[:80]!r}, code that rmtprune does not run from a file "
            "(a file can name any function); pass the model instead (load(path, model), --model "
            "MODULE:FACTORY), or opt in with trust_factory=True / --trust-factory if you trust the file"
        )
    try:
        return build_factory(factory, search_cwd=False, **args)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def build_factory(spec: str, *, search_cwd: bool = True, **kwargs: Any) -> nn.Module:
    """Build a model from a reference model spec or ``"MODULE:FACTORY"``.

    Reference specs (``mlp``, ``cnn``, ``vit`` families of :mod:`rmtprune.models`) need the keyword
    arguments ``input_shape`` and ``num_classes``, and nothing else. ``MODULE:FACTORY`` imports
    ``MODULE`` and calls ``FACTORY(**kwargs)``: it runs code, so only a name the user gave is passed
    here (``--model``), or a file's factory the user said to trust. ``search_cwd`` puts the current
    directory on ``sys.path`` for the import (for ``--model mymodule:build``); a trusted file's
    factory is imported from the installed packages and ``PYTHONPATH`` only.
    """
    if not isinstance(spec, str):
        raise TypeError(f"factory={spec!r} must be a string MODULE:FACTORY or a model spec")
    head, _, attr = spec.partition(":")
    if is_reference_spec(spec):
        from .zoo.models import build_model

        shape, classes = _spec_args(spec, kwargs)
        model = build_model(spec, shape, classes)
    else:
        if not head or not attr:
            raise ValueError(f"factory {spec!r} must be MODULE:FACTORY (or a model spec such as mlp:1000)")
        saved = list(sys.path)  # restored after a trusted file's import
        if search_cwd:
            # Last, not first: a stray file in the current directory named like an installed package
            # (safetensors.py) must not shadow it.
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
        else:
            # A trusted file's factory: installed packages and PYTHONPATH only, not the implicit
            # current-directory entry that `python -c` and the REPL put first.
            sys.path[:] = [p for p in sys.path if p not in ("", ".")]
        try:
            obj: Any = importlib.import_module(head)
        except ImportError as exc:
            raise ValueError(f"factory {spec!r}: cannot import module {head!r} ({exc})") from None
        finally:
            if not search_cwd:
                sys.path[:] = saved
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"factory {spec!r}: module {head!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"factory {spec!r}: {attr!r} is not callable")
        model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
