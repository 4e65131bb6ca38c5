"""Seeded mutation fuzzing of every reader of files a stranger could send (issue 10).

Each reader gets at least 2,000 mutated inputs per run, derived from small valid seed files in
``tests/fuzz_corpus/seeds`` by bit flips, byte inserts/deletes, truncation and JSON-aware edits of
headers (values replaced by ints, floats, ``Infinity``, huge or negative numbers, lists, null,
strings, deep nesting). Every input must either load or raise :class:`rmtprune.errors.RmtpruneError`;
anything else (another exception, more than ``CASE_SECONDS`` for one input, an allocation beyond
the address-space cap) fails with the reader, seed and case index, which reproduce it::

    python benchmarks/fuzz_readers.py --reader torch-zip --seed 0 --case 1234 -v

Crashers found are kept in ``tests/fuzz_corpus/crashers`` and must give a clean error forever.
The module doubles as the engine of ``benchmarks/fuzz_readers.py`` (it imports only public
``rmtprune`` API, so it also runs against older revisions).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import resource
import signal
import struct
import sys
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
SEEDS = CORPUS / "seeds"
CRASHERS = CORPUS / "crashers"

READERS = (
    "safetensors-header",
    "safetensors-body",
    "sharded-index",
    "torch-zip",
    "torch-legacy",
    "idx",
    "sparse-format",
    "manifest",
)
OUTCOMES = ("loaded", "clean error", "crash", "hang", "huge allocation")
CASES_PER_READER = 2000
CASE_SECONDS = 2.0  # one input may take at most this long
ALARM_SECONDS = 20  # a case still running after this is interrupted (a hang)
MEMORY_HEADROOM = 3 << 30  # address space allowed above the loop's start (catches huge allocations)

_ALLOC_WORDS = ("can't allocate memory", "Unable to allocate", "cannot allocate memory", "MemoryError")


# ----------------------------------------------------------------------------------- seed corpus


def _safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def write_corpus(root: Path = SEEDS) -> None:
    """(Re)generate the seed files deterministically (committed; run only to change the corpus)."""
    import gzip

    import numpy as np
    import torch

    from rmtprune.sparse_format import save_sparse

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {
        "fc1.weight": torch.randn(12, 8, generator=g),
        "fc1.bias": torch.randn(12, generator=g),
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "emb.weight": torch.randn(6, 5, generator=g).half(),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
        "mask": torch.ones(3, 3, dtype=torch.bool),
    }
    (root / "plain.safetensors").write_bytes(_safetensors_bytes(sd, {"format": "pt", "note": "seed"}))
    (root / "small.safetensors").write_bytes(_safetensors_bytes({"w": torch.randn(4, 3, generator=g)}))
    shards = root / "sharded"
    shards.mkdir(exist_ok=True)
    part1 = {k: sd[k] for k in ("fc1.weight", "fc1.bias")}
    part2 = {k: sd[k] for k in ("conv.weight", "emb.weight")}
    (shards / "model-00001-of-00002.safetensors").write_bytes(_safetensors_bytes(part1))
    (shards / "model-00002-of-00002.safetensors").write_bytes(_safetensors_bytes(part2))
    index = {
        "metadata": {"total_size": 1234},
        "weight_map": {
            **dict.fromkeys(part1, "model-00001-of-00002.safetensors"),
            **dict.fromkeys(part2, "model-00002-of-00002.safetensors"),
        },
    }
    (shards / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    torch.save({k: sd[k] for k in ("fc1.weight", "fc1.bias", "steps")}, root / "state.pt")
    torch.save(
        {"epoch": 3, "state_dict": {"fc.weight": torch.randn(5, 4, generator=g)}, "opt": {0: {"lr": 0.1}}},
        root / "wrapped.pt",
    )
    torch.save(
        {k: sd[k] for k in ("fc1.weight", "fc1.bias")},
        root / "legacy.pt",
        _use_new_zipfile_serialization=False,
    )
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(3, 5, 4)).astype(np.uint8)
    labels = np.array([1, 7, 3], dtype=np.uint8)
    for name, arr in (("images-idx3-ubyte.gz", images), ("labels-idx1-ubyte.gz", labels)):
        raw = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()
        (root / name).write_bytes(gzip.compress(raw, mtime=0))
    w = torch.randn(8, 10, generator=g)
    mask = torch.rand(8, 10, generator=g) < 0.4
    dense = {"a.weight": w, "a.bias": torch.randn(8, generator=g), "b.weight": w.T.contiguous()}
    save_sparse(root / "sparse-bitmask.safetensors", dense, {"a.weight": mask}, fmt="bitmask")
    save_sparse(root / "sparse-csr.safetensors", dense, {"a.weight": mask, "b.weight": mask.T}, fmt="csr")
    write_manifest_seeds(root)


#: The reference spec the manifest seeds record (a file may rebuild it without trust_factory).
_MANIFEST_SPEC = ("mlp:16,12", [1, 4, 4], 3)


def write_manifest_seeds(root: Path = SEEDS) -> None:
    """Model files written by ``rmtprune.save``: factored layers, and factored + sparse layers."""
    import torch

    import rmtprune
    from rmtprune.masks import set_mask

    build_model = _build_model()

    spec, shape, classes = _MANIFEST_SPEC
    fargs = {"input_shape": shape, "num_classes": classes}
    torch.manual_seed(0)
    net = build_model(spec, shape, classes)
    rmtprune.compress(net, rule="fixed", rank=3)
    rmtprune.save(net, root / "manifest.safetensors", factory=spec, factory_args=fargs)
    set_mask(net.head, torch.rand(net.head.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    rmtprune.save(net, root / "manifest-sparse.safetensors", factory=spec, factory_args=fargs)
    for p in root.glob("manifest*.json"):
        p.unlink()  # the sidecars: the manifest read is the one in the header


# ----------------------------------------------------------------------------------- mutations

_INTERESTING_INTS = (
    0,
    1,
    -1,
    2,
    7,
    8,
    255,
    256,
    2**15,
    2**16,
    2**31 - 1,
    2**31,
    2**32,
    2**53,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    -(2**63),
)
_RAW_VALUES = (
    "0",
    "-1",
    "1",
    "2",
    "1.5",
    "-0.0",
    "1e400",
    "-1e400",
    "1e-400",
    "Infinity",
    "-Infinity",
    "NaN",
    "null",
    "true",
    "false",
    '""',
    '"F32"',
    '"U8"',
    '"BOOL"',
    '"x"',
    '"' + "x" * 5000 + '"',
    "[]",
    "[0]",
    "[1, 2]",
    "[-1]",
    "[1e400]",
    "[Infinity]",
    "[null]",
    '["a"]',
    "[[[]]]",
    "{}",
    '{"a": 1}',
    "9" * 400,
    "18446744073709551616",
    "9223372036854775807",
    "4294967296",
    '"../x.safetensors"',
    '"/etc/passwd"',
    '"sub/model-00001-of-00002.safetensors"',
    '".."',
    '"."',
    '"\\u0000"',
)


def _deep(rng: random.Random) -> str:
    n = rng.choice((50, 200, 1000, 5000, 100000))
    return ("[" * n + "]" * n) if rng.random() < 0.5 else ('{"a":' * n + "1" + "}" * n)


def _replacement(rng: random.Random, old: Any) -> str:
    """Raw JSON text to put in place of ``old``."""
    r = rng.random()
    if r < 0.05:
        return _deep(rng)
    if r < 0.35 and isinstance(old, int) and not isinstance(old, bool):
        return str(
            rng.choice(
                (
                    old + 1,
                    old - 1,
                    old * 2,
                    -old,
                    old + rng.choice(_INTERESTING_INTS),
                    rng.choice(_INTERESTING_INTS),
                )
            )
        )
    if r < 0.5 and isinstance(old, list) and old:
        new = list(old)
        op = rng.randrange(4)
        if op == 0:
            new.pop(rng.randrange(len(new)))
        elif op == 1:
            new.insert(rng.randrange(len(new) + 1), rng.choice(new))
        elif op == 2:
            new.reverse()
        else:
            new[rng.randrange(len(new))] = rng.choice(_INTERESTING_INTS)
        return json.dumps(new)
    if r < 0.6 and isinstance(old, str):
        return json.dumps(rng.choice((old.lower(), old + "x", old[:-1], old * 3, "F" + old, "")))
    if r < 0.65:
        return str(rng.choice(_INTERESTING_INTS))
    return rng.choice(_RAW_VALUES)


def _paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


_MARK = "\x00FUZZ\x00"


def mutate_json(text: str, rng: random.Random) -> str:
    """One JSON-aware edit: a value replaced, a key dropped, renamed or duplicated, or a member added."""
    obj = json.loads(text)
    paths = list(_paths(obj))
    path = rng.choice(paths)
    op = rng.random()
    parent: Any = None
    node = obj
    for key in path:
        parent, node = node, node[key]
    marker = json.dumps(_MARK)
    if op < 0.1 and isinstance(node, dict):
        node[_MARK] = 0  # a new member (maybe a duplicate key: json text keeps the last one)
        raw = rng.choice(
            (json.dumps(rng.choice(list(node)) if len(node) > 1 else "k"), '"__metadata__"', '"x"')
        )
        return (
            json.dumps(obj).replace(marker, raw, 1).replace(f"{raw}: 0", f"{raw}: {_replacement(rng, 0)}", 1)
        )
    if op < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
        return json.dumps(obj)
    if op < 0.25 and isinstance(parent, dict):
        parent[path[-1] + rng.choice(("x", "/../x", "@values", "@bitmask", ""))] = parent.pop(path[-1])
        return json.dumps(obj)
    if not path:
        return _replacement(rng, obj)
    parent[path[-1]] = _MARK
    return json.dumps(obj).replace(marker, _replacement(rng, node), 1)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level edits: bit flips, interesting bytes or integers, inserts, deletes, cuts."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 4))):
        n = len(buf)
        op = rng.randrange(8)
        pos = rng.randrange(n) if n else 0
        if op == 0 and n:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[pos] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, ord("{"), ord("["), ord('"')))
        elif op == 2 and n >= 4:
            pos = rng.randrange(n - 3)
            width = rng.choice((4, 8)) if n - pos >= 8 else 4
            value = rng.choice(_INTERESTING_INTS) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, rng.choice(("little", "big")))
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 8, 64))))
        elif op == 4 and n:
            del buf[pos : pos + rng.choice((1, 2, 8, 64, 1024))]
        elif op == 5 and n:
            del buf[pos:]
        elif op == 6 and n:
            end = min(n, pos + rng.choice((4, 16, 256)))
            buf[pos:pos] = buf[pos:end]
        else:
            buf[pos:pos] = b"\xff" * rng.choice((1, 8))
    return bytes(buf)


def _split_safetensors(data: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].decode("utf-8"), data[8 + n :]


def _join_safetensors(header: str, body: bytes, rng: random.Random) -> bytes:
    raw = header.encode("utf-8")
    if rng.random() < 0.9:
        pad = (8 - len(raw) % 8) % 8 if rng.random() < 0.5 else 0
        raw += b" " * pad
        n = len(raw)
    else:
        n = len(raw) + rng.choice((-8, -1, 1, 8, len(body), 2**32, 2**63))
    return struct.pack("<Q", n % 2**64) + raw + body


# ----------------------------------------------------------------------------------- readers


@dataclass
class Case:
    """One mutated input: ``files`` (relative path -> bytes) and the path the reader opens."""

    files: dict[str, bytes]
    target: str
    note: str = ""


def _seed_bytes(name: str) -> bytes:
    return (SEEDS / name).read_bytes()


def _case_safetensors_header(rng: random.Random) -> Case:
    name = rng.choice(("plain.safetensors", "small.safetensors", "sparse-csr.safetensors"))
    header, body = _split_safetensors(_seed_bytes(name))
    for _ in range(rng.choice((1, 1, 2, 3))):
        with contextlib.suppress(json.JSONDecodeError, RecursionError):
            header = mutate_json(header, rng)
    return Case({"x.safetensors": _join_safetensors(header, body, rng)}, "x.safetensors", name)


def _case_safetensors_body(rng: random.Random) -> Case:
    name = rng.choice(("plain.safetensors", "small.safetensors"))
    data = _seed_bytes(name)
    if rng.random() < 0.5:  # anywhere (mostly the header and its length)
        data = mutate_bytes(data, rng)
    else:  # the tensor data only, keeping the header
        (n,) = struct.unpack("<Q", data[:8])
        data = data[: 8 + n] + mutate_bytes(data[8 + n :], rng)
    suffix = rng.choice((".safetensors",) * 4 + (".pt", ".bin"))
    return Case({"x" + suffix: data}, "x" + suffix, name)


def _case_index(rng: random.Random) -> Case:
    root = SEEDS / "sharded"
    files = {p.name: p.read_bytes() for p in root.iterdir()}
    index = "model.safetensors.index.json"
    text = files[index].decode()
    if rng.random() < 0.8:
        for _ in range(rng.choice((1, 1, 2))):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                text = mutate_json(text, rng)
        files[index] = text.encode("utf-8", "surrogatepass")
    else:
        files[index] = mutate_bytes(files[index], rng)
    if rng.random() < 0.1:  # a shard gone, or the index itself gone (the shards' names then count)
        files.pop(rng.choice(sorted(files)))
    target = index if rng.random() < 0.5 and index in files else "."
    return Case(files, target, "sharded")


def _rezip(data: bytes, member_edit: Callable[[str, bytes], bytes], rng: random.Random) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    names = zin.namelist()
    pick = rng.choice([n for n in names if n.endswith("data.pkl")] * 3 + names)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in zin.infolist():
            content = zin.read(info.filename)
            if info.filename == pick:
                content = member_edit(info.filename, content)
            z.writestr(info.filename, content)
    return out.getvalue()


def _case_torch(rng: random.Random) -> Case:
    name = rng.choice(("state.pt", "wrapped.pt"))
    data = _seed_bytes(name)
    # 40%: bytes anywhere; else one member edited in a consistent archive (CRCs do not stop it early)
    whole = rng.random() < 0.4
    data = mutate_bytes(data, rng) if whole else _rezip(data, lambda _n, b: mutate_bytes(b, rng), rng)
    suffix = rng.choice((".pt",) * 5 + (".safetensors", ".bin"))
    return Case({"x" + suffix: data}, "x" + suffix, name)


def _case_torch_legacy(rng: random.Random) -> Case:
    data = mutate_bytes(_seed_bytes("legacy.pt"), rng)
    return Case({"x.pt": data}, "x.pt", "legacy.pt")


def _case_idx(rng: random.Random) -> Case:
    import gzip

    name = rng.choice(("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"))
    data = _seed_bytes(name)
    r = rng.random()
    if r < 0.3:
        data = mutate_bytes(data, rng)
    else:
        raw = bytearray(gzip.decompress(data))
        if r < 0.7:  # the header: magic, dtype, ndim, dims
            ndim = raw[3]
            pos = rng.randrange(4 + 4 * ndim)
            if pos >= 4 and rng.random() < 0.7:
                pos = 4 + 4 * ((pos - 4) // 4)
                raw[pos : pos + 4] = (rng.choice(_INTERESTING_INTS) % 2**32).to_bytes(4, "big")
            else:
                raw[pos] = rng.choice((0, 1, 3, 8, 9, 0x0B, 0x0C, 0x0D, 0x0E, 0x42, 0xFF, raw[pos] ^ 1))
        else:
            raw = bytearray(mutate_bytes(bytes(raw), rng))
        data = gzip.compress(bytes(raw), mtime=0)
        if rng.random() < 0.1:
            data = mutate_bytes(data, rng)
    return Case({"x.gz": data}, "x.gz", name)


def _case_sparse(rng: random.Random) -> Case:
    name = rng.choice(("sparse-bitmask.safetensors", "sparse-csr.safetensors"))
    header, body = _split_safetensors(_seed_bytes(name))
    doc = json.loads(header)
    r = rng.random()
    if r < 0.75:  # the sparse manifest in the metadata
        meta = doc["__metadata__"]["rmtprune.sparse"]
        for _ in range(rng.choice((1, 1, 2))):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                meta = mutate_json(meta, rng)
        doc["__metadata__"]["rmtprune.sparse"] = meta
        header = json.dumps(doc)
    elif r < 0.9:  # the header (part shapes and names)
        with contextlib.suppress(json.JSONDecodeError, RecursionError):
            header = mutate_json(header, rng)
    else:  # the data (index values: CSR pointers, columns, bitmask bytes)
        body = mutate_bytes(body, rng)[: len(body)].ljust(len(body), b"\0")
    return Case({"x.safetensors": _join_safetensors(header, body, rng)}, "x.safetensors", name)


def _case_manifest(rng: random.Random) -> Case:
    name = rng.choice(("manifest.safetensors", "manifest-sparse.safetensors"))
    header, body = _split_safetensors(_seed_bytes(name))
    doc = json.loads(header)
    if rng.random() < 0.85:  # the rmtprune manifest in the metadata
        text = doc["__metadata__"]["rmtprune"]
        for _ in range(rng.choice((1, 1, 2, 3))):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                text = mutate_json(text, rng)
        doc["__metadata__"]["rmtprune"] = text
        header = json.dumps(doc)
    else:  # the tensors' entries, which the manifest's layers must agree with
        with contextlib.suppress(json.JSONDecodeError, RecursionError):
            header = mutate_json(header, rng)
    return Case({"x.safetensors": _join_safetensors(header, body, rng)}, "x.safetensors", name)


def _build_model() -> Callable[..., Any]:
    """``build_model`` of the rmtprune under test (``rmtprune.models`` before the ``zoo``, for the
    benchmark's ``--compare`` runs of older revisions)."""
    try:
        from rmtprune.zoo.models import build_model
    except ImportError:
        from rmtprune.models import build_model
    return build_model


def _load_manifest(path: Path) -> None:
    """``rmtprune.load`` from the file alone (the spec it records), then into a fresh model."""
    import rmtprune

    build_model = _build_model()
    rmtprune.load(path)
    spec, shape, classes = _MANIFEST_SPEC
    rmtprune.load(path, build_model(spec, tuple(shape), classes))


def _load_weights_file(path: Path) -> None:
    """List, iterate and analyse a weights file (through ``rmtprune.checkpoint`` before it was
    renamed, for the benchmark's ``--compare`` runs of older revisions)."""
    try:
        from rmtprune.weights_analysis import analyze_file
        from rmtprune.weights_file import iter_tensors, list_tensors
    except ImportError:
        from rmtprune.checkpoint import analyze_checkpoint as analyze_file
        from rmtprune.checkpoint import iter_tensors, list_tensors

    list_tensors(path)
    for _ in iter_tensors(path):
        pass
    analyze_file(path, progress=False)


def _load_idx(path: Path) -> None:
    try:
        from rmtprune.zoo.data import read_idx
    except ImportError:
        from rmtprune.data import read_idx

    read_idx(path)


def _load_sparse(path: Path) -> None:
    from rmtprune.sparse_format import load_sparse

    load_sparse(path)


@dataclass(frozen=True)
class Reader:
    name: str
    make: Callable[[random.Random], Case]
    load: Callable[[Path], None]


REGISTRY: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader("safetensors-header", _case_safetensors_header, _load_weights_file),
        Reader("safetensors-body", _case_safetensors_body, _load_weights_file),
        Reader("sharded-index", _case_index, _load_weights_file),
        Reader("torch-zip", _case_torch, _load_weights_file),
        Reader("torch-legacy", _case_torch_legacy, _load_weights_file),
        Reader("idx", _case_idx, _load_idx),
        Reader("sparse-format", _case_sparse, _load_sparse),
        Reader("manifest", _case_manifest, _load_manifest),
    )
}


# ----------------------------------------------------------------------------------- running


class CaseTimeout(KeyboardInterrupt):
    """Raised by the alarm in a case that runs too long (a KeyboardInterrupt, so no reader's
    ``except Exception`` swallows it)."""


@dataclass
class Result:
    """What one case did: ``outcome`` is one of :data:`OUTCOMES`."""

    reader: str
    seed: int
    index: int
    outcome: str
    seconds: float
    detail: str = ""


@dataclass
class Summary:
    reader: str
    counts: Counter = field(default_factory=Counter)
    failures: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    slowest: float = 0.0


def case_rng(seed: int, reader: str, index: int) -> random.Random:
    """The generator of one case: a case is reproduced from (seed, reader, index) alone."""
    return random.Random(f"{seed}:{reader}:{index}")


def _classify(exc: BaseException) -> tuple[str, str]:
    from rmtprune.errors import RmtpruneError

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or any(w in text for w in _ALLOC_WORDS):
        return "huge allocation", text[:300]
    if isinstance(exc, CaseTimeout):
        return "hang", text[:300]
    if isinstance(exc, RmtpruneError) and "\n" not in str(exc).strip():
        return "clean error", text[:300]
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-4:])
    return "crash", (text[:300] + "\n" + tb)[:2000]


def _write_case(case: Case, work: Path) -> Path:
    """Write a case's files into ``work`` (reused between cases: stale files removed, not the folder)."""
    work.mkdir(parents=True, exist_ok=True)
    for old in work.iterdir():
        if old.name not in case.files:
            old.unlink()
    for rel, data in case.files.items():
        (work / rel).write_bytes(data)
    return work / case.target


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout(f"case ran for more than {ALARM_SECONDS} s")


@contextlib.contextmanager
def bounded(headroom: int | None = MEMORY_HEADROOM) -> Iterator[None]:
    """Run the block with an address-space cap ``headroom`` bytes above the current size (Linux), so
    a huge allocation fails at once instead of swapping, and with SIGALRM ready for hangs."""
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    capped = False
    if headroom is not None and sys.platform.startswith("linux"):
        vm = _vm_size()
        if vm:
            soft = vm + headroom
            if old_limit[1] == resource.RLIM_INFINITY or soft < old_limit[1]:
                resource.setrlimit(resource.RLIMIT_AS, (soft, old_limit[1]))
                capped = True
    try:
        yield
    finally:
        signal.alarm(0)
        if capped:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.signal(signal.SIGALRM, old_handler)


def _vm_size() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(reader: str, seed: int, index: int, work: Path) -> Result:
    """Make and run case ``index`` of ``reader`` (inside :func:`bounded`)."""
    import warnings

    spec = REGISTRY[reader]
    case = spec.make(case_rng(seed, reader, index))
    path = _write_case(case, work)
    t0 = time.perf_counter()
    outcome, detail = "loaded", ""
    signal.alarm(ALARM_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.load(path)
    except BaseException as exc:  # noqa: BLE001 - classifying every failure is the point
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, CaseTimeout):
            raise
        outcome, detail = _classify(exc)
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - t0
    if outcome in ("loaded", "clean error") and seconds > CASE_SECONDS:
        outcome, detail = "hang", f"took {seconds:.1f} s (bound {CASE_SECONDS} s)"
    return Result(reader, seed, index, outcome, seconds, detail)


def warm_up() -> None:
    """Load each seed once, so imports and first-call costs do not count against a case's time."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("plain.safetensors", "state.pt"):
            _load_weights_file(SEEDS / name)
        _load_weights_file(SEEDS / "sharded")
        _load_idx(SEEDS / "images-idx3-ubyte.gz")
        _load_sparse(SEEDS / "sparse-csr.safetensors")


def fuzz(
    reader: str, n: int, seed: int, work: Path, start: int = 0, record: list[str] | None = None
) -> Summary:
    """Run cases ``start .. start + n - 1`` of ``reader``; count outcomes, keep the failures.

    ``record`` (a list) receives one letter per case: Loaded, clean Error, Crash, Hang, Allocation.
    """
    warm_up()
    summary = Summary(reader)
    t0 = time.perf_counter()
    with bounded():
        for index in range(start, start + n):
            res = run_case(reader, seed, index, work)
            summary.counts[res.outcome] += 1
            if record is not None:
                record.append(
                    {"clean error": "E", "huge allocation": "A"}.get(res.outcome, res.outcome[0].upper())
                )
            summary.slowest = max(summary.slowest, res.seconds)
            if res.outcome not in ("loaded", "clean error"):
                summary.failures.append(res)
    summary.seconds = time.perf_counter() - t0
    return summary


def describe(res: Result) -> str:
    """How to reproduce a failing case, and what it did."""
    return (
        f"{res.reader} seed={res.seed} case={res.index}: {res.outcome} ({res.seconds:.2f} s)\n"
        f"  reproduce: python benchmarks/fuzz_readers.py --reader {res.reader} --seed {res.seed} "
        f"--case {res.index} -v\n  {res.detail}"
    )


# ----------------------------------------------------------------------------------- tests

try:  # the engine above is also imported by the benchmark, where pytest may be absent
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    FUZZ_SEED = int(__import__("os").environ.get("RMTPRUNE_FUZZ_SEED", "0"))

    @pytest.mark.parametrize("reader", READERS)
    def test_fuzz_reader(reader: str, tmp_path: Path) -> None:
        """>= 2,000 mutated inputs: each loads or raises RmtpruneError, quickly and in bounded memory."""
        summary = fuzz(reader, CASES_PER_READER, FUZZ_SEED, tmp_path / "case")
        assert sum(summary.counts.values()) >= 2000
        assert not summary.failures, "\n".join(describe(r) for r in summary.failures[:5])
        # the mutations must reach the readers' checks, not only their first byte
        assert summary.counts["clean error"] >= 200, summary.counts

    def test_seeds_load(tmp_path: Path) -> None:
        """The unmutated seeds load (a fuzz run that only ever errors would test nothing)."""
        for name in ("plain.safetensors", "small.safetensors", "state.pt", "wrapped.pt", "legacy.pt"):
            _load_weights_file(SEEDS / name)
        _load_weights_file(SEEDS / "sharded")
        _load_weights_file(SEEDS / "sharded" / "model.safetensors.index.json")
        _load_idx(SEEDS / "images-idx3-ubyte.gz")
        _load_sparse(SEEDS / "sparse-csr.safetensors")
        _load_sparse(SEEDS / "sparse-bitmask.safetensors")
        _load_manifest(SEEDS / "manifest.safetensors")
        _load_manifest(SEEDS / "manifest-sparse.safetensors")

    def _crashers() -> list[Path]:
        return sorted(p for p in CRASHERS.rglob("*") if p.is_file() and p.name != "README.md")

    @pytest.mark.parametrize("path", _crashers(), ids=lambda p: str(p.relative_to(CRASHERS)))
    def test_crasher_gives_a_clean_error(path: Path) -> None:
        """Every input that once crashed a reader now raises a one-line RmtpruneError."""
        from rmtprune.errors import RmtpruneError

        kind = path.relative_to(CRASHERS).parts[0]
        load = {"idx": _load_idx, "sparse": _load_sparse, "manifest": _load_manifest}.get(
            kind, _load_weights_file
        )
        target = path.parent if kind == "dirs" else path
        with pytest.raises(RmtpruneError) as info, bounded():
            load(target)
        assert "\n" not in str(info.value)

    def test_mutations_are_reproducible() -> None:
        for reader in READERS:
            a = REGISTRY[reader].make(case_rng(3, reader, 17))
            b = REGISTRY[reader].make(case_rng(3, reader, 17))
            assert a == b

    def test_engine_detects_crash_and_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The harness itself: a reader that raises TypeError is a crash, one that allocates 1 PB a huge
        allocation (under the address-space cap), one that sleeps past the bound a hang."""
        import numpy as np

        def boom(path: Path) -> None:
            raise TypeError("not ours")

        def greedy(path: Path) -> None:
            np.ones(2**47, dtype=np.uint8)

        def slow(path: Path) -> None:
            time.sleep(0.2)

        for load, want in ((boom, "crash"), (greedy, "huge allocation"), (slow, "hang")):
            monkeypatch.setitem(REGISTRY, "idx", Reader("idx", _case_idx, load))
            monkeypatch.setattr(sys.modules[__name__], "CASE_SECONDS", 0.1)
            with bounded():
                assert run_case("idx", 0, 0, tmp_path / "w").outcome == want
