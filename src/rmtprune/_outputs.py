"""Check every output path before any work starts, so no command loses a file the user had.

The rule (``docs/security.md``): a command overwrites only the OUT it was told to write and the
sidecars that rmtprune itself wrote beside it earlier (recognised by their content); it never
writes over one of its own inputs (except OUT == CHECKPOINT, a re-cut in place, which replaces the
file only when everything has succeeded), never over a directory, and never over a file of the
same name that rmtprune did not write unless ``--force`` is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._atomic import check_writable_dir
from .errors import RmtpruneError

__all__ = ["Output", "check_outputs", "is_ours", "KINDS"]

_PEEK = 1 << 20  # read at most 1 MiB of an existing file to tell whether rmtprune wrote it


def _json_object(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(64 << 20)
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _head(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(_PEEK).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _manifest_json(path: Path) -> bool:
    data = _json_object(path)
    from .manifest import FORMAT, LEGACY_FORMATS

    return data is not None and data.get("format") in (FORMAT, *LEGACY_FORMATS)


#: ``format`` fields of the JSON reports rmtprune writes.
REPORT_FORMATS = ("rmtprune-compress-report", "rmtprune-sparsify-report", "rmtprune-demo-summary")


def _report_json(path: Path) -> bool:
    data = _json_object(path)
    if data is None:
        return False
    if "format" in data:  # never a checkpoint's manifest (an input's sidecar) or anything else
        return data["format"] in REPORT_FORMATS
    return "rmtprune_version" in data and "totals" in data  # a compress report written before 0.1.1


def _analysis_json(path: Path) -> bool:
    data = _json_object(path)
    keys = {"rmtprune_version", "checkpoint", "counts", "ignored_counts", "layers"}  # its "format" is
    return data is not None and keys <= set(data)  # the checkpoint's (safetensors, torch...)


def _markdown(path: Path) -> bool:
    return _head(path).startswith("# rmtprune")


def _analysis_csv(path: Path) -> bool:
    return _head(path).startswith("layer,shape,matrix_shape,")


def _safetensors_ours(path: Path) -> bool:
    try:
        from .manifest import read_manifest

        return read_manifest(path) is not None
    except Exception:  # not readable as ours: treat as the user's
        return False


def _rmtprune_png(path: Path) -> bool:
    """A PNG carrying the text chunk rmtprune writes (``Software: rmtprune``), not any matplotlib PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PEEK)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00rmtprune" in head


#: Output kind -> test that an existing file of that name was written by rmtprune.
KINDS: dict[str, Callable[[Path], bool]] = {
    "out": lambda p: True,  # the OUT the command was told to write
    "weights": _safetensors_ours,
    "manifest": _manifest_json,
    "report-json": _report_json,
    "report-md": _markdown,
    "analysis-json": _analysis_json,
    "analysis-csv": _analysis_csv,
    "plot": _rmtprune_png,
}


def is_ours(path: str | os.PathLike[str], kind: str) -> bool:
    """Whether the existing file ``path`` looks written by rmtprune as an output of ``kind``."""
    return KINDS[kind](Path(path))


@dataclass(frozen=True)
class Output:
    """One file a command will write: its path, its kind (:data:`KINDS`) and how the user named it."""

    path: Path
    kind: str
    label: str


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _input_files(inputs: Iterable[str | os.PathLike[str] | None]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        if item is None:
            continue
        p = Path(item).expanduser()
        if p.is_dir():  # a shard directory: every file in it is an input
            out.extend(q for q in p.iterdir() if q.is_file())
        else:
            out.append(p)
    return out


def check_outputs(
    outputs: Sequence[Output],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    force: bool = False,
    in_place: Path | None = None,
) -> None:
    """Raise :class:`RmtpruneError` naming the first output that must not be written.

    Refused, whatever ``force`` says: an output that is a directory, whose directory is missing or
    read-only, that is one of ``inputs`` (except ``in_place``, the OUT of a re-cut in place), or
    that two outputs share. Refused unless ``force``: an existing file that rmtprune did not write
    (a sidecar named like the user's ``--config`` file, say).
    """
    files = _input_files(inputs)
    seen: list[Output] = []
    for o in outputs:
        p = o.path
        if p.is_dir():
            raise RmtpruneError(f"{o.label} {str(p)!r} is a directory, not a file")
        check_writable_dir(p)
        for other in seen:
            if _same(p, other.path):
                raise RmtpruneError(f"{o.label} and {other.label} are the same file {str(p)!r}")
        seen.append(o)
        for f in files:
            if _same(p, f) and not (in_place is not None and _same(p, in_place) and o.kind == "out"):
                raise RmtpruneError(
                    f"{o.label} {str(p)!r} is an input of this command; it would be overwritten: "
                    "choose another output path"
                )
        if p.exists() and not force and not KINDS[o.kind](p):
            raise RmtpruneError(
                f"refusing to overwrite {str(p)!r} ({o.label}): it exists and was not written by rmtprune; "
                "move it, choose another output path, or pass --force"
            )
