"""Read one ``.safetensors`` file: its header checked field by field before anything is allocated,
then its tensors one at a time, as torch tensors through ``safe_open`` (memory-mapped), or as numpy
arrays straight from the file (no torch: what ``rmtprune analyze`` uses for the float dtypes)."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._tensor_source import (
    _MAX_HEADER,
    TensorInfo,
    _as_size,
    _check_shape,
    _natural_key,
    _one_line,
    _parse_json,
    _short,
    _Source,
)
from .errors import CheckpointError

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


def _widen_bf16(raw: Any) -> Any:
    """bfloat16 bits (uint16) -> float32, exactly: the bits are the high half of the float32."""
    import numpy as np

    return (raw.astype(np.uint32) << 16).view(np.float32)


def _fp8_table(exp_bits: int, man_bits: int, fn: bool) -> Any:
    """The 256 float32 values of an 8-bit float (OCP FP8: E4M3 ``fn`` has no infinities and one NaN
    pattern per sign, S.1111.111; E5M2 is IEEE-like, exponent 31 is inf/NaN)."""
    import numpy as np

    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    frac = man / float(1 << man_bits)
    vals = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1.0 + frac) * 2.0 ** (exp - bias)) * sign
    top = (1 << exp_bits) - 1
    if fn:
        vals[(exp == top) & (man == (1 << man_bits) - 1)] = np.nan
    else:
        vals[(exp == top) & (man == 0)] = np.inf * sign[(exp == top) & (man == 0)]
        vals[(exp == top) & (man != 0)] = np.nan
    return vals.astype(np.float32)


_FP8_TABLES: dict[str, Any] = {}


def _fp8_reader(dtype: str, exp_bits: int, man_bits: int, fn: bool) -> Any:
    def convert(raw: Any) -> Any:
        if dtype not in _FP8_TABLES:
            _FP8_TABLES[dtype] = _fp8_table(exp_bits, man_bits, fn)
        return _FP8_TABLES[dtype][raw]

    return convert


#: torch dtype spelling -> (numpy dtype of the raw little-endian bytes, conversion or None).
_NUMPY_READERS: dict[str, tuple[str, Any]] = {
    "float16": ("<f2", None),
    "float32": ("<f4", None),
    "float64": ("<f8", None),
    "bfloat16": ("<u2", _widen_bf16),
    "float8_e4m3fn": ("u1", _fp8_reader("float8_e4m3fn", 4, 3, True)),
    "float8_e5m2": ("u1", _fp8_reader("float8_e5m2", 5, 2, False)),
}


def _read_safetensors_header(
    path: Path, offsets: dict[str, tuple[int, int]] | None = None
) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading tensor data (clear errors for bad files).

    Every entry is checked as the safetensors reader would (a known dtype string, a shape of
    non-negative integers, offsets that match the byte size and tile the data without gaps or
    overlaps), so a crafted header fails here, naming the tensor, before anything is allocated.
    ``offsets``, when given, receives each tensor's ``(begin, end)`` byte range in the file.
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
    infos = _check_entries(path, header, size - 8 - n, offsets)
    if offsets is not None:
        for name, (begin, end) in offsets.items():
            offsets[name] = (8 + n + begin, 8 + n + end)
    return infos


def _check_entries(
    path: Path, header: dict[str, Any], data_len: int, spans_out: dict[str, tuple[int, int]] | None = None
) -> dict[str, TensorInfo]:
    """Check every tensor entry of a parsed header against the ``data_len`` bytes that follow it:
    a dtype name, a valid shape, offsets that match the byte size and tile the data exactly."""
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
        if spans_out is not None:
            spans_out[name] = (begin, end)
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
        self._offsets: dict[str, tuple[int, int]] = {}
        self._infos = _read_safetensors_header(path, self._offsets)

    def numpy_readable(self, names: list[str]) -> bool:
        """Whether :meth:`read_numpy` can read every tensor of ``names`` (their dtypes)."""
        return all(self._infos[n].dtype in _NUMPY_READERS for n in names)

    def read_numpy(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        """Yield ``(name, numpy array)`` one tensor at a time, read from the file without torch.

        float16/32/64 keep their dtype; bfloat16 is widened to float32 exactly (its 16 bits are
        the high half of a float32) and the 8-bit floats through a 256-entry float32 table.
        """
        import numpy as np

        with open(self.path, "rb") as fh:
            for name in names:
                info = self._infos[name]
                begin, end = self._offsets[name]
                raw_dtype, convert = _NUMPY_READERS[info.dtype]
                buf = np.empty(info.numel, dtype=raw_dtype)
                try:
                    fh.seek(begin)
                    got = fh.readinto(memoryview(buf).cast("B"))
                except OSError as exc:
                    raise CheckpointError(f"{str(self.path)!r} could not be read: {_one_line(exc)}") from None
                if got != end - begin:
                    raise CheckpointError(
                        f"{str(self.path)!r} could not be read: tensor {_short(name)} is truncated "
                        f"({got} of {end - begin} bytes)"
                    )
                arr = convert(buf) if convert is not None else buf
                yield name, arr.reshape(info.shape)
                del arr, buf

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
