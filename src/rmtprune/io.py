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
from ._atomic import atomic_path, check_writable_dir
from .errors import CheckpointError
from .lowrank import LowRankModule

__all__ = [
    "save",
    "load",
    "read_manifest",
    "manifest_path",
    "build_from_manifest",
    "build_factory",
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

    Both files are written atomically; tensors shared between names (tied weights) are stored once.
    Layers sparsified by :func:`rmtprune.sparsify` (those carrying a mask) are stored sparsely
    (:mod:`rmtprune.sparse_format`), so the file shrinks with their nonzeros; :func:`load` restores
    them with their masks. Returns the weights path.
    """
    from safetensors.torch import save_file, save_model

    from .masks import masks_of
    from .sparse_format import METADATA_KEY, encode_state_dict

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if factory is not None and not isinstance(factory, str):
        raise TypeError(f"factory={factory!r} must be a string MODULE:FACTORY or a model spec")
    target = _check_path(path)
    check_writable_dir(target)
    manifest = _manifest(model, plan, factory, factory_args)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
    meta = {_META_KEY: json.dumps(manifest, default=_json_default)}
    masks = masks_of(model)
    with atomic_path(target) as tmp_w, atomic_path(manifest_path(target)) as tmp_j:
        if masks:
            tensors, sparse = encode_state_dict(model.state_dict(), masks)
            meta[METADATA_KEY] = json.dumps({"version": 1, "tensors": sparse}, sort_keys=True)
            save_file(tensors, str(tmp_w), metadata=meta)
        else:
            save_model(model, str(tmp_w), metadata=meta)
        tmp_j.write_text(text, encoding="utf-8")
    return target


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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has metadata key 'rmtprune' but not an rmtprune manifest"
        )
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has manifest format_version={manifest['format_version']}; "
            f"this rmtprune reads up to {FORMAT_VERSION}"
        )
    return manifest


def build_from_manifest(manifest: dict[str, Any]) -> nn.Module:
    """Build a fresh (dense) model with the factory recorded in a manifest."""
    factory = manifest.get("factory")
    args = dict(manifest.get("factory_args") or {})
    if not factory:
        raise CheckpointError(
            "the checkpoint records no factory: build the model yourself and pass it to load()"
        )
    return build_factory(factory, **args)


def build_factory(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from ``"MODULE:FACTORY"`` (current directory importable) or a reference model spec.

    Reference specs (``mlp``, ``cnn``, ``vit`` families of :mod:`rmtprune.models`) need the keyword
    arguments ``input_shape`` and ``num_classes``.
    """
    head, _, attr = spec.partition(":")
    try:
        from .models import MODEL_FAMILIES, build_model
    except ImportError:  # pragma: no cover - models is part of the package
        MODEL_FAMILIES, build_model = {}, None
    if head.strip().lower() in MODEL_FAMILIES:
        if "input_shape" not in kwargs or "num_classes" not in kwargs:
            raise ValueError(f"model spec {spec!r} needs input_shape and num_classes to be built")
        model = build_model(spec, kwargs["input_shape"], kwargs["num_classes"])
    else:
        if not head or not attr:
            raise ValueError(f"factory {spec!r} must be MODULE:FACTORY (or a model spec such as mlp:1000)")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj: Any = importlib.import_module(head)
        except ImportError as exc:
            raise ValueError(f"factory {spec!r}: cannot import module {head!r} ({exc})") from None
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
        rank, kind = int(spec["rank"]), spec["type"]
        shape = tuple(spec["matrix_shape"])
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


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (restructured in place) and return it.

    ``model`` is a freshly built instance of the original (dense) architecture; the layers the
    manifest records are replaced by factored layers of the stored ranks, then every tensor is
    checked by name and shape and loaded (values are cast to the model's dtype and device). With
    ``model=None`` the architecture is built with the factory recorded at save time. A plain
    safetensors file without a manifest loads as a state dict. Raises :class:`CheckpointError`
    naming the first mismatching layer; the model is then left as it was.
    """
    from safetensors.torch import load_file

    from .masks import remove_masks, restore_masks
    from .sparse_format import decode_state_dict, dense_shapes, manifest_from_metadata

    path = Path(path).expanduser()
    meta, shapes = _open(path)
    sparse = manifest_from_metadata(meta)
    shapes = dense_shapes(shapes, sparse)
    manifest = read_manifest(path) if _META_KEY in meta else None
    if model is None:
        if manifest is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no rmtprune manifest: pass the model to load()"
            )
        model = build_from_manifest(manifest)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    undo: list[Any] = []
    try:
        if manifest is not None:
            restructure(model, manifest.get("layers", {}), undo)
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
