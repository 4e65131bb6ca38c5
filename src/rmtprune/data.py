"""Datasets for the experiments: MNIST and Fashion-MNIST from the original IDX files, and digits.

MNIST and Fashion-MNIST are read from the original ``*-ubyte.gz`` files, looked up in order in
``data_dir`` (the CLI's ``--data-dir``), the ``RMTPRUNE_DATA`` environment variable and the user
cache directory; if they are missing they are downloaded from the canonical mirrors, checked
against sha256 sums and written atomically. scikit-learn's bundled ``digits`` (8x8) needs no
files at all. A split is decoded once into a normalised float32 tensor and kept in memory, and
:class:`FastLoader` iterates over it by indexing with a permutation: no ``DataLoader``, no
per-sample Python, so an epoch of an MLP is not data-bound.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import importlib.util
import math
import os
import random
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_path
from .errors import RmtpruneError

__all__ = [
    "DATASETS",
    "SHAPES",
    "Dataset",
    "FastLoader",
    "batches",
    "cache_dir",
    "clear_cache",
    "dataset_shape",
    "download_dataset",
    "find_data_dir",
    "load_dataset",
    "read_idx",
    "seed_everything",
    "DATA_ENV",
    "MIRRORS_ENV",
    "CACHE_ENV",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")

#: ``(input_shape, num_classes)`` of every dataset, known without reading its files.
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
}

#: Environment variable naming a directory that holds ``mnist/`` and ``fashion-mnist/``.
DATA_ENV = "RMTPRUNE_DATA"
#: Environment variable overriding the download mirrors: comma-separated base URLs; ``{name}``
#: in a URL is replaced by the dataset name (e.g. ``http://127.0.0.1:8000/{name}/``).
MIRRORS_ENV = "RMTPRUNE_MIRRORS"
#: Environment variable overriding the user cache directory (default ``$XDG_CACHE_HOME/rmtprune``
#: or ``~/.cache/rmtprune``).
CACHE_ENV = "RMTPRUNE_CACHE"

_ALIASES = {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
_SPLITS = ("train", "test")

# The four IDX files of each split: (images, labels).
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_ALL_FILES = (*_FILES["train"], *_FILES["test"])

#: sha256 of the original files (identical to ../shared/data/SHA256SUMS; MD5s match torchvision's).
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    },
}

#: Byte size of each original file: a download is cut off (and refused) as soon as it runs past it.
SIZES: dict[str, dict[str, int]] = {
    "mnist": {
        "t10k-images-idx3-ubyte.gz": 1648877,
        "t10k-labels-idx1-ubyte.gz": 4542,
        "train-images-idx3-ubyte.gz": 9912422,
        "train-labels-idx1-ubyte.gz": 28881,
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte.gz": 4422102,
        "t10k-labels-idx1-ubyte.gz": 5148,
        "train-images-idx3-ubyte.gz": 26421880,
        "train-labels-idx1-ubyte.gz": 29515,
    },
}

#: Canonical mirrors, tried in order.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

#: Fixed normalisation constants (mean, std) of pixels scaled to [0, 1]: the usual train-set
#: values for MNIST and Fashion-MNIST; digits (pixel / 16) over all 1797 images.
NORMALIZATION: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
    "digits": (0.3053, 0.3760),
}

#: Seed and test fraction of the fixed, stratified digits split (per class, a seeded permutation;
#: the last ``round(0.2 * n_class)`` images of each class go to the test split).
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2

_CHUNK = 1 << 16
_GATHER_BYTES = 16 << 20  # FastLoader gathers this much at a time
_MEMORY: dict[tuple[str, str, str], Dataset] = {}


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, decoded and normalised, held as tensors.

    ``x`` is float32 ``N x C x H x W`` (pixels scaled to [0, 1], then standardised with the fixed
    constants in :data:`NORMALIZATION`); ``y`` is int64 ``N``. The tensors may be shared with the
    in-memory cache: do not modify them in place.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_features(self) -> int:
        """Values per sample (``C * H * W``), the input width of an MLP."""
        c, h, w = self.input_shape
        return c * h * w

    def subset(self, index: int | Sequence[int] | torch.Tensor | slice) -> Dataset:
        """A new dataset with the samples at ``index`` (an int ``n`` means the first ``n``)."""
        if isinstance(index, bool) or not isinstance(index, (int, slice, Sequence, torch.Tensor)):
            raise TypeError(f"index must be an int, slice, sequence or tensor, got {type(index).__name__}")
        if isinstance(index, int):
            if not 0 <= index <= len(self):
                raise ValueError(f"n={index} must be in [0, {len(self)}] for dataset {self.name!r}")
            index = slice(0, index)
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return Dataset(
            self.name, self.split, self.x[index], self.y[index], self.num_classes, self.input_shape
        )

    def to(self, device: str | torch.device) -> Dataset:
        """The same dataset with its tensors on ``device`` (moved once, not per batch)."""
        return Dataset(
            self.name, self.split, self.x.to(device), self.y.to(device), self.num_classes, self.input_shape
        )


# ----------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int) -> torch.Generator:
    """Seed ``random``, ``numpy`` and ``torch``; return a fresh ``torch.Generator`` seeded with ``seed``.

    The returned generator is the one to hand to :class:`FastLoader` for a reproducible order.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------- names and paths


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key.replace("-", ""), key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return key


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(_SPLITS)}")
    return split


def cache_dir() -> Path:
    """The user cache directory of rmtprune (``$RMTPRUNE_CACHE``, else ``$XDG_CACHE_HOME/rmtprune``,
    else ``~/.cache/rmtprune``; ``%LOCALAPPDATA%\\rmtprune`` on Windows). Not created here."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "rmtprune"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "rmtprune"
    return Path.home() / ".cache" / "rmtprune"


def _search_roots(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, bool]]:
    """Directories searched, in order, each with whether it was given explicitly: ``data_dir``,
    ``$RMTPRUNE_DATA``, ``<cache>/data``."""
    roots: list[tuple[Path, bool]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), True))
    env = os.environ.get(DATA_ENV)
    if env:
        roots.append((Path(env).expanduser(), True))
    roots.append((cache_dir() / "data", False))
    return roots


def _candidates(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Candidate folders for ``name``: ``<root>/<name>`` and, for explicit roots, ``<root>`` itself."""
    out: list[Path] = []
    for root, explicit in _search_roots(data_dir):
        for cand in (root / name, root) if explicit else (root / name,):
            if cand not in out:
                out.append(cand)
    return out


def _missing_message(name: str, data_dir: str | os.PathLike[str] | None, extra: str = "") -> str:
    searched = ", ".join(str(p) for p in _candidates(name, data_dir))
    dest = _download_dest(name, data_dir)
    msg = (
        f"{name} files not found (searched: {searched}). Put the four files {', '.join(_ALL_FILES)} "
        f"in {dest} (or in <dir>/{name}/ and pass --data-dir <dir> or set {DATA_ENV}=<dir>)"
    )
    return msg + (f"; {extra}" if extra else "")


def find_data_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding all four IDX files of ``name``, searched in lookup order.

    Order: ``data_dir/<name>``, ``data_dir``, ``$RMTPRUNE_DATA/<name>``, ``$RMTPRUNE_DATA``,
    ``<cache>/data/<name>``. Raises :class:`RmtpruneError` listing the searched paths if none has
    them, and ``ValueError`` for ``digits`` (it needs no files).
    """
    key = _canonical(name)
    if key not in SHA256:
        raise ValueError(f"dataset {key!r} is bundled with scikit-learn and has no data directory")
    for cand in _candidates(key, data_dir):
        if all((cand / f).is_file() for f in _ALL_FILES):
            return cand
    raise RmtpruneError(_missing_message(key, data_dir))


def _download_dest(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """Where a download goes: ``<first search root>/<name>``."""
    return _search_roots(data_dir)[0][0] / name


# ----------------------------------------------------------------------------- download


def _mirrors(name: str, mirrors: Sequence[str] | str | None) -> list[str]:
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV)
        mirrors = env if env else MIRRORS[name]
    if isinstance(mirrors, str):
        mirrors = [m for m in (s.strip() for s in mirrors.split(",")) if m]
    out = []
    for m in mirrors:
        if not isinstance(m, str):
            raise TypeError(f"mirror must be a URL string, got {type(m).__name__}")
        m = m.replace("{name}", name)
        out.append(m if m.endswith("/") else m + "/")
    if not out:
        raise ValueError(f"no download mirrors given for {name!r}")
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, target: Path, expected: str, timeout: float, size: int) -> None:
    """Download ``url`` to ``target`` atomically, checking length and sha256; raise on any problem.

    At most ``size + 1`` bytes are read: a server that announces or sends more than the known size
    of the file is cut off with an error instead of filling the disk.
    """
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http/https mirrors only)
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > size:
            raise RmtpruneError(f"the server announces {total} bytes, more than the expected {size}")
        h = hashlib.sha256()
        got = 0
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            bar = None
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total, unit="B", unit_scale=True, desc=target.name, leave=False, file=sys.stderr
                )
            try:
                while True:
                    chunk = resp.read(min(_CHUNK, size + 1 - got))
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise RmtpruneError(f"the server sends more than the expected {size} bytes")
                    fh.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and got != total:
                raise RmtpruneError(f"truncated download: got {got} of {total} bytes")
            digest = h.hexdigest()
            if digest != expected:
                raise RmtpruneError(f"sha256 mismatch: expected {expected}, got {digest} ({got} bytes)")
            fh.flush()
            os.fsync(fh.fileno())


def _make_dir(dest: Path, created: list[Path]) -> None:
    """Create ``dest`` and its missing parents, recording (outermost first) the ones made here."""
    if dest.is_dir():
        return
    missing = []
    p = dest
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        created.extend(d for d in reversed(missing) if d.is_dir())  # parents made before the failure
        raise RmtpruneError(f"cannot create data directory {str(dest)!r}: {exc.strerror or exc}") from exc
    created.extend(reversed(missing))


def _undo(created: list[Path], landed: list[Path]) -> None:
    """After a failed download: remove the files this call wrote into directories it created, then
    those directories if empty. Nothing that existed before the call is touched."""
    made = set(created)
    for f in landed:
        if f.parent in made:
            with contextlib.suppress(OSError):
                f.unlink()
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: never a tree someone else wrote into meanwhile


def download_dataset(
    name: str,
    dest: str | os.PathLike[str],
    mirrors: Sequence[str] | str | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download the four IDX files of ``name`` into ``dest`` (created), verifying each sha256.

    Each file is tried on each mirror in turn (``mirrors``, else ``$RMTPRUNE_MIRRORS``, else
    :data:`MIRRORS`); it is written to a temporary file and renamed only when its length and sha256
    match, so a bad download never lands, and reading stops at the known size (:data:`SIZES`).
    Files already present with the right sha256 are kept. When the download fails, the directories
    this call created (and the files it put in them) are removed again; nothing else is touched.
    Raises :class:`RmtpruneError` naming every mirror's failure and where to put the files by hand.
    """
    key = _canonical(name)
    if key not in SHA256:
        raise ValueError(f"dataset {key!r} is bundled with scikit-learn and is never downloaded")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    urls = _mirrors(key, mirrors)
    dest = Path(dest).expanduser()
    created: list[Path] = []
    landed: list[Path] = []
    try:
        for fname in _ALL_FILES:
            target = dest / fname
            expected = SHA256[key][fname]
            if target.is_file() and sha256_file(target) == expected:
                continue
            _make_dir(dest, created)
            errors = []
            for base in urls:
                url = base + fname
                try:
                    _fetch(url, target, expected, timeout, SIZES[key][fname])
                    landed.append(target)
                    break
                except (
                    urllib.error.URLError,
                    http.client.HTTPException,
                    OSError,
                    ValueError,
                    RmtpruneError,
                ) as exc:
                    reason = getattr(exc, "reason", None) or exc
                    errors.append(f"{url}: {reason}")
            else:
                raise RmtpruneError(
                    f"could not download {key} file {fname} from any mirror ({'; '.join(errors)}). "
                    f"Offline? Put the four files {', '.join(_ALL_FILES)} in {dest} "
                    f"(or in <dir>/{key}/ and pass --data-dir <dir> or set {DATA_ENV}=<dir>)"
                )
    except BaseException:
        _undo(created, landed)
        raise
    return dest


# ----------------------------------------------------------------------------- IDX decoding

_MAX_DEFLATE_RATIO = 1032  # the most a deflate stream can expand (258-byte matches at 2 bits)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one (gzipped) IDX file into a numpy array, validating magic, dims and length.

    Raises :class:`RmtpruneError` naming the file if it is not gzip, is truncated, has a wrong
    magic number or a payload whose length does not match its header. The declared size is
    checked against what a gzip file of this length can hold before anything is allocated, and
    the payload is read in chunks, so a crafted header or a gzip bomb cannot exhaust memory.
    """
    path = Path(path)
    try:
        compressed = path.stat().st_size
        with gzip.open(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                rest = fh.read(256)  # the empty file and the 3-byte one still get "magic" as the culprit
                raw = head + rest
                raise RmtpruneError(
                    f"IDX file {str(path)!r} has a wrong magic number {raw[:4].hex() or '(empty)'}"
                )
            ndim = head[3]
            header = 4 + 4 * ndim
            dim_bytes = fh.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise RmtpruneError(
                    f"IDX file {str(path)!r} is truncated: header needs {header} bytes, "
                    f"has {4 + len(dim_bytes)}"
                )
            dims = tuple(int(d) for d in np.frombuffer(dim_bytes, dtype=">u4"))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            payload = math.prod(dims) * dtype.itemsize
            # deflate expands at most ~1032:1, so a larger declared payload cannot be in this file
            if payload > _MAX_DEFLATE_RATIO * compressed:
                raise RmtpruneError(
                    f"IDX file {str(path)!r} declares dims {_dims(dims)} ({payload} bytes), more than a "
                    f"{compressed}-byte gzip file can hold; the header is corrupt"
                )
            chunks = []
            got = 0
            while got <= payload:
                chunk = fh.read(min(_CHUNK * 16, payload + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            exact = True
            if got > payload:  # how much more, for the message (up to 1 MiB counted)
                extra = len(fh.read(1 << 20))
                got += extra
                exact = extra < 1 << 20
    except FileNotFoundError:
        raise RmtpruneError(f"IDX file {str(path)!r} does not exist") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise RmtpruneError(
            f"IDX file {str(path)!r} is not a valid gzip file (truncated or corrupt: {exc})"
        ) from exc
    if got != payload:
        more = "" if exact else "+"
        raise RmtpruneError(
            f"IDX file {str(path)!r} has {header + got}{more} bytes but its header "
            f"(dims {_dims(dims)}) implies {header + payload}"
        )
    raw = b"".join(chunks)
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _dims(dims: tuple[int, ...]) -> str:
    """Dims for a message (at most 8 shown)."""
    return str(dims) if len(dims) <= 8 else f"({', '.join(map(str, dims[:8]))}, ... {len(dims)} dims)"


def _decode_split(name: str, folder: Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (folder / f for f in _FILES[split])
    if verify:
        for f in (images_file, labels_file):
            digest = sha256_file(f)
            if digest != SHA256[name][f.name]:
                other = [k for k, sums in SHA256.items() if k != name and digest in sums.values()]
                if other:
                    raise RmtpruneError(
                        f"{str(f)!r} is the {other[0]} file, not {name}: keep each dataset in its own "
                        f"folder (<dir>/{name}/ and <dir>/{other[0]}/)"
                    )
                raise RmtpruneError(
                    f"sha256 mismatch for {str(f)!r}: expected {SHA256[name][f.name]}, got {digest}; "
                    "the file is corrupt or not the original: delete it (it will be downloaded again) "
                    "or replace it with the original"
                )
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise RmtpruneError(
            f"IDX file {str(images_file)!r} holds {images.dtype} {images.shape}, expected uint8 N x H x W"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise RmtpruneError(
            f"IDX file {str(labels_file)!r} holds {labels.dtype} {labels.shape}, expected uint8 N"
        )
    if images.shape[0] != labels.shape[0]:
        raise RmtpruneError(
            f"{images.shape[0]} images in {str(images_file)!r} but "
            f"{labels.shape[0]} labels in {str(labels_file)!r}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise RmtpruneError(f"IDX file {str(labels_file)!r} has label {int(labels.max())} outside [0, 9]")
    return images, labels


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797 x 8 x 8 float64 in 0..16, 1797 int labels).

    The CSV shipped inside scikit-learn is read directly: importing ``sklearn.datasets`` costs
    seconds (it pulls in scipy), reading the file 50 ms. ``load_digits`` is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    raw, labels = _digits_arrays()
    images = raw.astype(np.float32) / 16.0  # 0..16 -> [0, 1]
    rng = np.random.RandomState(DIGITS_SEED)  # legacy generator: its stream never changes
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(DIGITS_TEST_FRACTION * idx.size))
        train_idx.append(idx[: idx.size - n_test])
        test_idx.append(idx[idx.size - n_test :])
    sel = np.sort(np.concatenate(train_idx if split == "train" else test_idx))
    return images[sel], labels[sel]


def _normalise(name: str, images: np.ndarray) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    x = torch.from_numpy(images.astype(np.float32))  # a writable copy (the IDX buffer is read-only)
    if images.dtype == np.uint8:
        x.mul_(1.0 / 255.0)
    x.sub_(mean).div_(std)
    return x.unsqueeze(1)  # N x 1 x H x W


def dataset_shape(name: str) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` of ``name`` without loading it (to build a model for it)."""
    return SHAPES[_canonical(name)]


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Load one split of ``name`` (one of :data:`DATASETS`) as a normalised :class:`Dataset`.

    MNIST-style files are found with :func:`find_data_dir`; if missing and ``download`` is true
    they are downloaded (:func:`download_dataset`) into the first search root. A split is decoded
    once and kept in memory, so a second call is instant. ``digits`` is a fixed stratified 80/20
    split (seed :data:`DIGITS_SEED`) of scikit-learn's bundled 8x8 digits.
    """
    key = _canonical(name)
    _check_split(split)
    if key == "digits":
        cache_key = (key, split, "")
        if cache_key not in _MEMORY:
            images, labels = _digits_split(split)
            x = _normalise(key, images)
            _MEMORY[cache_key] = Dataset(key, split, x, torch.from_numpy(labels), 10, (1, 8, 8))
        return _MEMORY[cache_key]
    try:
        folder = find_data_dir(key, data_dir)
    except RmtpruneError:
        if not download:
            raise RmtpruneError(_missing_message(key, data_dir, "downloading is off")) from None
        dest = _download_dest(key, data_dir)
        try:
            folder = download_dataset(key, dest)
        except RmtpruneError as exc:
            searched = ", ".join(str(p) for p in _candidates(key, data_dir))
            raise RmtpruneError(f"{key} files not found locally (searched: {searched}); {exc}") from None
    cache_key = (key, split, str(folder.resolve()))
    if cache_key not in _MEMORY:
        images, labels = _decode_split(key, folder, split)
        x = _normalise(key, images)
        y = torch.from_numpy(labels.astype(np.int64))
        _MEMORY[cache_key] = Dataset(key, split, x, y, 10, (1, int(images.shape[1]), int(images.shape[2])))
    return _MEMORY[cache_key]


def clear_cache() -> None:
    """Forget every decoded split held in memory."""
    _MEMORY.clear()


# ----------------------------------------------------------------------------- iteration


class FastLoader:
    """Mini-batches ``(x, y)`` of a :class:`Dataset` by indexing its tensors with a permutation.

    No worker processes and no per-sample Python: one ``randperm`` per epoch and one gather per
    batch. The order is a function of ``generator``'s state only (a ``torch.Generator``; the
    global one if None), so two loaders with equally seeded generators yield the same batches.
    ``device`` moves the whole dataset there once.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be an rmtprune.data.Dataset, got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.dataset = dataset if device is None else dataset.to(device)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.generator = generator
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.dataset.x, self.dataset.y
        n = len(self.dataset)
        bs = self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        if not self.shuffle:
            for start in range(0, stop, bs):
                yield x[start : start + bs], y[start : start + bs]
            return
        perm = torch.randperm(n, generator=self.generator)[:stop]
        if perm.device != x.device:
            perm = perm.to(x.device)
        # Gather whole chunks of batches (about _GATHER_BYTES each), then yield views: one
        # parallel gather per chunk instead of per batch. On a busy machine, per-batch gathers
        # with 2 threads were 20x slower than this (thread hand-offs), and memory stays bounded.
        row_bytes = max(1, x[:1].numel() * x.element_size())
        chunk = bs * max(1, _GATHER_BYTES // (bs * row_bytes))
        for c0 in range(0, stop, chunk):
            idx = perm[c0 : c0 + chunk]
            xc, yc = x.index_select(0, idx), y.index_select(0, idx)
            for start in range(0, idx.shape[0], bs):
                yield xc[start : start + bs], yc[start : start + bs]


def batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> FastLoader:
    """A :class:`FastLoader` over ``dataset`` (same arguments); re-iterable, with ``len``."""
    return FastLoader(dataset, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
