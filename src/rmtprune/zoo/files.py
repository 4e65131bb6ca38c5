"""The dataset names and the original IDX files: sums, sizes, mirrors, and where they are looked up.

Lookup order for a dataset's folder: ``data_dir`` (the CLI's ``--data-dir``), ``$RMTPRUNE_DATA``,
then the user cache directory. :mod:`.download` fetches missing files, :mod:`.idx` decodes them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from ..errors import RmtpruneError

__all__ = [
    "CACHE_ENV",
    "DATASETS",
    "DATA_ENV",
    "MIRRORS",
    "MIRRORS_ENV",
    "SHA256",
    "SHAPES",
    "SIZES",
    "cache_dir",
    "find_data_dir",
    "sha256_file",
]

#: Names accepted by :func:`rmtprune.zoo.data.load_dataset`.
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
#: The splits :func:`rmtprune.zoo.data.load_dataset` serves: ``val`` is carved from the training file.
_SPLITS = ("train", "val", "test")

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


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
