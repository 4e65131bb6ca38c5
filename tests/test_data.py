"""Tests of rmtprune.zoo.data: lookup order, verified download (local 127.0.0.1 server), IDX, loaders."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import importlib
import importlib.util
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rmtprune.errors import RmtpruneError
from rmtprune.zoo import data as D

FILES = D._ALL_FILES
SHARED = Path(os.environ["RMTPRUNE_DATA"])  # set by conftest.py, read before any test changes it


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No RMTPRUNE_DATA, no mirrors override, an empty private cache dir; the memory cache is cleared."""
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    monkeypatch.delenv(D.MIRRORS_ENV, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv(D.CACHE_ENV, str(cache))
    D.clear_cache()
    yield cache
    D.clear_cache()


def _touch_all(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        (folder / f).write_bytes(b"")
    return folder


def _idx_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


# ----------------------------------------------------------------------------- names, lookup order


def test_datasets_tuple() -> None:
    assert D.DATASETS == ("mnist", "fashion-mnist", "digits")


@pytest.mark.parametrize("name", ["cifar10", "imagenet", ""])
def test_unknown_dataset_lists_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="valid datasets: mnist, fashion-mnist, digits"):
        D.load_dataset(name)


def test_bad_split_and_types() -> None:
    with pytest.raises(ValueError, match="split='valid' must be one of train, val, test"):
        D.load_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="val_size=0: no validation split of digits"):
        D.load_dataset("digits", split="val", val_size=0)
    with pytest.raises(ValueError, match="val_size=5000 must be smaller than the 1438 training images"):
        D.load_dataset("digits", split="train", val_size=5000)
    with pytest.raises(ValueError, match="val_size"):
        D.load_dataset("digits", split="train", val_size=-1)
    with pytest.raises(TypeError, match="dataset name must be a string"):
        D.load_dataset(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("alias", ["fashion", "Fashion_MNIST", "fmnist"])
def test_aliases(alias: str) -> None:
    assert D._canonical(alias) == "fashion-mnist"


def test_lookup_order(no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arg, env = tmp_path / "arg", tmp_path / "env"
    cache_folder = _touch_all(no_env / "data" / "mnist")
    assert D.find_data_dir("mnist") == cache_folder
    env_folder = _touch_all(env / "mnist")
    monkeypatch.setenv(D.DATA_ENV, str(env))
    assert D.find_data_dir("mnist") == env_folder
    arg_folder = _touch_all(arg / "mnist")
    assert D.find_data_dir("mnist", data_dir=arg) == arg_folder
    # data_dir may also point straight at the folder holding the files
    assert D.find_data_dir("mnist", data_dir=arg_folder) == arg_folder
    # a data_dir without the files falls through to the env var
    assert D.find_data_dir("mnist", data_dir=tmp_path / "empty") == env_folder


def test_partial_folder_is_skipped(no_env: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d" / "mnist"
    folder.mkdir(parents=True)
    (folder / FILES[0]).write_bytes(b"")
    with pytest.raises(RmtpruneError, match="mnist files not found"):
        D.find_data_dir("mnist", data_dir=tmp_path / "d")


def test_missing_offline_error_lists_paths_and_env(no_env: Path, tmp_path: Path) -> None:
    with pytest.raises(RmtpruneError) as info:
        D.load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere", download=False)
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "fashion-mnist") in msg
    assert str(no_env / "data" / "fashion-mnist") in msg
    assert "RMTPRUNE_DATA" in msg and "train-images-idx3-ubyte.gz" in msg
    assert not (tmp_path / "nowhere").exists()


def test_digits_without_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "sklearn" else real(n, *a))
    monkeypatch.setitem(sys.modules, "sklearn", None)  # ``import sklearn`` raises ImportError too
    D.clear_cache()
    with pytest.raises(
        RmtpruneError, match=r"digits dataset needs scikit-learn.*pip install 'rmtprune\[zoo\]'"
    ):
        D.load_dataset("digits", "test")
    D.clear_cache()


def test_old_module_path_is_the_same_module_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtprune.zoo.models

    for old, new in (("rmtprune.data", D), ("rmtprune.models", rmtprune.zoo.models)):
        monkeypatch.delitem(sys.modules, old, raising=False)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new.__name__}"):
            module = importlib.import_module(old)
        assert module is new and sys.modules[old] is new
    assert rmtprune.load_dataset is D.load_dataset and rmtprune.build_model is rmtprune.zoo.models.build_model


def test_digits_has_no_data_dir() -> None:
    with pytest.raises(ValueError, match="bundled with scikit-learn"):
        D.find_data_dir("digits")


# ----------------------------------------------------------------------------- real data


def test_mnist_real(data_dir: Path) -> None:
    D.clear_cache()
    train = D.load_dataset("mnist", "train", val_size=0)  # the whole training file
    test = D.load_dataset("mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == torch.float32
    assert test.x.shape == (10000, 1, 28, 28) and test.y.dtype == torch.int64
    assert (train.num_classes, train.input_shape, train.num_features) == (10, (1, 28, 28), 784)
    assert train.y.bincount().tolist()[:3] == [5923, 6742, 5958]
    # fixed constants standardise the train split
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1) < 1e-3
    # decoded once: the second call is the cached object
    assert D.load_dataset("mnist", "train", val_size=0) is train
    assert D.load_dataset("MNIST", "train", data_dir=data_dir, val_size=0) is train


def test_fashion_test_split(data_dir: Path) -> None:
    ds = D.load_dataset("fashion-mnist", "test")
    assert len(ds) == 10000 and ds.y.bincount().tolist() == [1000] * 10


def test_local_checksum_mismatch_is_an_error(no_env: Path, tmp_path: Path) -> None:
    data_dir = SHARED
    folder = tmp_path / "bad" / "mnist"
    folder.mkdir(parents=True)
    for f in FILES:
        (folder / f).symlink_to(data_dir / "mnist" / f)
    (folder / FILES[3]).unlink()
    raw = bytearray((data_dir / "mnist" / FILES[3]).read_bytes())
    raw[-20] ^= 0xFF
    (folder / FILES[3]).write_bytes(bytes(raw))
    with pytest.raises(RmtpruneError, match=r"sha256 mismatch for .*t10k-labels-idx1-ubyte.gz"):
        D.load_dataset("mnist", "test", data_dir=tmp_path / "bad")


def test_files_of_the_other_dataset_are_named(no_env: Path) -> None:
    # data_dir pointing straight at the MNIST folder, asked for Fashion-MNIST
    with pytest.raises(RmtpruneError, match="is the mnist file, not fashion-mnist"):
        D.load_dataset("fashion-mnist", "test", data_dir=SHARED / "mnist", download=False)


# ----------------------------------------------------------------------------- digits


def test_digits_needs_no_files(no_env: Path) -> None:
    train, test = D.load_dataset("digits", "train", val_size=0), D.load_dataset("digits", "test")
    assert train.x.shape == (1438, 1, 8, 8) and test.x.shape == (359, 1, 8, 8)
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    # stratified: every class has ~20% of its images in the test split
    counts = np.bincount(D._digits_arrays()[1])
    assert counts.sum() == 1797
    assert np.array_equal(test.y.bincount().numpy(), np.round(0.2 * counts).astype(int))
    # fixed: the same split after clearing the cache
    D.clear_cache()
    again = D.load_dataset("digits", "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    # train and test are disjoint images (rows of the 1797 x 64 matrix)
    rows = {tuple(r) for r in test.x.reshape(len(test), -1).tolist()}
    overlap = sum(tuple(r) in rows for r in train.x.reshape(len(train), -1).tolist())
    assert overlap <= 5  # the bundled set holds a few exact duplicate images, nothing more


def test_subset_and_to() -> None:
    ds = D.load_dataset("digits", val_size=0)
    small = ds.subset(10)
    assert len(small) == 10 and torch.equal(small.x, ds.x[:10])
    picked = ds.subset([3, 1])
    assert torch.equal(picked.y, ds.y[[3, 1]])
    assert ds.to("cpu").x.device.type == "cpu"
    with pytest.raises(ValueError, match=r"n=5000 must be in \[0, 1438\]"):
        ds.subset(5000)


# ----------------------------------------------------------------------------- IDX validation


def test_read_idx_real(data_dir: Path) -> None:
    labels = D.read_idx(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8 and labels.max() == 9


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (bytes([0, 0, 0x08]), "wrong magic number"),
        (bytes([8, 3, 0, 0]) + b"\0" * 20, "wrong magic number"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]), "wrong magic number"),
        (bytes([0, 0, 0x08, 3, 0, 0, 0, 2]), "truncated: header needs 16 bytes"),
        (_idx_bytes(np.zeros((3, 2, 2)))[:-1], r"header \(dims \(3, 2, 2\)\) implies 28"),
        (_idx_bytes(np.zeros((3, 2, 2))) + b"x", "has 29 bytes"),
    ],
)
def test_read_idx_rejects_bad_headers(tmp_path: Path, payload: bytes, match: str) -> None:
    path = _idx_gz(tmp_path / "bad-idx1-ubyte.gz", payload)
    with pytest.raises(RmtpruneError, match=match) as info:
        D.read_idx(path)
    assert "bad-idx1-ubyte.gz" in str(info.value)


def test_read_idx_truncated_and_not_gzip(tmp_path: Path, data_dir: Path) -> None:
    raw = (data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RmtpruneError, match=r"cut.gz.*not a valid gzip file \(truncated or corrupt"):
        D.read_idx(cut)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"hello, not gzip")
    with pytest.raises(RmtpruneError, match="plain.gz.*not a valid gzip file"):
        D.read_idx(plain)
    with pytest.raises(RmtpruneError, match="does not exist"):
        D.read_idx(tmp_path / "missing.gz")


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(D.read_idx(_idx_gz(tmp_path / "a.gz", _idx_bytes(arr))), arr)


# ----------------------------------------------------------------------------- download


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


class _Liar(_Quiet):
    """Announces twice the real length, then hangs up: a download cut short."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = b"\x1f\x8b" + b"x" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(2 * len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


@contextlib.contextmanager
def _serve(handler: Any, timeout: float | None = None) -> Iterator[str]:
    """A bounded HTTP server on 127.0.0.1 in a thread; yields its base URL, shut down on exit."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if timeout is not None:
        httpd.timeout = timeout
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bounded HTTP server on 127.0.0.1 serving good, corrupted and truncated copies of MNIST."""
    shared = SHARED / "mnist"
    root = tmp_path_factory.mktemp("mirror")
    for kind in ("good", "corrupt", "short"):
        (root / kind / "mnist").mkdir(parents=True)
    for f in FILES:
        shutil.copyfile(shared / f, root / "good" / "mnist" / f)
        raw = bytearray((shared / f).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (root / "corrupt" / "mnist" / f).write_bytes(bytes(raw))
        (root / "short" / "mnist" / f).write_bytes(bytes(raw[: len(raw) // 3]))
    with _serve(functools.partial(_Quiet, directory=str(root)), timeout=5) as url:
        yield url


@pytest.fixture
def liar() -> Iterator[str]:
    with _serve(_Liar) as url:
        yield url + "/"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_ok_then_load(no_env: Path, tmp_path: Path, server: str) -> None:
    dest = D.download_dataset("mnist", tmp_path / "dl", mirrors=[server + "/good/{name}/"], timeout=10)
    assert _leftovers(dest) == sorted(FILES)
    for f in FILES:
        assert D.sha256_file(dest / f) == D.SHA256["mnist"][f]
    ds = D.load_dataset("mnist", "test", data_dir=tmp_path / "dl")
    assert ds.x.shape == (10000, 1, 28, 28)


def test_load_dataset_downloads_into_data_dir(
    no_env: Path, tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first mirror serves corrupted files, the second good ones: the loader falls through
    monkeypatch.setenv(D.MIRRORS_ENV, f"{server}/corrupt/{{name}}/,{server}/good/{{name}}/")
    ds = D.load_dataset("mnist", "test", data_dir=tmp_path / "fresh")
    assert len(ds) == 10000
    assert _leftovers(tmp_path / "fresh" / "mnist") == sorted(FILES)


@pytest.mark.parametrize("kind", ["corrupt", "short"])
def test_download_checksum_mismatch_leaves_nothing(
    no_env: Path, tmp_path: Path, server: str, kind: str
) -> None:
    dest = tmp_path / "dl"
    with pytest.raises(RmtpruneError, match="sha256 mismatch") as info:
        D.download_dataset("mnist", dest, mirrors=[f"{server}/{kind}/mnist"], timeout=10)
    assert "Put the four files" in str(info.value)
    assert _leftovers(dest) == []


def test_download_cut_short_leaves_nothing(no_env: Path, tmp_path: Path, liar: str) -> None:
    dest = tmp_path / "dl"
    with pytest.raises(RmtpruneError, match="could not download mnist file") as info:
        D.download_dataset("mnist", dest, mirrors=liar, timeout=10)
    assert "IncompleteRead" in str(info.value) or "truncated download" in str(info.value)
    assert _leftovers(dest) == []


def test_download_unreachable_is_clear(no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _closed_port_url()
    with pytest.raises(
        RmtpruneError, match=r"could not download mnist file .*refused.*Offline\? Put the four"
    ):
        D.download_dataset("mnist", tmp_path / "dl", mirrors=[url], timeout=5)
    assert _leftovers(tmp_path / "dl") == []
    monkeypatch.setenv(D.MIRRORS_ENV, url)
    with pytest.raises(RmtpruneError, match=r"mnist files not found locally \(searched: .*RMTPRUNE_DATA"):
        D.load_dataset("mnist", data_dir=tmp_path / "x")


def test_download_keeps_good_files_and_replaces_bad(no_env: Path, tmp_path: Path, server: str) -> None:
    dest = tmp_path / "dl"
    D.download_dataset("mnist", dest, mirrors=[server + "/good/mnist/"], timeout=10)
    (dest / FILES[1]).write_bytes(b"garbage")
    D.download_dataset("mnist", dest, mirrors=[server + "/good/mnist/"], timeout=10)
    assert D.sha256_file(dest / FILES[1]) == D.SHA256["mnist"][FILES[1]]


def test_download_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout=0 must be a positive"):
        D.download_dataset("mnist", tmp_path, timeout=0)
    with pytest.raises(ValueError, match="never downloaded"):
        D.download_dataset("digits", tmp_path)
    with pytest.raises(ValueError, match="no download mirrors"):
        D.download_dataset("mnist", tmp_path, mirrors=[])


# ----------------------------------------------------------------------------- loaders and seeds


@pytest.mark.parametrize(
    ("n_batch", "drop_last", "expected"), [(100, False, 15), (100, True, 14), (1438, False, 1)]
)
def test_loader_len(n_batch: int, drop_last: bool, expected: int) -> None:
    loader = D.batches(D.load_dataset("digits", val_size=0), n_batch, shuffle=True, drop_last=drop_last)
    assert len(loader) == expected == sum(1 for _ in loader)


def test_loader_deterministic_and_complete() -> None:
    ds = D.load_dataset("digits", val_size=0)

    def order(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in D.FastLoader(ds, 64, shuffle=True, generator=gen)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert torch.equal(order(1).sort().values, ds.y.sort().values)
    # each batch pairs images with their labels
    gen = torch.Generator().manual_seed(0)
    x, y = next(iter(D.FastLoader(ds, 32, shuffle=True, generator=gen)))
    rows = (ds.x.reshape(len(ds), -1)[None] == x.reshape(32, 1, -1)).all(-1)
    assert all(int(ds.y[rows[i]].unique()[0]) == int(y[i]) for i in range(32))
    # without shuffling: the data in order, re-iterable
    loader = D.batches(ds, 500)
    assert torch.equal(torch.cat([b for b, _ in loader]), ds.x)
    assert torch.equal(torch.cat([b for b, _ in loader]), ds.x)


def test_loader_chunked_gather_keeps_the_permutation(data_dir: Path) -> None:
    """Batches across the loader's gather chunks are exactly x[perm[i * bs:(i + 1) * bs]]."""
    ds = D.load_dataset("mnist", "test")  # 31 MB of float32: several 16 MB gather chunks
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3))
    loader = D.FastLoader(ds, 100, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=True)
    n = 0
    for i, (x, y) in enumerate(loader):
        idx = perm[i * 100 : (i + 1) * 100]
        assert torch.equal(x, ds.x[idx]) and torch.equal(y, ds.y[idx])
        n += 1
    assert n == len(loader) == 100


def test_loader_argument_errors() -> None:
    ds = D.load_dataset("digits")
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        D.FastLoader(ds, 0)
    with pytest.raises(TypeError, match="batch_size=3.5 must be an int"):
        D.FastLoader(ds, 3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dataset must be an rmtprune.zoo.data.Dataset"):
        D.FastLoader([1, 2], 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        D.FastLoader(ds, 3, generator=0)  # type: ignore[arg-type]


def test_seed_everything() -> None:
    gen = D.seed_everything(7)
    a = (torch.rand(3), np.random.rand(), torch.rand(2, generator=gen))
    gen = D.seed_everything(7)
    b = (torch.rand(3), np.random.rand(), torch.rand(2, generator=gen))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(TypeError, match="seed must be an int"):
        D.seed_everything("7")  # type: ignore[arg-type]


def test_checksums_match_shared_file(data_dir: Path) -> None:
    sums = {}
    for line in (data_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        folder, fname = name.split("/")
        sums.setdefault(folder, {})[fname] = digest
    assert sums == D.SHA256


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "digits"])
def test_dataset_shape_matches_the_loaded_data(name: str) -> None:
    ds = D.load_dataset(name, "test", data_dir=SHARED if name != "digits" else None)
    assert D.dataset_shape(name) == (ds.input_shape, ds.num_classes)
    assert D.dataset_shape(name.upper().replace("-", "_")) == D.dataset_shape(name)


# ----------------------------------------------------------------------------- crafted input (issue 10)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        # dims whose product is far beyond what the gzip file can hold: refused before allocating
        (bytes([0, 0, 0x08, 3]) + b"\xff\xff\xff\xff" * 3, "more than a .*-byte gzip file can hold"),
        (bytes([0, 0, 0x0E, 2]) + b"\x7f\xff\xff\xff" * 2 + b"\0" * 64, "can hold"),
        (bytes([0, 0, 0x08, 255]) + b"\0\0\0\x02" * 255, "can hold"),
        (bytes([0, 0, 0x08, 255]) + b"\0\0\0\x02" * 10, "truncated: header needs 1024 bytes, has 44"),
        (b"", r"wrong magic number \(empty\)"),
        (bytes([0, 0, 0x08, 2, 0, 0, 0, 3, 0, 0, 0, 3]) + b"\0" * 8, r"has 20 bytes .*implies 21"),
    ],
)
def test_read_idx_rejects_crafted_sizes(tmp_path: Path, payload: bytes, match: str) -> None:
    path = _idx_gz(tmp_path / "crafted-idx-ubyte.gz", payload)
    with pytest.raises(RmtpruneError, match=match) as info:
        D.read_idx(path)
    assert "crafted-idx-ubyte.gz" in str(info.value) and "\n" not in str(info.value)


def test_read_idx_bad_crc_and_trailing_garbage(tmp_path: Path) -> None:
    good = gzip.compress(_idx_bytes(np.arange(12).reshape(3, 4)))
    bad_crc = bytearray(good)
    bad_crc[-6] ^= 0xFF  # the CRC32 in the gzip trailer
    (tmp_path / "crc.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(RmtpruneError, match="crc.gz.*not a valid gzip file"):
        D.read_idx(tmp_path / "crc.gz")
    (tmp_path / "tail.gz").write_bytes(good + b"garbage")
    with pytest.raises(RmtpruneError, match="tail.gz.*not a valid gzip file"):
        D.read_idx(tmp_path / "tail.gz")


def test_known_sizes_match_the_shared_files(data_dir: Path) -> None:
    for name, files in D.SIZES.items():
        assert sorted(files) == sorted(D.SHA256[name])
        for f, size in files.items():
            assert (data_dir / name / f).stat().st_size == size, (name, f)


def test_failed_download_leaves_no_created_tree(no_env: Path, tmp_path: Path) -> None:
    dest = tmp_path / "nonexistent" / "deeper" / "mnist"
    with pytest.raises(RmtpruneError, match="could not download mnist file"):
        D.download_dataset("mnist", dest, mirrors=[_closed_port_url()], timeout=5)
    assert not (tmp_path / "nonexistent").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # tmp_path itself existed before: kept


@pytest.fixture
def partial_mirror(tmp_path: Path) -> Iterator[str]:
    """A 127.0.0.1 mirror with only the first MNIST file: the download fails on the second."""
    root = tmp_path / "partial"
    root.mkdir()
    shutil.copyfile(SHARED / "mnist" / FILES[0], root / FILES[0])
    with _serve(functools.partial(_Quiet, directory=str(root))) as url:
        yield url + "/"


def test_failed_download_removes_only_what_it_created(
    no_env: Path, tmp_path: Path, partial_mirror: str
) -> None:
    # a fresh tree: the first file lands, the second fails, and the whole tree goes again
    fresh = tmp_path / "fresh" / "mnist"
    with pytest.raises(RmtpruneError, match=f"could not download mnist file {FILES[1]}"):
        D.download_dataset("mnist", fresh, mirrors=[partial_mirror], timeout=10)
    assert not (tmp_path / "fresh").exists()
    # an existing folder with a user's file: the folder, the user's file and the verified download stay
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RmtpruneError, match="could not download"):
        D.download_dataset("mnist", kept, mirrors=[partial_mirror], timeout=10)
    assert _leftovers(kept) == sorted(["notes.txt", FILES[0]])
    assert (kept / "notes.txt").read_text() == "mine"


class _Flood(_Quiet):
    """Sends 1000 bytes (with or without announcing them): more than the expected size."""

    announce = False

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_response(200)
        if self.announce:
            self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"x" * 998)
        self.close_connection = True


class _FloodAnnounced(_Flood):
    announce = True


@pytest.mark.parametrize(
    ("handler", "match"),
    [
        (_Flood, "sends more than the expected 100 bytes"),
        (_FloodAnnounced, "announces 1000 bytes, more than the expected 100"),
    ],
)
def test_download_is_capped_at_the_known_size(
    no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handler: type, match: str
) -> None:
    monkeypatch.setitem(D.SIZES, "mnist", dict.fromkeys(FILES, 100))
    with _serve(handler) as url, pytest.raises(RmtpruneError, match=match):
        D.download_dataset("mnist", tmp_path / "dl", mirrors=[url + "/"], timeout=10)
    assert not (tmp_path / "dl").exists()


# ----------------------------------------------------------------------------- validation split


def _rows(ds: D.Dataset) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in ds.x.flatten(1)}


def test_val_split_is_fixed_disjoint_and_complete() -> None:
    """``val`` and ``train`` partition the training file (digits: 1,438 images), in the file's
    order, by the documented seeded permutation; ``test`` is untouched; val_size=0 is the old layout."""
    full = D.load_dataset("digits", "train", val_size=0)
    train, val = D.load_dataset("digits", "train"), D.load_dataset("digits", "val")
    assert (len(full), len(train), len(val)) == (1438, 1438 - D.VAL_SIZE["digits"], D.VAL_SIZE["digits"])
    perm = np.random.RandomState(D.VAL_SEED).permutation(len(full))
    assert torch.equal(val.x, full.x[np.sort(perm[: len(val)])])
    assert torch.equal(train.y, full.y[np.sort(perm[len(val) :])])
    assert not _rows(train) & _rows(val)
    assert len(_rows(train) | _rows(val)) == len(_rows(full))
    assert len(D.load_dataset("digits", "test")) == 359
    small = D.load_dataset("digits", "val", val_size=10)
    assert len(small) == 10 and torch.equal(small.x, full.x[np.sort(perm[:10])])
    assert D.load_dataset("digits", "val") is val  # cached per val_size


def test_val_split_mnist_sizes(data_dir: Path) -> None:
    train = D.load_dataset("mnist", "train", data_dir=data_dir)
    val = D.load_dataset("mnist", "val", data_dir=data_dir)
    assert (len(train), len(val)) == (55_000, 5_000) and train.split == "train" and val.split == "val"
    assert len(D.load_dataset("mnist", "train", data_dir=data_dir, val_size=0)) == 60_000
    # every class is in the validation split in about its share
    assert torch.bincount(val.y, minlength=10).min() > 400


def test_train_and_val_decode_the_training_file_once(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` and ``val`` are carved from one decode of the training file (sha256 + gunzip once)."""
    D.clear_cache()
    calls: list[str] = []
    real = D._decode_split

    def counting(name: str, folder: Path, split: str, verify: bool = True) -> Any:
        calls.append(split)
        return real(name, folder, split, verify)

    monkeypatch.setattr(D, "_decode_split", counting)
    train, val = D.load_dataset("mnist", "train"), D.load_dataset("mnist", "val")
    D.load_dataset("mnist", "train", val_size=0)
    assert calls == ["train"] and (len(train), len(val)) == (55_000, 5_000)
    D.clear_cache()
