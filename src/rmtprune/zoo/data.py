"""Datasets for the experiments: MNIST and Fashion-MNIST from the original IDX files, and digits.

MNIST and Fashion-MNIST are read from the original ``*-ubyte.gz`` files, looked up in order in
``data_dir`` (the CLI's ``--data-dir``), the ``RMTPRUNE_DATA`` environment variable and the user
cache directory (:mod:`.files`); if they are missing they are downloaded from the canonical mirrors,
checked against sha256 sums and written atomically (:mod:`.download`). scikit-learn's bundled
``digits`` (8x8) needs no files, only the ``[zoo]`` extra. A split is decoded once (:mod:`.idx`)
into a normalised float32 tensor and kept in memory, and :class:`FastLoader` iterates over it by
indexing with a permutation: no ``DataLoader``, no per-sample Python, so an epoch of an MLP is not
data-bound.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._validate import check_int
from ..errors import RmtpruneError
from .download import download_dataset
from .files import (
    _ALL_FILES,  # noqa: F401 (read as rmtprune.data._ALL_FILES by old code)
    CACHE_ENV,
    DATA_ENV,
    DATASETS,
    MIRRORS,
    MIRRORS_ENV,
    SHA256,
    SHAPES,
    SIZES,
    _candidates,
    _canonical,
    _check_split,
    _download_dest,
    _missing_message,
    cache_dir,
    find_data_dir,
    sha256_file,
)
from .idx import _decode_split, read_idx

__all__ = [
    "DATASETS",
    "SHAPES",
    "VAL_SEED",
    "VAL_SIZE",
    "Dataset",
    "FastLoader",
    "ShardedLoader",
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
    "MIRRORS",
    "SHA256",
    "SIZES",
    "sha256_file",
]

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

#: Images of each training split held out as the fixed validation split (``split="val"``): 5,000 of
#: MNIST's and Fashion-MNIST's 60,000 (so ``train`` has 55,000), 144 (10%) of digits' 1,438.
#: Every choice made by accuracy (a budget, a learning rate, a rule) is made on it, never on test.
VAL_SIZE: dict[str, int] = {"mnist": 5000, "fashion-mnist": 5000, "digits": 144}
#: Seed of the validation split: ``numpy.random.RandomState(VAL_SEED).permutation(n)`` of the training
#: file's ``n`` images; its first ``val_size`` indices (sorted) are ``val``, the rest (sorted) ``train``.
#: The legacy generator's stream never changes, so the split is the same on every machine and release.
VAL_SEED = 0

_GATHER_BYTES = 16 << 20  # FastLoader gathers this much at a time
_MEMORY: dict[tuple[str, str, str, int], Dataset] = {}
#: The decoded training file (uint8 images, labels) of each dataset and folder: ``train`` and
#: ``val`` are carved from it, so the file is verified and decoded once for both.
_TRAIN_FILE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


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


#: The one-line error when the digits dataset is asked for without scikit-learn installed.
_NO_SKLEARN = (
    "the digits dataset needs scikit-learn, which is not installed: pip install 'rmtprune[zoo]' "
    "(or use mnist / fashion-mnist, which need no extra)"
)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797 x 8 x 8 float64 in 0..16, 1797 int labels).

    The CSV shipped inside scikit-learn is read directly: importing ``sklearn.datasets`` costs
    seconds (it pulls in scipy), reading the file 50 ms. ``load_digits`` is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise RmtpruneError(_NO_SKLEARN)
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


def _val_size(key: str, val_size: int | None) -> int:
    if val_size is None:
        return VAL_SIZE[key]
    return check_int("val_size", val_size, 0)


def _carve(
    images: np.ndarray, labels: np.ndarray, split: str, n_val: int, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """The ``train`` or ``val`` part of a training file (see :data:`VAL_SEED`)."""
    n = labels.shape[0]
    if split == "val" and n_val == 0:
        raise ValueError(f"split='val' with val_size=0: no validation split of {key} was asked for")
    if n_val >= n:
        raise ValueError(f"val_size={n_val} must be smaller than the {n} training images of {key}")
    perm = np.random.RandomState(VAL_SEED).permutation(n)
    sel = np.sort(perm[:n_val] if split == "val" else perm[n_val:])
    return images[sel], labels[sel]


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    val_size: int | None = None,
) -> Dataset:
    """Load one split of ``name`` (one of :data:`DATASETS`) as a normalised :class:`Dataset`.

    ``split`` is ``"train"``, ``"val"`` or ``"test"``. ``val`` is a fixed, seeded subset of the
    training file (``val_size`` images, default :data:`VAL_SIZE`: 5,000 for MNIST and Fashion-MNIST)
    and ``train`` is the rest, so the two never overlap and the test file is never touched by a
    choice; ``val_size=0`` makes ``train`` the whole training file (the layout before the split).

    MNIST-style files are found with :func:`find_data_dir`; if missing and ``download`` is true
    they are downloaded (:func:`download_dataset`) into the first search root. A split is decoded
    once and kept in memory, so a second call is instant. ``digits`` is a fixed stratified 80/20
    train/test split (seed :data:`DIGITS_SEED`) of scikit-learn's bundled 8x8 digits, its
    validation split carved from the 80% in the same way.
    """
    key = _canonical(name)
    _check_split(split)
    n_val = 0 if split == "test" else _val_size(key, val_size)
    if key == "digits":
        where = ""

        def read(file_split: str) -> tuple[np.ndarray, np.ndarray]:
            return _digits_split(file_split)

    else:
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
        where = str(folder.resolve())

        def read(file_split: str) -> tuple[np.ndarray, np.ndarray]:
            return _decode_split(key, folder, file_split)

    cache_key = (key, split, where, n_val)
    if cache_key not in _MEMORY:
        if split == "test":
            images, labels = read("test")
        else:
            if (key, where) not in _TRAIN_FILE:
                _TRAIN_FILE[(key, where)] = read("train")
            images, labels = _carve(*_TRAIN_FILE[(key, where)], split, n_val, key)
        x = _normalise(key, images)
        y = torch.from_numpy(labels.astype(np.int64))
        _MEMORY[cache_key] = Dataset(key, split, x, y, 10, (1, int(images.shape[1]), int(images.shape[2])))
    return _MEMORY[cache_key]


def clear_cache() -> None:
    """Forget every decoded split (and decoded training file) held in memory."""
    _MEMORY.clear()
    _TRAIN_FILE.clear()


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
            raise TypeError(f"dataset must be an rmtprune.zoo.data.Dataset, got {type(dataset).__name__}")
        check_int("batch_size", batch_size, 1)
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


class ShardedLoader(FastLoader):
    """This rank's share of every global mini-batch of a :class:`FastLoader` (data-parallel training).

    Every rank draws the same global permutation from an equally seeded ``generator``, cuts it
    into the global batches a one-process :class:`FastLoader` would yield, and keeps rows
    ``rank, rank + world_size, ...`` of each: the layout of ``torch.utils.data.DistributedSampler``
    applied per global batch, so the union of the ranks' batches at every step is exactly the
    one-process batch (DistributedSampler draws its own permutation from ``seed + epoch``, which
    would not reproduce the one-process run). Yields ``(x, y, scale)``: ``scale`` is
    ``world_size / global_batch_rows``, so that ``sum_loss(x, y) * scale`` averaged over the ranks
    (what DDP does to gradients) is the global batch's mean loss. A rank whose share is empty (a
    last batch smaller than ``world_size``) gets the batch's first row with ``scale = 0``: it still
    takes part in the gradient all-reduce, adding nothing.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dataset, batch_size, shuffle=shuffle, generator=generator, device=device)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0, self.world_size - 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:  # type: ignore[override]
        r, w = self.rank, self.world_size
        for x, y in super().__iter__():
            n = int(y.shape[0])
            if r < n:
                yield x[r::w], y[r::w], w / n
            else:
                yield x[:1], y[:1], 0.0


def batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> FastLoader:
    """A :class:`FastLoader` over ``dataset`` (same arguments); re-iterable, with ``len``."""
    return FastLoader(dataset, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
