"""Sparse storage of masked weights in tensors that safetensors can hold.

A pruned weight is stored as its kept values (row-major order) plus the pattern of kept
entries, either as a **bitmask** (one bit per entry, packed into ``uint8``) or as **CSR**
(``int32`` row pointers and ``int16`` column indices -- ``int32`` above 32768 columns -- of the
``out x rest`` matrix view). ``auto`` picks whichever pattern is smaller: the bitmask costs
``numel / 8`` bytes, CSR ``4 (rows + 1) + 2 nnz``, so the bitmask wins above ~6% density and
CSR below. Either way the file shrinks with the
number of kept entries, and decoding restores the dense weight *and* its mask exactly (a kept
entry that happens to be zero stays kept). The sizes, index types and the choice are defined once,
in :mod:`rmtprune.sparsity.storage` (re-exported here): :func:`pattern_bytes`,
:func:`choose_format`, :func:`tensor_size` and :func:`encoded_sizes` give the bytes this module
writes without encoding anything, and the sparsify report counts with them.

The functions work on state dicts, so any writer can use them: :func:`encode_state_dict` turns
``(state_dict, masks)`` into plain tensors plus a JSON-able manifest, :func:`decode_state_dict`
inverts it. :func:`save_sparse` / :func:`load_sparse` write and read one ``.safetensors`` file
with the manifest in its metadata (written atomically).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_path
from ._tensor_source import _one_line, _reject_constant, _short
from ._validate import check_choice
from .errors import CheckpointError
from .sparsity.storage import (
    FORMATS,
    SEP,
    StoredSize,
    choose_format,
    col_dtype,
    crow_dtype,
    encoded_sizes,
    pattern_bytes,
    tensor_size,
    written_entries,
)

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "encode_tensor",
    "decode_tensor",
    "encode_state_dict",
    "decode_state_dict",
    "stored_bytes",
    "stored_nonzeros",
    "StoredSize",
    "pattern_bytes",
    "choose_format",
    "tensor_size",
    "encoded_sizes",
    "save_sparse",
    "load_sparse",
    "save_model",
    "load_sparse_into",
    "load_model",
    "manifest_from_metadata",
    "dense_shapes",
    "read_metadata",
]

#: Key of the JSON manifest in the safetensors metadata.
METADATA_KEY = "rmtprune.sparse"
_SEP = SEP
_PARTS = {"bitmask": ("values", "bitmask"), "csr": ("values", "crow", "col")}
_MAX_NDIM = 64
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
#: A file whose sparse tensors decode to more than ``MAX_EXPANSION`` times its size (and more than
#: ``_MIN_BUDGET`` bytes) is refused by :func:`load_sparse` as crafted: real pruned weights do not
#: expand that much (a 4096 x 4096 float32 layer at 99.95% sparsity expands ~1000x).
MAX_EXPANSION = 1024
_MIN_BUDGET = 64 << 20


def encode_tensor(weight: torch.Tensor, mask: torch.Tensor, fmt: str = "auto") -> tuple[dict[str, Any], dict]:
    """Encode ``weight`` under boolean ``mask`` (True = kept) as parts plus a manifest entry.

    Returns ``(parts, entry)``: ``parts`` maps a part name (``values``, ``bitmask`` or
    ``crow``/``col``) to a contiguous CPU tensor; ``entry`` records format, shape, dtype and nnz.
    """
    check_choice("format", fmt, FORMATS)
    if not isinstance(weight, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("weight and mask must be torch tensors")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    if weight.ndim < 1:
        raise ValueError("cannot store a 0-d tensor sparsely")
    shape = tuple(int(v) for v in weight.shape)
    w = weight.detach().to("cpu").contiguous()
    m = mask.detach().to("cpu", torch.bool).contiguous()
    flat_mask = m.reshape(-1)
    values = w.reshape(-1)[flat_mask].contiguous()
    nnz = int(values.numel())
    chosen = choose_format(shape, nnz, fmt)
    parts: dict[str, torch.Tensor] = {"values": values}
    if chosen == "bitmask":
        bits = np.packbits(flat_mask.numpy().astype(np.uint8), bitorder="little")
        parts["bitmask"] = torch.from_numpy(bits)
    else:
        mat = m.reshape(shape[0], -1)
        counts = mat.sum(dim=1, dtype=torch.int64)
        crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(counts, 0)
        col = mat.nonzero(as_tuple=True)[1]
        parts["crow"] = crow.to(crow_dtype(nnz)).contiguous()
        parts["col"] = col.to(col_dtype(int(mat.shape[1]), nnz)).contiguous()
    entry = {"format": chosen, "shape": list(shape), "dtype": str(w.dtype).replace("torch.", ""), "nnz": nnz}
    return parts, entry


def _entry_shape(entry: Mapping[str, Any]) -> tuple[int, ...]:
    """The dense shape an entry records: 1 to 64 non-negative integers with an int64 element count."""
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_NDIM
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in shape)
        or math.prod(max(v, 1) for v in shape) >= 2**63
    ):
        raise CheckpointError(f"sparse entry has an invalid shape {_short(shape)}")
    return tuple(shape)


def _entry_nnz(entry: Mapping[str, Any], numel: int) -> int | None:
    """The recorded number of kept entries (None when the entry does not record it)."""
    if "nnz" not in entry:
        return None
    nnz = entry["nnz"]
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= numel:
        raise CheckpointError(f"sparse entry has nnz {_short(nnz)}, not an integer in [0, {numel}]")
    return nnz


def _part_sizes(fmt: str, shape: tuple[int, ...], nnz: int) -> dict[str, int]:
    """Number of elements each part of a tensor in format ``fmt`` must have."""
    numel = math.prod(shape)
    if fmt == "bitmask":
        return {"values": nnz, "bitmask": (numel + 7) // 8}
    return {"values": nnz, "crow": shape[0] + 1, "col": nnz}


def decode_tensor(
    parts: Mapping[str, torch.Tensor], entry: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`encode_tensor`: return ``(dense_weight, mask)``; raises on inconsistent parts.

    Every recorded size, dtype and index is checked against the parts before the dense tensor is
    allocated, so crafted metadata raises :class:`CheckpointError` rather than allocating or indexing
    out of range.
    """
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"sparse entry {_short(entry)} is not a mapping")
    fmt = entry.get("format")
    if not isinstance(fmt, str) or fmt not in _PARTS:
        raise CheckpointError(f"unknown sparse format {_short(fmt)}")
    missing = [p for p in _PARTS[fmt] if p not in parts]
    if missing:
        raise CheckpointError(f"sparse tensor in format {fmt!r} lacks parts {missing}")
    extra = sorted(set(parts) - set(_PARTS[fmt]))
    if extra:
        raise CheckpointError(
            f"sparse tensor in format {fmt!r} has unknown parts {[_short(e) for e in extra]}"
        )
    shape = _entry_shape(entry)
    numel = math.prod(shape)
    values = parts["values"]
    for part, t in parts.items():
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.layout != torch.strided:
            raise CheckpointError(f"sparse part {part!r} is not a 1-D tensor")
    nnz = _entry_nnz(entry, numel)
    if nnz is not None and values.numel() != nnz:
        raise CheckpointError(f"{values.numel()} stored values for nnz {nnz}")
    dtype = entry.get("dtype")
    if dtype is not None and dtype != str(values.dtype).replace("torch.", ""):
        raise CheckpointError(f"sparse entry says dtype {_short(dtype)} but its values are {values.dtype}")
    if values.numel() > numel:
        raise CheckpointError(f"{values.numel()} stored values for a shape of {numel} entries")
    if fmt == "bitmask":
        if parts["bitmask"].dtype != torch.uint8:
            raise CheckpointError(f"bitmask is {parts['bitmask'].dtype}, not uint8")
        bits = parts["bitmask"].to("cpu").numpy()
        if bits.size != (numel + 7) // 8:
            raise CheckpointError(f"bitmask of {bits.size} bytes does not fit shape {list(shape)}")
        flat = torch.from_numpy(np.unpackbits(bits, count=numel, bitorder="little").astype(bool))
        mask = flat.reshape(shape)
    else:
        crow, col = parts["crow"], parts["col"]
        if crow.dtype not in _INDEX_DTYPES or col.dtype not in _INDEX_DTYPES:
            raise CheckpointError(f"CSR indices are {crow.dtype}/{col.dtype}, not integers")
        crow, col = crow.to(torch.int64), col.to(torch.int64)
        rows, cols = shape[0], numel // shape[0] if shape[0] else 0
        if (
            crow.numel() != rows + 1
            or int(crow[0]) != 0
            or int(crow[-1]) != col.numel()
            or bool((crow[1:] < crow[:-1]).any())
            or (col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols))
        ):
            raise CheckpointError(f"CSR parts do not fit shape {list(shape)}")
        row_idx = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        mat = torch.zeros(rows, cols, dtype=torch.bool)
        mat[row_idx, col] = True
        mask = mat.reshape(shape)
    if int(mask.sum()) != values.numel():
        raise CheckpointError(f"{values.numel()} stored values for {int(mask.sum())} kept entries")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask.reshape(-1)] = values
    return dense.reshape(shape), mask


def encode_state_dict(
    state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], fmt: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Encode a state dict where the entries named in ``masks`` are stored sparsely.

    Returns ``(tensors, manifest)``: ``tensors`` holds dense entries under their own key and
    the parts of sparse entries under ``"<key>@<part>"``; ``manifest`` maps each sparse key to
    its entry (format, shape, dtype, nnz). Both go straight into a safetensors file.
    """
    check_choice("format", fmt, FORMATS)
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict] = {}
    for key, value in written_entries(state_dict, masks):  # a tied tensor once
        if key in masks:
            parts, entry = encode_tensor(value, masks[key], fmt)
            for part, t in parts.items():
                tensors[f"{key}{_SEP}{part}"] = t
            manifest[key] = entry
        else:
            tensors[key] = value.detach().to("cpu").contiguous()
    return tensors, manifest


def decode_state_dict(
    tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Invert :func:`encode_state_dict`: return ``(state_dict, masks)`` (masks as bool tensors)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if _SEP in key:
            base, part = key.rsplit(_SEP, 1)
            grouped.setdefault(base, {})[part] = t
        else:
            state[key] = t
    extra = sorted(set(grouped) - set(manifest))
    if extra:
        raise CheckpointError(f"sparse parts without a manifest entry: {[_short(e) for e in extra[:3]]}")
    both = sorted(set(state) & set(manifest))
    if both:
        raise CheckpointError(f"tensor {_short(both[0])} is stored both dense and sparse")
    masks: dict[str, torch.Tensor] = {}
    for key, entry in manifest.items():
        if key not in grouped:
            raise CheckpointError(f"manifest names sparse tensor {_short(key)} but the file lacks its parts")
        state[key], masks[key] = decode_tensor(grouped[key], entry)
    return state, masks


def manifest_from_metadata(metadata: Mapping[str, str] | None) -> dict[str, dict] | None:
    """The sparse manifest in a safetensors header's metadata, or None when the file has none.

    Its structure is checked (a mapping of tensor name to an entry with a known format, a valid
    shape and, where recorded, an nnz within it); :func:`dense_shapes` then checks it against the
    file's tensors.
    """
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        doc = json.loads(metadata[METADATA_KEY], parse_constant=_reject_constant)
        manifest = doc["tensors"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"corrupt sparse manifest: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError("corrupt sparse manifest: 'tensors' is not a mapping")
    for key, entry in manifest.items():
        if _SEP in key:
            raise CheckpointError(f"corrupt sparse manifest: tensor name {_short(key)} contains {_SEP!r}")
        if not isinstance(entry, dict):
            raise CheckpointError(f"corrupt sparse manifest: entry of {_short(key)} is not a mapping")
        try:
            if not isinstance(entry.get("format"), str) or entry["format"] not in _PARTS:
                raise CheckpointError(f"unknown sparse format {_short(entry.get('format'))}")
            _entry_nnz(entry, math.prod(_entry_shape(entry)))
        except CheckpointError as exc:
            raise CheckpointError(f"corrupt sparse manifest: tensor {_short(key)}: {exc}") from None
    return manifest


def dense_shapes(
    shapes: Mapping[str, tuple[int, ...]], manifest: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an encoded file as the model sees them: sparse parts folded into their tensor.

    Every sparse entry is checked against the stored shapes of its parts (the number of values,
    bitmask bytes, row pointers and column indices its shape and nnz imply), so a crafted manifest
    raises :class:`CheckpointError` here, before any tensor is read or allocated.
    """
    if not manifest:
        return dict(shapes)
    out = {k: tuple(v) for k, v in shapes.items() if _SEP not in k}
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for k, v in shapes.items():
        if _SEP in k:
            base, part = k.rsplit(_SEP, 1)
            grouped.setdefault(base, {})[part] = tuple(v)
    extra = sorted(set(grouped) - set(manifest))
    if extra:
        raise CheckpointError(f"sparse parts without a manifest entry: {[_short(e) for e in extra[:3]]}")
    for key, entry in manifest.items():
        if key in out:
            raise CheckpointError(f"tensor {_short(key)} is stored both dense and sparse")
        fmt = entry.get("format") if isinstance(entry, Mapping) else None
        if not isinstance(fmt, str) or fmt not in _PARTS:
            raise CheckpointError(f"sparse tensor {_short(key)}: unknown sparse format {_short(fmt)}")
        have = grouped.get(key, {})
        if set(have) != set(_PARTS[fmt]):
            raise CheckpointError(
                f"sparse tensor {_short(key)} in format {fmt!r} has parts {sorted(have)}, "
                f"expected {list(_PARTS[fmt])}"
            )
        shape = _entry_shape(entry)
        numel = math.prod(shape)
        values = have["values"]
        if len(values) != 1:
            raise CheckpointError(f"sparse tensor {_short(key)}: values part is not 1-D")
        nnz = _entry_nnz(entry, numel)
        nnz = values[0] if nnz is None else nnz
        for part, size in _part_sizes(fmt, shape, nnz).items():
            if have[part] != (size,):
                raise CheckpointError(
                    f"sparse tensor {_short(key)} of shape {list(shape)} and nnz {nnz}: part {part!r} "
                    f"is stored as {list(have[part])}, expected [{size}]"
                )
        out[key] = shape
    return out


def stored_nonzeros(state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> int:
    """Number of values a file written by :func:`encode_state_dict` holds (kept entries + dense entries)."""
    total = 0
    for key, value in state_dict.items():
        total += int(masks[key].sum()) if key in masks else int(value.numel())
    return total


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in an encoded state dict (the safetensors file adds a small header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_sparse(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    fmt: str = "auto",
) -> dict[str, dict]:
    """Write ``state_dict`` with the masked entries stored sparsely to one safetensors file (atomic).

    ``metadata`` (JSON-able) is stored beside the sparse manifest. Returns the manifest.
    """
    from safetensors.torch import save_file

    tensors, manifest = encode_state_dict(state_dict, masks, fmt)
    meta = {METADATA_KEY: json.dumps({"version": 1, "tensors": manifest}, sort_keys=True)}
    if metadata:
        meta["rmtprune.metadata"] = json.dumps(dict(metadata), sort_keys=True)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return manifest


def load_sparse(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_sparse`: ``(state_dict, masks, metadata)``.

    A plain safetensors file (no sparse manifest) loads with no masks. The manifest is checked
    against the stored tensors' shapes before any data is read, and a file whose sparse tensors
    would decode to more than :data:`MAX_EXPANSION` times its size is refused as crafted.
    """
    from safetensors import safe_open

    try:
        size = os.stat(path).st_size
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = list(fh.keys())
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {_one_line(exc)}") from None
    try:
        manifest = manifest_from_metadata(meta) or {}
        dense_shapes(shapes, manifest)
        user = json.loads(meta["rmtprune.metadata"]) if "rmtprune.metadata" in meta else {}
    except (CheckpointError, ValueError, RecursionError) as exc:
        why = _one_line(exc).removeprefix("corrupt sparse manifest: ")
        raise CheckpointError(f"corrupt sparse manifest in {str(path)!r}: {why}") from None
    decoded = sum(math.prod(_entry_shape(e)) * 8 for e in manifest.values())  # 8: widest dtype + mask
    if decoded > max(_MIN_BUDGET, MAX_EXPANSION * size):
        raise CheckpointError(
            f"{str(path)!r}: its sparse manifest would decode to {decoded} bytes, more than "
            f"{MAX_EXPANSION} times the file's {size} bytes; refused as corrupt or crafted"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in keys}
    except Exception as exc:
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {_one_line(exc)}") from None
    try:
        state, masks = decode_state_dict(tensors, manifest)
    except CheckpointError as exc:
        raise CheckpointError(f"corrupt sparse tensor in {str(path)!r}: {exc}") from None
    return state, masks, user


def save_model(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    metadata: Mapping[str, Any] | None = None,
    fmt: str = "auto",
) -> dict[str, dict]:
    """Save ``model``'s state dict with its masked layers stored sparsely (see :mod:`rmtprune.masks`)."""
    from .masks import masks_of

    return save_sparse(path, model.state_dict(), masks_of(model), metadata, fmt)


def load_sparse_into(path: str | os.PathLike[str], model: torch.nn.Module) -> dict[str, Any]:
    """Load a file written by :func:`save_model` (or plain safetensors) into ``model`` in place, with
    its masks restored.

    For state dicts saved here; :func:`rmtprune.load` reads rmtprune's model files (factored layers
    and masks), and :func:`rmtprune.weights_file.iter_tensors` anyone's. Returns the stored metadata;
    raises :class:`CheckpointError` when the tensors do not fit the model.
    """
    from .masks import remove_masks, restore_masks

    state, masks, meta = load_sparse(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{str(path)!r} does not fit the model: {first[1].strip() if len(first) > 1 else first[0]}"
        ) from None
    sd = model.state_dict()
    loaded = {sd[k].data_ptr() for k in state if k in sd}
    missing = [k for k in result.missing_keys if sd[k].data_ptr() not in loaded or not sd[k].numel()]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise CheckpointError(f"{str(path)!r} does not fit the model: {what}")
    remove_masks(model)
    restore_masks(model, masks)
    return meta


def load_model(path: str | os.PathLike[str], model: torch.nn.Module) -> dict[str, Any]:
    """Deprecated name of :func:`load_sparse_into` (kept for one release)."""
    import warnings

    warnings.warn(
        "rmtprune.sparse_format.load_model is deprecated; use load_sparse_into",
        DeprecationWarning,
        stacklevel=2,
    )
    return load_sparse_into(path, model)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors file's header (empty when it has none)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {_one_line(exc)}") from None
