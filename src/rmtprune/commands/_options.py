"""One table-driven way to turn a config dataclass's fields into command-line flags, and back.

A command lists its flags as ``--flag -> (field, type, metavar)``; :func:`add_flags` adds one
argparse option per row (``dest`` the field, ``default=argparse.SUPPRESS`` so a flag left out is
absent from the namespace, help from the field's ``metadata["help"]`` and its default), and
:func:`given` reads back only the fields the user gave. :func:`add_compression_flags` and
:func:`compression_overrides` do this for :class:`~rmtprune.config.CompressionConfig`, so
``compress``, ``sparsify`` and ``train`` share one set of rank-rule options. :func:`add_device_flag`
and :func:`check_device` give ``compress`` and ``sparsify`` their ``--device``, :func:`add_threads_flag`
and :func:`set_threads` their ``--threads``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "FlagTable",
    "add_flags",
    "given",
    "COMPRESSION_FLAGS",
    "COMPRESSION_SWITCHES",
    "COMPRESSION_FIELDS",
    "add_compression_flags",
    "compression_overrides",
    "add_device_flag",
    "check_device",
]

#: ``--flag -> (dataclass field, type, metavar)``.
FlagTable = Mapping[str, tuple[str, type, str | None]]

#: The valued options of :class:`~rmtprune.config.CompressionConfig`.
COMPRESSION_FLAGS: dict[str, tuple[str, type, str | None]] = {
    "--rule": ("rule", str, None),
    "--keep-bulk": ("keep_bulk", float, "F"),
    "--alpha": ("alpha", float, "A"),
    "--beta": ("beta", float, "B"),
    "--ks-max": ("ks_max", float, "KS"),
    "--noise": ("noise", str, None),
    "--min-rank": ("min_rank", int, "K"),
    "--energy": ("energy", float, "FRACTION"),
    "--ratio": ("ratio", float, "R"),
    "--rank": ("rank", int, "K"),
    "--sigma": ("sigma", float, "SIGMA"),
    "--svd-dtype": ("svd_dtype", str, None),
    "--target": ("target", float, "F"),
    "--target-macs": ("target_macs", float, "F"),
    "--allocation": ("allocation", str, None),
    "--damping": ("damping", float, "D"),
    "--guard": ("guard", float, "TOL"),
}

#: The on/off options of :class:`~rmtprune.config.CompressionConfig`: ``--flag -> (field, action, help)``.
COMPRESSION_SWITCHES: dict[str, tuple[str, str, str]] = {
    "--dense-truncate": (
        "dense_truncate",
        "store_true",
        "where factoring would not save parameters, write the rank-k weight back dense",
    ),
    "--factor-always": ("factor_only_if_smaller", "store_false", "factor even when k(m+n) >= mn"),
    "--sequential": (
        "sequential",
        "store_true",
        "with --calibration: cut block after block, each truncated on the inputs the cut blocks give it",
    ),
    "--cut-last": (
        "protect_last",
        "store_false",
        "also cut the last prunable layer (the logits; kept by default)",
    ),
}

#: Every CompressionConfig field a command line can set.
COMPRESSION_FIELDS: tuple[str, ...] = (
    *(f for f, _, _ in COMPRESSION_FLAGS.values()),
    "include",
    "exclude",
    *(f for f, _, _ in COMPRESSION_SWITCHES.values()),
)


def _help(text: str, default: Any) -> str:
    return text if default is None else f"{text} (default: {default})"


def add_flags(
    parser: Any,
    cls: type,
    table: FlagTable,
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    where: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Add one option per ``table`` row to ``parser`` for the fields of the dataclass ``cls``.

    ``choices`` restricts a field's values; ``defaults`` replaces the defaults shown in the help
    (the dataclass's own otherwise); ``where`` puts a field's option in another container (a
    mutually exclusive group); ``aliases`` gives a flag more option strings.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    choices, defaults, where, aliases = choices or {}, defaults or {}, where or {}, aliases or {}
    for flag, (name, typ, metavar) in table.items():
        f = fields[name]
        default = defaults.get(name, f.default if f.default is not dataclasses.MISSING else None)
        where.get(name, parser).add_argument(
            flag,
            *aliases.get(flag, ()),
            dest=name,
            type=typ,
            metavar=metavar,
            choices=choices.get(name),
            default=argparse.SUPPRESS,
            help=_help(f.metadata.get("help", ""), default),
        )


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The fields among ``names`` that were given on the command line (the others are absent)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_compression_flags(
    parser: Any,
    *,
    defaults: Mapping[str, Any] | None = None,
    where: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    include_help: str = "layers to compress (repeatable)",
    exclude_help: str = "layers to leave as they are (repeatable)",
) -> None:
    """Add every :class:`~rmtprune.config.CompressionConfig` option (rule, fit, patterns, switches)."""
    from ..config import CompressionConfig
    from ..spectral import RULES

    choices = {"rule": sorted(RULES), "svd_dtype": ["float64", "float32"]}
    add_flags(
        parser,
        CompressionConfig,
        COMPRESSION_FLAGS,
        choices=choices,
        defaults=defaults,
        where=where,
        aliases=aliases,
    )
    where, aliases = where or {}, aliases or {}
    for flag, name, text in (("--include", "include", include_help), ("--exclude", "exclude", exclude_help)):
        where.get(name, parser).add_argument(
            flag,
            *aliases.get(flag, ()),
            dest=name,
            action="append",
            metavar="PATTERN",
            default=argparse.SUPPRESS,
            help=text,
        )
    for flag, (name, action, text) in COMPRESSION_SWITCHES.items():
        where.get(name, parser).add_argument(
            flag, *aliases.get(flag, ()), dest=name, action=action, default=argparse.SUPPRESS, help=text
        )


def compression_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The CompressionConfig fields given on the command line, with what the rule flags imply.

    ``--ratio`` or ``--rank`` alone mean the ``fixed`` rule (and unset the other one);
    ``--energy`` alone means the ``energy`` rule.
    """
    out = given(args, COMPRESSION_FIELDS)
    asked = set(out)
    if ("ratio" in asked or "rank" in asked) and "rule" not in asked:
        out["rule"] = "fixed"
    if "ratio" in asked and "rank" not in asked:
        out["rank"] = None
    if "rank" in asked and "ratio" not in asked:
        out["ratio"] = None
    if "energy" in asked and "rule" not in asked:
        out["rule"] = "energy"
    return out


# ---------------------------------------------------------------------------------------- device

#: Device types ``compress`` and ``sparsify`` run on: the SVDs need float64, which MPS lacks.
DEVICE_TYPES = ("cpu", "cuda")


def add_device_flag(parser: Any, command: str) -> None:
    """``--device DEV``: the torch device ``command`` moves the model to (see :func:`check_device`)."""
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEV",
        help=(
            f"torch device {command} runs on: cpu, cuda or cuda:N (default: cpu); the model, calibration "
            "and fine-tuning go there, every SVD/eigen step runs in float32/64 whatever the model's "
            "dtype, and OUT is written from CPU tensors; no CUDA: exit 2"
        ),
    )


def check_device(device: str, command: str) -> Any:
    """``device`` as a ``torch.device``, checked before any work: ``ValueError`` for a string torch
    does not know, a type other than cpu/cuda, or a device that is not there (no CUDA, ``cuda:N``
    past the last GPU), in the words of ``rmtprune train``'s check (one line, exit status 2).

    An absent GPU is an error, not a CPU fallback with a warning as in ``rmtprune analyze``: there
    the device only speeds up a read-only eigenvalue step whose result is the same on the CPU; here
    the model lives, is calibrated and fine-tuned on it, as in ``train``, and a silent fallback
    could turn a minutes-long GPU job into hours on the CPU.
    """
    import torch

    from ..training.setup import _check_device

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        _check_device(device)  # raises train's "is not a torch device" message
        raise
    if dev.type not in DEVICE_TYPES:
        raise ValueError(
            f"device={device!r}: {command} runs on {' or '.join(DEVICE_TYPES)} (cuda:N), "
            "its SVDs in float32/float64"
        )
    _check_device(device)
    return dev


# ---------------------------------------------------------------------------------------- threads

#: The environment variables OpenMP, OpenBLAS, MKL and torch read their thread counts from.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def add_threads_flag(parser: Any, default: str = "the libraries' own, one per core") -> None:
    """``--threads N``: the compute threads of numpy's BLAS and torch (see :func:`set_threads`)."""
    parser.add_argument(
        "--threads",
        type=_thread_count,
        metavar="N",
        default=None,
        help=f"compute threads for BLAS and torch; 0: the libraries' own, one per core (default: {default})",
    )


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count (0 or more)")
    return value


def set_threads(n: int | None) -> None:
    """Use ``n`` compute threads in numpy's BLAS and in torch (``None`` or 0: leave them as they are).

    The environment variables take effect for a library not imported yet (the CLI calls this from
    argv before any command module is imported); a BLAS already loaded is limited through
    ``threadpoolctl`` when it is installed (a dependency of scikit-learn), and torch, when
    imported, through ``torch.set_num_threads``.
    """
    import sys

    if not n:
        return
    import os

    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    if "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # numpy's BLAS keeps the count it started with
            pass
        else:
            threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
