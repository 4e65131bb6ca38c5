"""Read checkpoints lazily, one tensor at a time, and analyse every weight matrix in them.

Formats: a ``.safetensors`` file; a directory of safetensors shards (Hugging Face layout, with or
without ``*.safetensors.index.json``); a PyTorch state dict saved with ``torch.save``
(``.pt``/``.pth``/``.bin``), loaded with ``weights_only=True`` (no code execution) and memory-mapped
when the file is a zip archive. Only one tensor is materialised at a time, so the peak memory of
:func:`analyze_checkpoint` is set by the largest tensor, not by the model.

Bad input raises :class:`~rmtprune.errors.CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .analysis import VERDICTS, LayerAnalysis, analyze_tensor
from .errors import CheckpointError
from .spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX

__all__ = [
    "TensorInfo",
    "IgnoredTensor",
    "CheckpointAnalysis",
    "list_tensors",
    "iter_tensors",
    "analyze_checkpoint",
    "IGNORE_REASONS",
]

#: Why a tensor is not analysed: ``non-float`` (integer/bool/complex), ``1-d`` (biases, norm scales,
#: 0-D scalars), ``other-ndim`` (3-D such as Conv1d or stacked weights, 5-D and up), ``empty``.
IGNORE_REASONS = ("non-float", "1-d", "other-ndim", "empty")

_REASON_LABELS = {
    "non-float": "non-float",
    "1-d": "1-D/scalar",
    "other-ndim": "3-D or 5-D+",
    "empty": "empty",
}

_SAFETENSORS_DTYPES = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
}
# reading a tensor's bytes: torch dtype spelling -> bytes per element, for the safetensors dtypes
_ITEMSIZE = {dtype: size for dtype, size in _SAFETENSORS_DTYPES.values()}
_REOPEN_BYTES = 256 * 2**20  # a safetensors handle is reopened after this many bytes were read through it
_MAX_HEADER = 100_000_000  # the safetensors format caps its JSON header at 100 MB
_MAX_INT = 2**63  # sizes, offsets and element counts must fit an int64
_MAX_NDIM = 64  # torch's own limit on tensor dimensions
_MAX_DEPTH = 100  # nesting of dicts in a torch.save state dict
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save(..., _use_new_zipfile_serialization=False) starts with the pickled magic 0x1950a86a20f9469cfc6c
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype (torch spelling, e.g. ``float32``) of one tensor in a checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def is_float(self) -> bool:
        """Whether the dtype is a real floating-point type."""
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class IgnoredTensor:
    """A tensor that was not analysed and why (``reason`` is one of :data:`IGNORE_REASONS`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "reason": self.reason}


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (at most 200 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _natural_key(name: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [(0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------- sources


class _Source:
    """A readable checkpoint: an ordered listing plus lazy reads."""

    format = ""

    def infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def read(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _parse_json(raw: bytes | str) -> Any:
    """Strict JSON: no ``NaN``/``Infinity`` and a clear error (not a RecursionError) for deep nesting."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _as_size(value: Any, what: str) -> int:
    """A JSON value that must be a non-negative integer below 2**63 (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_INT:
        raise ValueError(f"{what} {_short(value)} is not a non-negative integer below 2**63")
    return value


def _short(value: Any) -> str:
    """A JSON value, shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_shape(value: Any) -> tuple[int, ...]:
    """A tensor shape: a list of at most 64 sizes whose product (zeros aside) stays below 2**63."""
    if not isinstance(value, list):
        raise ValueError(f"shape {_short(value)} is not a list")
    if len(value) > _MAX_NDIM:
        raise ValueError(f"shape has {len(value)} dimensions (at most {_MAX_NDIM})")
    shape = tuple(_as_size(v, "shape entry") for v in value)
    if math.prod(max(v, 1) for v in shape) >= _MAX_INT:
        raise ValueError(f"shape {list(shape)} has more than 2**63 elements")
    return shape


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading tensor data (clear errors for bad files).

    Every entry is checked as the safetensors reader would (a known dtype string, a shape of
    non-negative integers, offsets that match the byte size and tile the data without gaps or
    overlaps), so a crafted header fails here, naming the tensor, before anything is allocated.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{str(path)!r} is not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        first = fh.read(1)
        if first != b"{":
            raise CheckpointError(f"{str(path)!r} is not a safetensors file: no JSON header after 8 bytes")
        if n > _MAX_HEADER:
            raise CheckpointError(
                f"{str(path)!r} is not a valid safetensors file: its header of {n} bytes exceeds the "
                f"{_MAX_HEADER // 1_000_000} MB safetensors limit"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{str(path)!r} is truncated: its safetensors header declares {n} bytes but the file "
                f"has only {size - 8} after the 8-byte length"
            )
        raw = first + fh.read(n - 1)
    try:
        header = _parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        why = _one_line(exc)
        raise CheckpointError(
            f"{str(path)!r} is not a safetensors file: header is not JSON ({why})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r} is not a safetensors file: header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(
            f"{str(path)!r} is not a valid safetensors file: __metadata__ is not a map of strings"
        )
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(entry, dict):
                raise ValueError("entry is not an object")
            missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
            if missing:
                raise ValueError(f"no {missing[0]!r}")
            code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(code, str) or not code or len(code) > 32:
                raise ValueError(f"dtype {_short(code)} is not a dtype name")
            shape = _check_shape(shape)
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError(f"data_offsets {_short(offsets)} is not a [begin, end] pair")
            begin, end = (_as_size(v, "data offset") for v in offsets)
            if begin > end:
                raise ValueError(f"data_offsets [{begin}, {end}] end before they begin")
        except ValueError as exc:
            raise CheckpointError(
                f"{str(path)!r} is not a valid safetensors file: tensor {_short(name)}: {exc}"
            ) from None
        dtype, itemsize = _SAFETENSORS_DTYPES.get(code, (code.lower(), None))
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{str(path)!r} is not a valid safetensors file: tensor {_short(name)} of shape "
                f"{list(shape)} and dtype {code} has {end - begin} bytes"
            )
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, shape, dtype)
    spans.sort()
    end_max = max((end for _, end, _ in spans), default=0)
    if end_max > data_len:
        raise CheckpointError(
            f"{str(path)!r} is truncated: its header says the tensor data takes {end_max} bytes but "
            f"only {data_len} follow the header"
        )
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CheckpointError(
                f"{str(path)!r} is not a valid safetensors file: tensor {_short(name)} at bytes "
                f"{begin}-{end} {what}"
            )
        pos = end
    if pos != data_len:
        raise CheckpointError(
            f"{str(path)!r} is not a valid safetensors file: the tensors take {pos} bytes but "
            f"{data_len} follow the header"
        )
    return out


class _SafetensorsFile(_Source):
    """One ``.safetensors`` file, read tensor by tensor through ``safe_open`` (memory-mapped)."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._infos = _read_safetensors_header(path)

    def infos(self) -> list[TensorInfo]:
        return sorted(self._infos.values(), key=lambda i: _natural_key(i.name))

    def _nbytes(self, name: str) -> int:
        """Bytes of tensor data ``name`` takes (an unknown dtype counts as the whole budget)."""
        info = self._infos.get(name)
        itemsize = _ITEMSIZE.get(info.dtype) if info is not None else None
        return _REOPEN_BYTES if itemsize is None else info.numel * itemsize

    def read(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        import safetensors

        # One handle serves tensors until _REOPEN_BYTES have been read through it; then it is closed
        # and a fresh one opened. Closing unmaps the file, so the pages of tensors already read do not
        # stay resident while a large shard is read (measured: +1.1 GB on 1 GB shards with a single
        # handle). Reusing the handle keeps the cost linear in the number of tensors: each safe_open
        # parses the whole header, and one open per tensor made 10,000 tiny tensors take minutes.
        fh: Any = None
        used = 0
        try:
            for name in names:
                size = self._nbytes(name)
                try:
                    if fh is not None and used + size > _REOPEN_BYTES:
                        old, fh = fh, None
                        old.__exit__(None, None, None)
                    if fh is None:
                        fh = safetensors.safe_open(str(self.path), framework="pt", device="cpu").__enter__()
                        used = 0
                    tensor = fh.get_tensor(name)
                except (KeyboardInterrupt, SystemExit, GeneratorExit):
                    raise
                except BaseException as exc:  # the reader's own error type, or a Rust panic (pyo3's
                    # PanicException is a BaseException)
                    raise CheckpointError(f"{str(self.path)!r} could not be read: {_one_line(exc)}") from None
                used += size
                yield name, tensor
                del tensor
        finally:
            if fh is not None:
                fh.__exit__(None, None, None)


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _check_tensor(name: str, t: Any, path: Path) -> None:
    """Refuse tensors the analysis cannot read as plain dense CPU arrays (named in the message)."""
    import torch

    if t.is_nested:
        kind, hint = "a nested tensor", "save its components as separate tensors"
    elif t.layout != torch.strided:
        kind, hint = f"a sparse tensor ({str(t.layout).replace('torch.', '')})", "save t.to_dense()"
    elif t.is_quantized:
        kind, hint = f"a quantized tensor ({str(t.dtype).replace('torch.', '')})", "save t.dequantize()"
    elif t.device.type != "cpu":
        kind, hint = f"a {t.device.type} tensor, which holds no data", "save the materialised tensor"
    else:
        return
    raise CheckpointError(
        f"{str(path)!r}: tensor {_short(name)} is {kind}; only dense tensors can be analysed ({hint})"
    )


def _walk(obj: Mapping, path: Path) -> Iterator[tuple[str, Any]]:
    """Every tensor under ``obj`` as ``(dotted name, tensor)`` in key order, without recursion.

    Non-string keys (an optimizer state's parameter ids) are not followed. A dict that contains
    itself or nesting deeper than ``_MAX_DEPTH`` raises :class:`CheckpointError`.
    """
    stack: list[tuple[str, Iterator[tuple[Any, Any]]]] = [("", iter(obj.items()))]
    open_ids = [id(obj)]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            if not isinstance(key, str):
                continue
            if _is_tensor(value):
                yield prefix + key, value
            elif isinstance(value, Mapping):
                if id(value) in open_ids:
                    raise CheckpointError(
                        f"{str(path)!r}: dict {_short(prefix + key)} contains itself; not a state dict"
                    )
                if len(stack) >= _MAX_DEPTH:
                    raise CheckpointError(
                        f"{str(path)!r} holds dicts nested more than {_MAX_DEPTH} levels deep "
                        f"(at {_short(prefix + key)}); not a state dict"
                    )
                stack.append((f"{prefix}{key}.", iter(value.items())))
                open_ids.append(id(value))
                break
        else:
            stack.pop()
            open_ids.pop()


def _has_tensors(obj: Mapping, path: Path) -> bool:
    return next(_walk(obj, path), None) is not None


def _flatten_state(obj: Mapping, path: Path) -> dict[str, Any]:
    return dict(_walk(obj, path))


def _unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """The tensors of a loaded object, unwrapping ``{"state_dict": {...}}``-style nesting.

    A level with no tensor of its own and exactly one child that holds tensors is unwrapped
    (``state_dict``, ``model``, ... beside ``epoch`` or an optimizer state, whose int-keyed entries
    are not followed). When several children hold tensors (say ``model`` and ``ema``) nothing is
    guessed: all are kept, named ``model.fc1.weight``, ``ema.fc1.weight``, ...
    """
    if _is_tensor(obj):
        raise CheckpointError(
            f"{str(path)!r} holds a single tensor, not a state dict; save a dict such as {{'weight': t}}"
        )
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors")
    unwrapped: list[str] = []
    while True:
        direct = any(isinstance(k, str) and _is_tensor(v) for k, v in obj.items())
        bearing = [
            k
            for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, Mapping) and _has_tensors(v, path)
        ]
        if direct or len(bearing) != 1:
            break
        unwrapped.append(bearing[0])
        obj = obj[bearing[0]]
    tensors = _flatten_state(obj, path)
    for name, t in tensors.items():
        _check_tensor(name, t, path)
    if not tensors:
        keys = ", ".join(_short(k) for k in list(obj)[:8])
        raise CheckpointError(f"{str(path)!r} holds no tensors (keys: {keys or 'none'})")
    return tensors, unwrapped


def _module_exists(qualname: str) -> bool:
    """Whether the top-level package of a pickled global is installed (looked up, not imported)."""
    import importlib.util

    top = qualname.split(".")[0]
    if top in ("__main__", "builtins") or top in sys.modules:
        return True
    try:
        return bool(top) and importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _torch_load(path: Path, mmap: bool) -> Any:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the errors say enough
            if path.name.endswith(".safetensors"):
                # torch.load hands a path named *.safetensors to the safetensors reader whatever its
                # content; a file object makes it read the torch.save archive the magic says it is.
                with open(path, "rb") as fh:
                    return torch.load(fh, weights_only=True, map_location="cpu")
            return torch.load(str(path), weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if found and not _module_exists(found.group(1)):
            raise CheckpointError(
                f"{str(path)!r} is truncated or corrupt: its pickle names {found.group(1)!r}, "
                "which is not an installed module"
            ) from None
        if found:
            raise CheckpointError(
                f"{str(path)!r} cannot be loaded without arbitrary code execution (it pickles "
                f"{found.group(1)}, not only tensors), which rmtprune refuses for safety; where you trust "
                "the file, save model.state_dict() or convert it to .safetensors "
                "(safetensors.torch.save_file)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", msg, re.S)
        why = " ".join((detail.group(1) if detail else msg.splitlines()[0]).split())
        raise CheckpointError(
            f"{str(path)!r} could not be unpickled safely ({why}): it is corrupt, or it needs arbitrary "
            "code execution, which rmtprune refuses for safety; convert it to .safetensors where you trust it"
        ) from None
    except EOFError:
        raise CheckpointError(f"{str(path)!r} is truncated: the PyTorch pickle ends early") from None
    except RuntimeError as exc:
        msg = str(exc)
        if mmap and "mmap can only be used" in msg:
            return _torch_load(path, mmap=False)
        first = msg.splitlines()[0] if msg else type(exc).__name__
        if "central directory" in msg or "failed reading" in msg:
            raise CheckpointError(f"{str(path)!r} is truncated or corrupt: {first.split('. ')[0]}") from None
        if "data.pkl" in msg or "file not found" in msg:
            raise CheckpointError(f"{str(path)!r} is a zip archive but not a PyTorch checkpoint") from None
        raise CheckpointError(f"{str(path)!r} could not be loaded by torch.load: {first}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # anything else torch.load raises on a crafted archive is a corrupt file
        raise CheckpointError(
            f"{str(path)!r} is corrupt: torch.load failed ({type(exc).__name__}: {_one_line(exc)})"
        ) from None


def _check_torch_zip(path: Path) -> None:
    """A torch.save zip archive has ``<name>/data.pkl``; a cut file has no central directory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception as exc:  # zipfile raises BadZipFile, but also ValueError, UnicodeDecodeError, ...
        raise CheckpointError(
            f"{str(path)!r} is truncated or corrupt: unreadable zip archive ({_one_line(exc)})"
        ) from None
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"{str(path)!r} is a zip archive but not a PyTorch checkpoint (no data.pkl)")


_INT_OPS = frozenset(("INT", "LONG", "BININT", "BININT1", "BININT2", "LONG1", "LONG4"))
_PUT_OPS = frozenset(("PUT", "BINPUT", "LONG_BINPUT"))
_GET_OPS = frozenset(("GET", "BINGET", "LONG_BINGET"))


def _check_legacy_sizes(path: Path) -> None:
    """Refuse a legacy ``torch.save`` file whose pickle declares a storage larger than the file.

    The legacy loader allocates every storage at the size its pickle records before reading the
    data, so a crafted size would reserve that memory; each storage's bytes are in the file, so no
    honest size exceeds it. A malformed pickle (a string longer than the file, ...) is refused here
    too, before ``torch.load`` allocates what it declares.
    """
    import pickletools

    size = path.stat().st_size
    try:
        with open(path, "rb") as raw:
            fh = _Capped(raw, size)
            for _ in range(3):  # magic number, protocol version, system info
                for _ in pickletools.genops(fh):
                    pass
            recent: list[int] = []
            memo: dict[Any, int] = {}
            last_int: int | None = None
            for op, arg, _ in pickletools.genops(fh):
                name = op.name
                value: int | None = None
                if name in _INT_OPS and isinstance(arg, int):
                    value = arg
                elif name in _GET_OPS:
                    value = memo.get(arg)
                elif name in _PUT_OPS and last_int is not None:
                    memo[arg] = last_int
                elif name == "MEMOIZE" and last_int is not None:
                    memo[len(memo)] = last_int
                elif "UNICODE" in name and arg == "storage":
                    recent = []
                elif name == "BINPERSID":
                    big = max(recent, default=0)
                    if big > size:
                        raise CheckpointError(
                            f"{str(path)!r} is truncated or corrupt: it declares a storage of {big} "
                            f"elements, more than the file's {size} bytes"
                        )
                    recent = []
                if value is not None:
                    recent.append(value)
                if name not in _PUT_OPS and name != "MEMOIZE":
                    last_int = value
            for _ in pickletools.genops(fh):  # the list of storage keys
                pass
    except CheckpointError:
        raise
    except Exception as exc:  # not a valid pickle (torch.load would fail too, maybe allocating first)
        raise CheckpointError(
            f"{str(path)!r} is truncated or corrupt: its legacy torch.save pickle is malformed "
            f"({_one_line(exc)})"
        ) from None


class _Capped:
    """A binary file whose reads never ask for more than what is left (a crafted length in a pickle
    would otherwise make the buffered reader allocate that much up front)."""

    def __init__(self, fh: Any, size: int) -> None:
        self.fh = fh
        self.size = size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.fh.tell())
        return self.fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.fh.readline(1 << 20)


class _TorchFile(_Source):
    """A ``torch.save`` state dict, loaded with ``weights_only=True`` and memory-mapped when zipped."""

    format = "torch"

    def __init__(self, path: Path, legacy: bool) -> None:
        self.path = path
        self.legacy = legacy
        self.format = "torch-legacy" if legacy else "torch"
        if legacy:
            _check_legacy_sizes(path)
        else:
            _check_torch_zip(path)
        obj = _torch_load(path, mmap=not legacy)
        self._tensors, self.unwrapped = _unwrap_state_dict(obj, path)

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(name, tuple(int(v) for v in t.shape), str(t.dtype).replace("torch.", ""))
            for name, t in self._tensors.items()
        ]

    def read(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        for name in names:
            yield name, self._tensors[name]


class _Sharded(_Source):
    """Several shards read as one checkpoint; ``weight_map`` (tensor -> shard) comes from an index or
    from the shards' own listings."""

    def __init__(self, where: Path, shards: dict[str, _Source], weight_map: dict[str, str], fmt: str) -> None:
        self.where = where
        self.shards = shards
        self.weight_map = weight_map
        self.format = fmt
        self._infos: dict[str, TensorInfo] = {}
        by_shard = {key: {i.name: i for i in src.infos()} for key, src in shards.items()}
        for name, key in weight_map.items():
            info = by_shard[key].get(name)
            if info is None:
                raise CheckpointError(
                    f"{str(where)!r}: the index puts tensor {name!r} in shard {key!r}, which does not hold it"
                )
            self._infos[name] = info

    def infos(self) -> list[TensorInfo]:
        return sorted(self._infos.values(), key=lambda i: _natural_key(i.name))

    def read(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        # Group by shard (one open per shard), keep the requested order within each shard.
        order: dict[str, list[str]] = {}
        for name in names:
            order.setdefault(self.weight_map[name], []).append(name)
        for key in sorted(order, key=_natural_key):
            yield from self.shards[key].read(order[key])


def _sniff(path: Path) -> str:
    """``safetensors``, ``torch``, ``torch-legacy`` from the first bytes, else a clear error."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if path.suffix == ".safetensors":
        return "safetensors"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"
    if head.startswith(b"\x80"):
        raise CheckpointError(
            f"{str(path)!r} is a Python pickle but not a torch.save checkpoint (no PyTorch magic number)"
        )
    if path.suffix in _TORCH_SUFFIXES:
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint: neither a torch.save zip archive nor a "
            f"legacy torch.save pickle (starts with {head[:8]!r})"
        )
    raise CheckpointError(
        f"{str(path)!r} is not a checkpoint: expected a .safetensors file, a directory of safetensors "
        f"shards, or a torch.save state dict (.pt/.pth/.bin); it starts with {head[:8]!r}"
    )


def _open_file(path: Path) -> _Source:
    kind = _sniff(path)
    if kind == "safetensors":
        return _SafetensorsFile(path)
    return _TorchFile(path, legacy=(kind == "torch-legacy"))


def _check_shard_name(shard: str, index: Path) -> None:
    """An index may only name plain files beside it: no directories, ``..`` or absolute paths."""
    if (
        not shard
        or len(shard) > 255
        or shard in (".", "..")
        or "/" in shard
        or "\\" in shard
        or "\0" in shard
        or Path(shard).is_absolute()
        or Path(shard).drive
    ):
        raise CheckpointError(
            f"index {str(index)!r} names shard {_short(shard)}, which is not a plain file name in the "
            "index's directory; refused (an index may only point at files beside it)"
        )


def _open_index(index: Path) -> _Source:
    try:
        if index.stat().st_size > _MAX_HEADER:
            raise CheckpointError(f"index {str(index)!r} is larger than {_MAX_HEADER} bytes; not an index")
        data = json.loads(index.read_bytes().decode("utf-8"))  # NaN in its metadata is harmless
    except RecursionError:
        raise CheckpointError(f"index {str(index)!r} is not readable JSON: nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"index {str(index)!r} is not readable JSON: {_one_line(exc)}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"index {str(index)!r} has no 'weight_map' of tensor name -> shard file")
    if not weight_map:
        raise CheckpointError(f"index {str(index)!r} has an empty weight_map")
    shards: dict[str, _Source] = {}
    for shard in sorted(set(weight_map.values()), key=_natural_key):
        _check_shard_name(shard, index)
        shard_path = index.parent / shard
        try:
            present = shard_path.is_file()
        except OSError:  # a name the file system refuses (too long, ...)
            present = False
        if not present:
            n = sum(1 for v in weight_map.values() if v == shard)
            raise CheckpointError(
                f"shard {shard!r} named by index {str(index)!r} is missing ({n} tensors are mapped to it)"
            )
        shards[shard] = _open_file(shard_path)
    fmt = "safetensors-sharded" if index.name.endswith(".safetensors.index.json") else "torch-sharded"
    return _Sharded(index, shards, dict(weight_map), fmt)


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _check_shard_set(path: Path, names: list[str]) -> None:
    """Shards named ``STEM-00001-of-00003.safetensors`` must all be there (none missing, one total)."""
    groups: dict[str, tuple[set[int], set[str], str]] = {}
    for name in names:
        m = _SHARD_NAME.match(name)
        if m is None:
            continue
        have, totals, width = groups.setdefault(m["stem"], (set(), set(), m["i"]))
        have.add(int(m["i"]))
        totals.add(m["n"])
    for stem, (have, totals, width) in groups.items():
        if len(totals) > 1:
            raise CheckpointError(
                f"directory {str(path)!r}: shards of {stem!r} disagree on their number "
                f"(-of-{', -of-'.join(sorted(totals))}); it mixes checkpoints"
            )
        total_s = totals.pop()
        total = int(total_s)
        missing = [i for i in range(1, min(total, 10**6) + 1) if i not in have]
        extra = sorted(i for i in have if not 1 <= i <= total)
        if extra:
            raise CheckpointError(
                f"directory {str(path)!r}: shard {stem}-{extra[0]:0{len(width)}d}-of-{total_s}.safetensors "
                f"is numbered beyond {total}"
            )
        if missing:
            first = f"{stem}-{missing[0]:0{len(width)}d}-of-{total_s}.safetensors"
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"directory {str(path)!r} is missing shard {first!r}{more}: "
                f"{len(have)} of {total} shards are present"
            )


def _open_dir(path: Path) -> _Source:
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(
            f"directory {str(path)!r} holds several index files ({names}): pass one of them"
        )
    if indexes:
        return _open_index(indexes[0])
    files = sorted((p for p in path.glob("*.safetensors") if p.is_file()), key=lambda p: _natural_key(p.name))
    if files:
        _check_shard_set(path, [p.name for p in files])
        if len(files) == 1:
            return _SafetensorsFile(files[0])
        shards = {p.name: _SafetensorsFile(p) for p in files}
        weight_map: dict[str, str] = {}
        for key, src in shards.items():
            for info in src.infos():
                if info.name in weight_map:
                    raise CheckpointError(
                        f"directory {str(path)!r}: tensor {info.name!r} is in both {weight_map[info.name]!r} "
                        f"and {key!r}; it holds more than one checkpoint, pass a file instead"
                    )
                weight_map[info.name] = key
        return _Sharded(path, shards, weight_map, "safetensors-sharded")
    torch_indexes = sorted(path.glob("*.bin.index.json"))
    if len(torch_indexes) == 1:
        return _open_index(torch_indexes[0])
    others = sorted(p.name for p in path.iterdir() if p.suffix in _TORCH_SUFFIXES)
    hint = f" (it has {', '.join(others[:3])}: pass such a file instead)" if others else ""
    raise CheckpointError(f"directory {str(path)!r} holds no *.safetensors files{hint}")


def _open(path: str | os.PathLike[str]) -> _Source:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist")
    if p.is_dir():
        return _open_dir(p)
    if p.name.endswith(".index.json"):
        return _open_index(p)
    try:
        return _open_file(p)
    except PermissionError as exc:
        raise CheckpointError(f"{str(p)!r} is not readable: {exc.strerror}") from None
    except IsADirectoryError:  # pragma: no cover - guarded above
        raise CheckpointError(f"{str(p)!r} is a directory") from None


# ----------------------------------------------------------------------------------------- public API


def list_tensors(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """Names, shapes and dtypes of all tensors in a checkpoint, without reading tensor data.

    Safetensors headers are parsed directly; PyTorch zip checkpoints are memory-mapped, so only
    the pickled structure is read (legacy non-zip ``torch.save`` files have to be loaded whole).
    """
    return _open(path).infos()


def iter_tensors(
    path: str | os.PathLike[str], names: Iterable[str] | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` pairs one at a time (CPU tensors), in :func:`list_tensors` order.

    ``names`` restricts the reads to those tensors; an unknown name raises :class:`CheckpointError`.
    Each tensor is read only when the iterator reaches it.
    """
    src = _open(path)
    yield from _iter_source(src, path, names)


def _iter_source(src: _Source, path: Any, names: Iterable[str] | None) -> Iterator[tuple[str, Any]]:
    listed = [i.name for i in src.infos()]
    if names is None:
        wanted = listed
    else:
        if isinstance(names, str):
            names = [names]
        want = set(names)
        missing = sorted(want - set(listed))
        if missing:
            raise CheckpointError(f"{str(path)!r} has no tensor named {missing[0]!r}")
        wanted = [n for n in listed if n in want]
    yield from src.read(wanted)


def _compile_patterns(patterns: str | Iterable[str] | None, option: str) -> tuple[re.Pattern[str], ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"{option} patterns must be strings, got {type(pat).__name__}")
        try:
            out.append(re.compile(pat))
        except re.error as exc:
            raise ValueError(f"{option} pattern {pat!r} is not a valid regular expression: {exc}") from None
    return tuple(out)


def _check_params(alpha: float, beta: float, ks_max: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta), ("ks_max", ks_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}={value!r} must be a number")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha!r} must be in (0, 0.5) (trim fraction of the BEMA window)")
    if not 0.01 <= beta <= 0.99:
        raise ValueError(f"beta={beta!r} must be in [0.01, 0.99] (Tracy-Widom level of the edge)")
    if not 0.0 <= ks_max <= 1.0:
        raise ValueError(f"ks_max={ks_max!r} must be in [0, 1] (gate on the KS distance)")


def _ignore_reason(info: TensorInfo) -> str | None:
    if not info.is_float:
        return "non-float"
    if len(info.shape) <= 1:
        return "1-d"
    if len(info.shape) not in (2, 4):
        return "other-ndim"
    if info.numel == 0:
        return "empty"
    return None


@dataclass
class CheckpointAnalysis:
    """Result of :func:`analyze_checkpoint`: one :class:`LayerAnalysis` per 2-D/4-D float tensor.

    ``ignored`` lists the tensors that matched the filters but were not analysed, with the reason;
    ``n_tensors`` counts every tensor in the checkpoint and ``n_matched`` those the include/exclude
    patterns kept.
    """

    path: str
    format: str
    layers: list[LayerAnalysis]
    ignored: list[IgnoredTensor] = field(default_factory=list)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    n_tensors: int = 0
    n_matched: int = 0
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    ks_max: float = DEFAULT_KS_MAX
    unwrapped: tuple[str, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        """Number of layers per verdict (every verdict present, in :data:`VERDICTS` order)."""
        c = Counter(la.verdict for la in self.layers)
        return {v: c.get(v, 0) for v in VERDICTS}

    @property
    def ignored_counts(self) -> dict[str, int]:
        """Number of ignored tensors per reason (every reason present)."""
        c = Counter(t.reason for t in self.ignored)
        return {r: c.get(r, 0) for r in IGNORE_REASONS}

    @property
    def has_invalid(self) -> bool:
        """Whether any layer has NaN/Inf weights (verdict ``invalid``)."""
        return any(la.verdict == "invalid" for la in self.layers)

    @property
    def invalid_layers(self) -> list[str]:
        """Names of the layers with verdict ``invalid``."""
        return [la.name for la in self.layers if la.verdict == "invalid"]

    def summary(self) -> str:
        """One line: layers per verdict, ignored tensors per reason, tensors filtered out."""
        counts = ", ".join(f"{n} {v}" for v, n in self.counts.items())
        out = f"{_plural(len(self.layers), 'layer')} analysed ({counts})"
        ign = ", ".join(f"{n} {_REASON_LABELS[r]}" for r, n in self.ignored_counts.items() if n)
        out += f"; {_plural(len(self.ignored), 'tensor')} ignored" + (f" ({ign})" if ign else "")
        if self.include or self.exclude:
            dropped = self.n_tensors - self.n_matched
            out += f"; {dropped} of {self.n_tensors} tensors filtered out by include/exclude"
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the whole analysis."""
        from . import __version__

        return {
            "rmtprune_version": __version__,
            "checkpoint": self.path,
            "format": self.format,
            "unwrapped": list(self.unwrapped),
            "alpha": self.alpha,
            "beta": self.beta,
            "ks_max": self.ks_max,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "n_tensors": self.n_tensors,
            "n_matched": self.n_matched,
            "counts": self.counts,
            "ignored_counts": self.ignored_counts,
            "layers": [la.to_dict() for la in self.layers],
            "ignored": [t.to_dict() for t in self.ignored],
        }


def analyze_checkpoint(
    path: str | os.PathLike[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    ks_max: float = DEFAULT_KS_MAX,
    progress: bool | None = None,
) -> CheckpointAnalysis:
    """Analyse every 2-D and 4-D floating-point tensor of a checkpoint, one tensor in memory at a time.

    Parameters
    ----------
    path : a ``.safetensors`` file, a directory of safetensors shards (or its ``*.index.json``),
        or a ``torch.save`` state dict (``.pt``/``.pth``/``.bin``; nested ``{"state_dict": ...}``
        is unwrapped).
    include, exclude : regular expressions (``re.search`` on the tensor name); a tensor is kept when
        it matches any ``include`` (or none are given) and no ``exclude``.
    alpha, beta : BEMA trim fraction and Tracy-Widom level (METHOD.md section 3).
    ks_max : gate on the KS distance: above it a layer's verdict is ``no-mp-bulk``.
    progress : show a progress bar (``None``: only when stderr is a terminal).

    Returns
    -------
    CheckpointAnalysis
        Layers with NaN/Inf weights get verdict ``invalid`` and the others are still analysed;
        check :attr:`CheckpointAnalysis.has_invalid`. 1-D, non-float and 3-D tensors are listed in
        ``ignored`` with the reason.

    Raises
    ------
    CheckpointError
        for a missing, empty, truncated, unsafe or unrecognised checkpoint.
    ValueError
        for a pattern that does not compile, parameters out of range, or filters that match nothing.
    """
    from ._progress import progress as _progress

    _check_params(alpha, beta, ks_max)
    inc = _compile_patterns(include, "include")
    exc = _compile_patterns(exclude, "exclude")
    src = _open(path)
    infos = src.infos()
    matched = [
        i
        for i in infos
        if (not inc or any(p.search(i.name) for p in inc)) and not any(p.search(i.name) for p in exc)
    ]
    if (inc or exc) and not matched:
        raise ValueError(
            f"no tensor of {str(path)!r} matches include={[p.pattern for p in inc]} "
            f"exclude={[p.pattern for p in exc]} ({len(infos)} tensors, e.g. {infos[0].name!r})"
        )
    ignored: list[IgnoredTensor] = []
    todo: list[TensorInfo] = []
    for info in matched:
        reason = _ignore_reason(info)
        if reason is None:
            todo.append(info)
        else:
            ignored.append(IgnoredTensor(info.name, info.shape, info.dtype, reason))
    layers: list[LayerAnalysis] = []
    reads = _iter_source(src, path, [i.name for i in todo])
    for name, tensor in _progress(reads, total=len(todo), desc="analyze", enable=progress):
        layers.append(_analyze_one(name, tensor, alpha, beta, ks_max))
        del tensor
    return CheckpointAnalysis(
        path=str(path),
        format=src.format,
        layers=layers,
        ignored=ignored,
        include=tuple(p.pattern for p in inc),
        exclude=tuple(p.pattern for p in exc),
        n_tensors=len(infos),
        n_matched=len(matched),
        alpha=float(alpha),
        beta=float(beta),
        ks_max=float(ks_max),
        unwrapped=tuple(getattr(src, "unwrapped", ())),
    )


def _analyze_one(name: str, tensor: Any, alpha: float, beta: float, ks_max: float) -> LayerAnalysis:
    """:func:`analyze_tensor`, upcasting 8-bit floats (torch has no ``isfinite`` for them)."""
    import torch

    dtype = str(tensor.dtype).replace("torch.", "")
    if tensor.dtype.itemsize == 1:
        tensor = tensor.to(torch.float32)
    la = analyze_tensor(name, tensor, alpha=alpha, beta=beta, ks_max=ks_max)
    la.dtype = dtype
    return la
