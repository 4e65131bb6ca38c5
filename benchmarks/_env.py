"""Environment facts for benchmark reports, kept free of heavy imports (``scale.py`` measures RSS)."""

from __future__ import annotations

import importlib.metadata as md


def versions(*packages: str) -> str:
    """``"pkg 1.2.3, other (not installed), ..."`` for the given distribution names."""
    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)
