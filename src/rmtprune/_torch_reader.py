"""Read a ``torch.save`` state dict safely: ``weights_only=True`` (no code execution), memory-mapped
when it is a zip archive, legacy pickles checked for oversized storages before ``torch.load``, and
nested ``{"state_dict": ...}`` wrappers unwrapped."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ._tensor_source import TensorInfo, _one_line, _short, _Source
from .errors import CheckpointError

_MAX_DEPTH = 100  # nesting of dicts in a torch.save state dict
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save(..., _use_new_zipfile_serialization=False) starts with the pickled magic 0x1950a86a20f9469cfc6c
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


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
