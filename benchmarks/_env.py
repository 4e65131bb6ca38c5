"""Environment facts for benchmark reports, kept free of heavy imports (``scale.py`` measures RSS)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


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
