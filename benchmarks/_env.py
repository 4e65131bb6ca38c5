"""Environment facts for benchmark reports, kept free of heavy imports (``scale.py`` measures RSS)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import importlib.util
import os
import platform
import subprocess
from pathlib import Path


def versions(*packages: str) -> str:
    """``"pkg 1.2.3, other (not installed), ..."`` for the given distribution names."""
    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def machine_line() -> str:
    """The ``- Machine: ...`` line of a results file: cores, processor, Python and library versions."""
    return (
        f"- Machine: {os.cpu_count()} CPU cores, no GPU ({platform.processor() or platform.machine()}; "
        f"Python {platform.python_version()}, {versions('torch', 'safetensors', 'numpy')}). "
        "Other processes may share the cores: times are indicative."
    )


#: Parts of the package a training run never loads (``tests/test_bench_cache.py`` checks it, by
#: training with pruning in a fresh process and listing the modules it imported): editing them does
#: not change what :func:`rmtprune.train` trains, so they are left out of :func:`training_code`.
NOT_TRAINING = (
    "commands/", "sparsity/", "cli.py", "__main__.py", "plotting.py", "sparsify.py", "sparse_format.py",
    "hf.py", "_outputs.py", "_safetensors_reader.py", "_torch_reader.py", "_tensor_source.py",
    "checkpoint.py", "models.py", "data.py",
)  # fmt: skip


def _package_dir() -> Path:
    spec = importlib.util.find_spec("rmtprune")
    if spec is None or spec.origin is None:
        raise RuntimeError("rmtprune is not installed")
    return Path(spec.origin).parent


@functools.cache
def training_code() -> str:
    """12 hex digits of the sha256 of the package source a training run executes.

    Every ``.py`` file of the installed ``rmtprune`` except :data:`NOT_TRAINING`, and the packaged
    data the fits read (the KS gate's null table, ``*.json``), in path order, path and bytes.
    Cached trained models are keyed by it next to their config, so a change to the trainer, the
    data, the models or the pruning code retrains instead of reusing stale weights.
    """
    root = _package_dir()
    h = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
        rel = path.relative_to(root).as_posix()
        if rel in NOT_TRAINING or any(rel.startswith(p) for p in NOT_TRAINING if p.endswith("/")):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_revision() -> str:
    """``<short hash>`` of HEAD, ``+ uncommitted changes`` when the code differs (untracked files too,
    results and runs aside); ``unknown`` outside git. Every results file names it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        )
        status = ["git", "status", "--porcelain", "--", ".", ":!benchmarks/results", ":!runs"]
        dirty = subprocess.run(status, cwd=repo, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
