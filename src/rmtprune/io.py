"""Save and load compressed models: safetensors weights plus a JSON manifest of the factored layers.

``save(model, "net.safetensors")`` writes two files, each atomically:

- ``net.safetensors``: the state dict (``first.weight`` / ``second.weight`` / ``second.bias`` for
  factored layers), with the manifest embedded in the safetensors header metadata under the key
  ``"rmtprune"``, so the weights file alone is enough to load;
- ``net.json``: the same manifest, indented, for people and tools.

The manifest records, per factored layer, its low-rank type, rank, matrix shape and the layer type
it replaced, plus the rmtprune and torch versions, the compression config, a summary of the fits,
and optionally how to rebuild the architecture (``factory``). ``load(path, model)`` takes a freshly
built instance of the original architecture, replaces the recorded layers by factored ones of the
stored ranks, checks every tensor name and shape (the error names the first mismatching layer) and
loads the weights; on any failure the model is left as it was.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from ._atomic import atomic_paths, check_writable_dir
from .errors import CheckpointError, RmtpruneError, first_line
from .lowrank import LowRankModule
from .models import MAX_SIZE

__all__ = [
    "save",
    "load",
    "read_manifest",
    "manifest_path",
    "build_from_manifest",
    "build_factory",
    "check_manifest",
    "write_checkpoint",
    "is_reference_spec",
    "factored_layers",
    "restructure",
    "check_tensors",
    "FORMAT",
    "FORMAT_VERSION",
]

#: Value of the manifest's ``format`` field.
FORMAT = "rmtprune-checkpoint"
#: Version of the manifest layout.
FORMAT_VERSION = 1
_META_KEY = "rmtprune"


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The JSON manifest written beside a ``.safetensors`` checkpoint (same stem, ``.json``)."""
    return Path(path).with_suffix(".json")


def _check_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ValueError(
            f"path={str(path)!r} must end in .safetensors (the manifest goes beside it as .json)"
        )
    return p


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


def _manifest(
    model: nn.Module, plan: Any, factory: str | None, factory_args: dict[str, Any] | None
) -> dict[str, Any]:
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
    }


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    plan: Any = None,
    factory: str | None = None,
    factory_args: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``) and its manifest to ``path`` with suffix ``.json``.

    Parameters
    ----------
    model : the (compressed or not) model.
    path : target ``.safetensors`` file; its directory must exist.
    plan : the :class:`rmtprune.Plan` report of the compression, to record its config and fits.
    factory : how to rebuild the architecture, ``"MODULE:FACTORY"`` (a callable returning the
        model) or a reference model spec of :func:`rmtprune.models.build_model` (``"mlp:1000"``);
        lets :func:`load` and ``rmtprune compress CHECKPOINT OUT`` work without being given a model.
    factory_args : keyword arguments for the factory (for model specs: ``input_shape``, ``num_classes``).

    force : replace an existing ``.json`` beside ``path`` even when rmtprune did not write it
        (by default that is refused, so a user's file of that name is never lost).

    Both files are written atomically, the weights renamed into place first; tensors shared
    between names (tied weights) are stored once.
    Layers sparsified by :func:`rmtprune.sparsify` (those carrying a mask) are stored sparsely
    (:mod:`rmtprune.sparse_format`), so the file shrinks with their nonzeros; :func:`load` restores
    them with their masks. Returns the weights path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if factory is not None and not isinstance(factory, str):
        raise TypeError(f"factory={factory!r} must be a string MODULE:FACTORY or a model spec")
    target = _check_path(path)
    check_writable_dir(target)
    sidecar = manifest_path(target)
    if sidecar.exists() and not force:
        from ._outputs import is_ours

        if sidecar.is_dir() or not is_ours(sidecar, "manifest"):
            raise CheckpointError(
                f"refusing to overwrite {str(sidecar)!r}: save() writes the manifest there and that file "
                "was not written by rmtprune; move it, save under another name, or pass force=True"
            )
    # Weights are renamed into place before the manifest, and neither until both are written.
    with atomic_paths([target, sidecar]) as (tmp_w, tmp_j):
        write_checkpoint(model, tmp_w, tmp_j, plan=plan, factory=factory, factory_args=factory_args)
    return target


def write_checkpoint(
    model: nn.Module,
    weights: Path,
    manifest_file: Path,
    *,
    plan: Any = None,
    factory: str | None = None,
    factory_args: dict[str, Any] | None = None,
) -> None:
    """Write the weights and the manifest to the given (temporary) paths, not atomically.

    The building block of :func:`save` for commands that write more files in one atomic group
    (:func:`rmtprune._atomic.atomic_paths`). A failed write (a full disk) raises
    :class:`~rmtprune.errors.RmtpruneError` naming the file.
    """
    from safetensors.torch import save_file, save_model

    from .masks import masks_of
    from .sparse_format import METADATA_KEY, encode_state_dict

    manifest = _manifest(model, plan, factory, factory_args)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
    meta = {_META_KEY: json.dumps(manifest, default=_json_default)}
    masks = masks_of(model)
    try:
        if masks:
            tensors, sparse = encode_state_dict(model.state_dict(), masks)
            meta[METADATA_KEY] = json.dumps({"version": 1, "tensors": sparse}, sort_keys=True)
            save_file(tensors, str(weights), metadata=meta)
        else:
            save_model(model, str(weights), metadata=meta)
        manifest_file.write_text(text, encoding="utf-8")
    except (OSError, RuntimeError, ValueError) as exc:
        raise RmtpruneError(f"could not write the model ({first_line(exc, 300, filename=False)})") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError (e.g. on a full disk)
        if type(exc).__name__ != "SafetensorError":
            raise
        raise RmtpruneError(f"could not write the model ({first_line(exc, 300, filename=False)})") from exc


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _open(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Header metadata and tensor shapes of a safetensors file, with clear errors."""
    from safetensors import safe_open

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
    """The manifest of an rmtprune checkpoint (from the safetensors header), or None for plain files."""
    meta, _ = _open(Path(path).expanduser())
    raw = meta.get(_META_KEY)
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
    from .models import MODEL_FAMILIES

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


_LOWRANK_TYPES = ("LowRankLinear", "LowRankConv1d", "LowRankConv2d")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest(manifest: Any, path: Any = "<manifest>") -> dict[str, Any]:
    """Validate a manifest's structure before anything is built or allocated from it; return it.

    Checks the format and version, that ``factory`` is a string (or absent) and ``factory_args`` a
    dict, and that every factored layer has a known low-rank type, a ``matrix_shape`` of two
    positive ints and a rank in ``[1, min(m, n)]``. Raises :class:`CheckpointError` naming the
    first bad field. Shapes are checked against the file's tensors by :func:`load`.
    """
    where = f"checkpoint {str(path)!r}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
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
    layers = manifest.get("layers")
    if layers is None:
        layers = manifest["layers"] = {}
    if not isinstance(layers, dict):
        raise CheckpointError(
            f"{where}: manifest 'layers' must be an object of name -> layer, got {type(layers).__name__}"
        )
    for name, spec in layers.items():
        bad = f"{where}: manifest layer {name!r}"
        if not name or not isinstance(spec, dict):
            raise CheckpointError(f"{bad} must be a non-empty name mapped to an object")
        if spec.get("type") not in _LOWRANK_TYPES:
            raise CheckpointError(
                f"{bad} has type={spec.get('type')!r}; expected one of {', '.join(_LOWRANK_TYPES)}"
            )
        shape = spec.get("matrix_shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(_is_int(v) and 1 <= v <= _MAX_DIM for v in shape)
        ):
            raise CheckpointError(f"{bad} has matrix_shape={shape!r}; expected two positive ints [m, n]")
        rank = spec.get("rank")
        if not _is_int(rank) or not 1 <= rank <= min(shape):
            raise CheckpointError(
                f"{bad} has rank={rank!r}; it must be an int in [1, {min(shape)}] for a "
                f"{shape[0]}x{shape[1]} matrix"
            )
        if not isinstance(spec.get("original_type", ""), str) or not isinstance(
            spec.get("bias", False), bool
        ):
            raise CheckpointError(f"{bad} has a malformed original_type or bias")
    return manifest


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
        from .models import build_model

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


def restructure(model: nn.Module, layers: dict[str, dict[str, Any]], undo: list[Any] | None = None) -> None:
    """Replace each layer of :func:`factored_layers` specs by an (all-zero) factored layer of its rank.

    The state dict loaded next fills the factors. A layer that is missing or of another kind or
    shape raises :class:`CheckpointError` naming it; ``undo`` collects ``(parent, child, old)``
    for the caller to put the model back.
    """
    undo = [] if undo is None else undo
    from .surgery import handler_for

    for name, spec in layers.items():
        rank, kind = spec["rank"], spec["type"]
        shape = tuple(spec["matrix_shape"])
        if not _is_int(rank) or len(shape) != 2 or not 1 <= rank <= min(shape):  # before allocating
            raise CheckpointError(f"layer {name!r}: rank={rank!r} must be in [1, min{shape}]")
        what = f"{kind} rank {rank} of a {shape[0]}x{shape[1]} {spec.get('original_type', '?')}"
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"checkpoint does not match the model: layer {name!r} ({what}) is missing from the model"
            ) from None
        h = handler_for(mod)
        if h is None or h.unsupported(mod):
            raise CheckpointError(
                f"checkpoint does not match the model: layer {name!r} is {type(mod).__name__} in the model, "
                f"the checkpoint has {what}"
            )
        expected = kind if h.factored else spec.get("original_type")
        if type(mod).__name__ != expected or h.matrix_shape(mod) != shape:
            m, n = h.matrix_shape(mod)
            raise CheckpointError(
                f"checkpoint does not match the model: layer {name!r} is a {m}x{n} {type(mod).__name__} in "
                f"the model, the checkpoint has {what}"
            )
        if h.factored and mod.rank == rank:
            continue
        ref = h.weights(mod)[0]
        A = torch.zeros(shape[0], rank, dtype=ref.dtype, device=ref.device)
        B = torch.zeros(rank, shape[1], dtype=ref.dtype, device=ref.device)
        new = h.build(mod, A, B)
        new.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        undo.append((parent, child, mod))


def check_tensors(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise naming the first tensor (in model order) whose name or shape does not match the file."""
    sd = model.state_dict(keep_vars=True)
    stored_ptrs = {sd[k].data_ptr() for k in shapes if k in sd}
    for key, t in sd.items():
        layer = key.rpartition(".")[0] or key
        if key not in shapes:
            if t.data_ptr() in stored_ptrs and t.numel():  # tied weight stored under another name
                continue
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the model: layer {layer!r} tensor {key!r} "
                f"({_fmt(t.shape)}) is missing from the checkpoint"
            )
        if tuple(t.shape) != shapes[key]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the model: layer {layer!r} tensor {key!r} is "
                f"{_fmt(shapes[key])} in the checkpoint but {_fmt(t.shape)} in the model"
            )
    extra = [k for k in shapes if k not in sd]
    if extra:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model: tensor {extra[0]!r} "
            f"({_fmt(shapes[extra[0]])}) is not in the model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )


def _fmt(shape: Any) -> str:
    return "x".join(str(int(v)) for v in shape) or "scalar"


#: A file may rebuild a dense architecture at most this many times its own size (a rank-1 factored
#: 4096x4096 layer is 2048x smaller than dense), and always up to ``_EXPANSION_FLOOR`` bytes.
MAX_EXPANSION = 4096
_EXPANSION_FLOOR = 1 << 30


def _check_expansion(skeleton: nn.Module, path: Path) -> None:
    """Refuse a file whose recorded architecture is absurdly larger than the file (built densely
    before its factored layers replace the dense ones): a 137 kB file asking for 6 GB."""
    dense = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    size = path.stat().st_size
    if dense > max(_EXPANSION_FLOOR, MAX_EXPANSION * size):
        raise CheckpointError(
            f"checkpoint {str(path)!r} ({size:,} bytes) records an architecture of {dense / 1e9:.1f} GB, "
            f"more than {MAX_EXPANSION}x its size; refused as crafted (build the model yourself and "
            "pass it: load(path, model), --model)"
        )


def load(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    trust_factory: bool = False,
    factory_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (restructured in place) and return it.

    ``model`` is a freshly built instance of the original (dense) architecture; the layers the
    manifest records are replaced by factored layers of the stored ranks, then every tensor is
    checked by name and shape and loaded (values are cast to the model's dtype and device). With
    ``model=None`` the architecture is built from the manifest's factory, which must be one of
    rmtprune's reference specs (``mlp``/``cnn``/``vit``): a file never makes rmtprune import or call
    other code unless ``trust_factory=True`` (see ``docs/security.md``). The manifest is validated
    and the architecture checked against the file's tensors on the meta device before anything is
    allocated; ``factory_args`` override the recorded ones for that build. A plain safetensors file
    without a manifest loads as a state dict. Raises
    :class:`CheckpointError` naming the first mismatching layer; the model is then left as it was.
    """
    from safetensors.torch import load_file

    from .masks import remove_masks, restore_masks
    from .sparse_format import decode_state_dict, dense_shapes, manifest_from_metadata

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path).expanduser()
    meta, shapes = _open(path)
    try:
        sparse = manifest_from_metadata(meta)
        shapes = dense_shapes(shapes, sparse)
    except CheckpointError as exc:
        if str(path) in str(exc):
            raise
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from None
    manifest = read_manifest(path) if _META_KEY in meta else None
    layers = manifest["layers"] if manifest is not None else {}
    if model is None:
        if manifest is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no rmtprune manifest: pass the model to load()"
            )
        if factory_args:
            recorded = manifest.get("factory_args") or {}
            manifest = {**manifest, "factory_args": {**recorded, **factory_args}}
        # Build the architecture on the meta device first (no memory) and check it against the
        # file, so a crafted spec ("mlp:4000000" in a 34 kB file) is refused before allocating.
        with torch.device("meta"):
            skeleton = build_from_manifest(manifest, trust_factory=trust_factory, path=path)
        _check_expansion(skeleton, path)
        restructure(skeleton, layers)
        check_tensors(skeleton, shapes, path)
        del skeleton
        model = build_from_manifest(manifest, trust_factory=trust_factory, path=path)
    undo: list[Any] = []
    try:
        restructure(model, layers, undo)
        check_tensors(model, shapes, path)
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} cannot be read (truncated or corrupt?): {exc}"
            ) from None
        masks: dict[str, torch.Tensor] = {}
        if sparse:
            state, masks = decode_state_dict(state, sparse)
        model.load_state_dict(state, strict=False)
        remove_masks(model)  # the file's masks replace any the model carried
        restore_masks(model, masks)
    except BaseException:
        for parent, child, old in reversed(undo):
            setattr(parent, child, old)
        raise
    return model
