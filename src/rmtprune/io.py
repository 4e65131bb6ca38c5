"""Save and load compressed models: safetensors weights plus a JSON manifest of the factored layers.

``save(model, "net.safetensors")`` writes two files, each atomically:

- ``net.safetensors``: the state dict (``first.weight`` / ``second.weight`` / ``second.bias`` for
  factored layers), with the manifest embedded in the safetensors header metadata under the key
  ``"rmtprune"``, so the weights file alone is enough to load;
- ``net.json``: the same manifest, indented, for people and tools.

The manifest (:mod:`rmtprune.manifest`; ``format`` is ``manifest.FORMAT``, and files of an earlier
name of the format still load) records, per factored layer, its low-rank type, rank, matrix
shape and the layer type it replaced, plus the rmtprune and torch versions, the compression config,
a summary of the fits, and optionally how to rebuild the architecture (``factory``).
``load(path, model)`` takes a freshly built instance of the original architecture, replaces the
recorded layers by factored ones of the stored ranks, checks every tensor name and shape (the error
names the first mismatching layer) and loads the weights; on any failure the model is left as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_paths, check_writable_dir
from ._format import json_default
from .errors import CheckpointError, RmtpruneError, first_line
from .layers import handler_for
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMATS,
    META_KEY,
    build_factory,
    build_from_manifest,
    build_manifest,
    check_layer_record,
    check_manifest,
    factored_layers,
    is_reference_spec,
    manifest_path,
    read_header,
    read_manifest,
)

__all__ = [
    "save",
    "load",
    "write_model",
    "restructure",
    "check_tensors",
    "non_persistent_buffers",
    # the manifest, in rmtprune.manifest (kept importable from here)
    "read_manifest",
    "manifest_path",
    "build_from_manifest",
    "build_factory",
    "check_manifest",
    "check_layer_record",
    "is_reference_spec",
    "factored_layers",
    "FORMAT",
    "LEGACY_FORMATS",
    "FORMAT_VERSION",
    # deprecated
    "write_checkpoint",
]

_META_KEY = META_KEY


def _check_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ValueError(
            f"path={str(path)!r} must end in .safetensors (the manifest goes beside it as .json)"
        )
    return p


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    plan: Any = None,
    factory: str | None = None,
    factory_args: dict[str, Any] | None = None,
    force: bool = False,
    storage: str = "auto",
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
    storage : sparse format of the masked weights, one of :data:`rmtprune.sparse_format.FORMATS`:
        ``"auto"`` (the smaller of bitmask and CSR per tensor), ``"bitmask"`` or ``"csr"``.

    Both files are written atomically, the weights renamed into place first; tensors shared
    between names (tied weights) are stored once.
    Layers sparsified by :func:`rmtprune.sparsify` (those carrying a mask) are stored sparsely
    (:mod:`rmtprune.sparse_format`, in ``storage``), so the file shrinks with their nonzeros;
    :func:`load` restores them with their masks. Returns the weights path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if factory is not None and not isinstance(factory, str):
        raise TypeError(f"factory={factory!r} must be a string MODULE:FACTORY or a model spec")
    _check_storage(storage)
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
        write_model(
            model, tmp_w, tmp_j, plan=plan, factory=factory, factory_args=factory_args, storage=storage
        )
    return target


def _check_storage(storage: Any) -> str:
    """``storage`` if it is a sparse format of :data:`rmtprune.sparse_format.FORMATS`, else
    ValueError (TypeError for a non-string) naming it."""
    from ._validate import check_choice
    from .sparse_format import FORMATS

    return check_choice("storage", storage, FORMATS)


def write_model(
    model: nn.Module,
    weights: Path,
    manifest_file: Path,
    *,
    plan: Any = None,
    factory: str | None = None,
    factory_args: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    storage: str = "auto",
) -> None:
    """Write the weights and the manifest to the given (temporary) paths, not atomically.

    The building block of :func:`save` for commands that write more files in one atomic group
    (:func:`rmtprune._atomic.atomic_paths`). A failed write (a full disk) raises
    :class:`~rmtprune.errors.RmtpruneError` naming the file. ``extra`` adds top-level manifest fields;
    ``storage`` is the sparse format of the masked weights (see :func:`save`).
    """
    from safetensors.torch import save_file, save_model

    from .masks import masks_of
    from .sparse_format import METADATA_KEY, encode_state_dict

    _check_storage(storage)
    manifest = build_manifest(model, plan, factory, factory_args, extra)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=json_default) + "\n"
    meta = {META_KEY: json.dumps(manifest, default=json_default)}
    masks = masks_of(model)
    try:
        if masks:
            tensors, sparse = encode_state_dict(model.state_dict(), masks, storage)
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


def write_checkpoint(*args: Any, **kwargs: Any) -> None:
    """Deprecated name of :func:`write_model` (kept for one release)."""
    import warnings

    warnings.warn(
        "rmtprune.io.write_checkpoint is deprecated; use write_model", DeprecationWarning, stacklevel=2
    )
    write_model(*args, **kwargs)


def restructure(model: nn.Module, layers: dict[str, dict[str, Any]], undo: list[Any] | None = None) -> None:
    """Replace each layer of :func:`factored_layers` specs by an (all-zero) factored layer of its rank.

    The state dict loaded next fills the factors. A layer that is missing or of another kind or
    shape raises :class:`CheckpointError` naming it; ``undo`` collects ``(parent, child, old)``
    for the caller to put the model back.
    """
    undo = [] if undo is None else undo
    for name, spec in layers.items():
        check_layer_record(name, spec)  # before allocating
        rank, kind = spec["rank"], spec["type"]
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


def non_persistent_buffers(model: nn.Module) -> set[str]:
    """State-dict names of the model's non-persistent buffers (``position_ids`` of a BERT): a file
    may still hold them (older transformers saved them) and loading ignores them, as transformers does."""
    out: set[str] = set()
    for prefix, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            out.add(f"{prefix}.{b}" if prefix else b)
    return out


def check_tensors(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise naming the first tensor (in model order) whose name or shape does not match the file.

    A tensor missing from the file is accepted when it is the same parameter as one the file stores
    under another name (tied weights: ``lm_head.weight`` is ``embed_tokens.weight``); a file's tensor
    named after one of the model's non-persistent buffers is ignored.
    """
    sd = model.state_dict(keep_vars=True)
    # Tied by identity, not data_ptr: on the meta device every tensor's data_ptr is 0.
    stored_ids = {id(sd[k]) for k in shapes if k in sd}
    for key, t in sd.items():
        layer = key.rpartition(".")[0] or key
        if key not in shapes:
            if id(t) in stored_ids and t.numel():  # tied weight stored under another name
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
    ignored = non_persistent_buffers(model)
    extra = [k for k in shapes if k not in sd and k not in ignored]
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
    build: Any = None,
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
    without a manifest loads as a state dict. ``build`` (a zero-argument callable returning the dense
    model; :mod:`rmtprune.hf` passes one) replaces the factory when ``model`` is None: it is called
    once under the meta device for the checks, then for real. Raises
    :class:`CheckpointError` naming the first mismatching layer; the model is then left as it was.
    """
    from safetensors.torch import load_file

    from .masks import remove_masks, restore_masks
    from .sparse_format import decode_state_dict, dense_shapes, manifest_from_metadata

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path).expanduser()
    meta, shapes = read_header(path)
    try:
        sparse = manifest_from_metadata(meta)
        shapes = dense_shapes(shapes, sparse)
    except CheckpointError as exc:
        if str(path) in str(exc):
            raise
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from None
    manifest = read_manifest(path) if META_KEY in meta else None
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
        def make() -> nn.Module:
            if build is not None:
                return build()
            return build_from_manifest(manifest, trust_factory=trust_factory, path=path)

        with torch.device("meta"):
            skeleton = make()
        _check_expansion(skeleton, path)
        restructure(skeleton, layers)
        check_tensors(skeleton, shapes, path)
        del skeleton
        model = make()
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
        for key in non_persistent_buffers(model).intersection(state):
            del state[key]
        model.load_state_dict(state, strict=False)
        remove_masks(model)  # the file's masks replace any the model carried
        restore_masks(model, masks)
    except BaseException:
        for parent, child, old in reversed(undo):
            setattr(parent, child, old)
        raise
    return model
