"""Read other people's weight files lazily, one tensor at a time.

Formats: a ``.safetensors`` file; a directory of safetensors shards (Hugging Face layout, with or
without ``*.safetensors.index.json``); a PyTorch state dict saved with ``torch.save``
(``.pt``/``.pth``/``.bin``), loaded with ``weights_only=True`` (no code execution) and memory-mapped
when the file is a zip archive. Only one tensor is materialised at a time, so the peak memory of
:func:`rmtprune.analyze_file` is set by the largest tensor, not by the model.

This module picks the reader (:mod:`rmtprune._safetensors_reader`, :mod:`rmtprune._torch_reader`)
and combines shards; :mod:`rmtprune.weights_analysis` analyses what it reads. (rmtprune's own
model files are :mod:`rmtprune.io`; "checkpoint" means a training checkpoint,
:mod:`rmtprune.training`.) Bad input raises :class:`~rmtprune.errors.CheckpointError` with a
one-line message naming the file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ._safetensors_reader import _SafetensorsFile
from ._tensor_source import _MAX_HEADER, TensorInfo, _natural_key, _one_line, _short, _Source
from ._torch_reader import _LEGACY_TORCH_MAGIC, _TORCH_SUFFIXES, _ZIP_MAGIC, _TorchFile
from .errors import CheckpointError

__all__ = ["TensorInfo", "list_tensors", "iter_tensors"]


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

    def _by_shard(self, names: list[str]) -> dict[str, list[str]]:
        # Group by shard (one open per shard), keep the requested order within each shard.
        order: dict[str, list[str]] = {}
        for name in names:
            order.setdefault(self.weight_map[name], []).append(name)
        return {key: order[key] for key in sorted(order, key=_natural_key)}

    def read(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        for key, group in self._by_shard(names).items():
            yield from self.shards[key].read(group)

    def numpy_readable(self, names: list[str]) -> bool:
        """Whether every shard holding one of ``names`` reads them as numpy arrays (safetensors)."""
        return all(
            hasattr(self.shards[key], "read_numpy") and self.shards[key].numpy_readable(group)  # type: ignore[attr-defined]
            for key, group in self._by_shard(names).items()
        )

    def read_numpy(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        for key, group in self._by_shard(names).items():
            yield from self.shards[key].read_numpy(group)  # type: ignore[attr-defined]


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


def numpy_readable(src: _Source, names: list[str]) -> bool:
    """Whether ``src`` can read the tensors ``names`` as numpy arrays, without torch (safetensors
    files and shards of the float dtypes numpy can widen: float16/32/64, bfloat16, float8)."""
    check = getattr(src, "numpy_readable", None)
    return check is not None and bool(check(names))


def _iter_source(
    src: _Source, path: Any, names: Iterable[str] | None, *, as_numpy: bool = False
) -> Iterator[tuple[str, Any]]:
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
    if as_numpy:
        yield from src.read_numpy(wanted)  # type: ignore[attr-defined]
    else:
        yield from src.read(wanted)
