"""The ``rmtprune`` command line: one subcommand per module in ``rmtprune.commands``.

Each command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``. User errors
(:class:`rmtprune.errors.RmtpruneError`, and ``ValueError``/``TypeError``/``OSError`` raised while
checking input) are printed as one line ``rmtprune: error: ...`` with exit status 2, no traceback;
a data-parallel rank that lost another (:class:`rmtprune.errors.DistributedError`) is one line with
exit status 1; Ctrl-C exits 130. See ``docs/security.md`` for what commands promise about files.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import DistributedError, RmtpruneError, first_line

__all__ = ["main", "build_parser", "COMMANDS"]

#: Subcommand name -> module under ``rmtprune.commands``.
COMMANDS: dict[str, str] = {
    "analyze": "analyze",
    "compress": "compress",
    "train": "train",
    "demo": "demo",
    "sparsify": "sparsify",
}


def _available_commands(only: str | None = None) -> dict[str, object]:
    mods = {}
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mods[name] = importlib.import_module(f"rmtprune.commands.{modname}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rmtprune.commands.{modname}":
                raise
    return mods


def _command_in(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word), or None: ``--help``/``--version`` first, no
    command, or an unknown word (the full parser then says what the commands are)."""
    for word in argv:
        if word == "--":
            return None
        if word.startswith("-"):
            if word in ("-h", "--help"):
                return None
            if word == "--version":
                return ""  # the top-level parser alone answers it
            continue
        return word if word in COMMANDS else None
    return None


#: ``--threads`` of a command when neither it nor ``OMP_NUM_THREADS`` & co. are given. ``analyze``
#: runs one BLAS thread: on MiniLM-L6 it was the fastest setting on a quiet 2-core machine and the
#: one that degraded least beside two busy processes (13 s vs 32-51 s wall; OpenBLAS threads spin
#: whatever OMP_WAIT_POLICY says), and its matrices are too small to gain from more
#: (benchmarks/results/analyze_start.md). ``--threads 0`` gives the libraries' own default.
DEFAULT_THREADS: dict[str, int] = {"analyze": 1}


def _threads_from_argv(argv: list[str], default: int | None = None) -> None:
    """``--threads N`` (or ``default`` when neither it nor a thread variable is set) sets the
    BLAS/OpenMP thread counts before numpy or torch is imported (the command parsers import
    numpy), where the environment variables still take effect."""
    from .commands._options import _THREAD_VARS, set_threads

    for i, word in enumerate(argv):
        value = None
        if word == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith("--threads="):
            value = word.split("=", 1)[1]
        if value is not None:
            if value.isdigit():
                set_threads(int(value))  # 0: the libraries' own
            return  # a bad value: the parser says so
    if default is not None and not any(v in os.environ for v in _THREAD_VARS):
        set_threads(default)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The top-level parser with every available subcommand registered (``only``: just that one).

    Building a subcommand's parser imports its module (and, for some, what its option tables
    come from), so :func:`main` builds only the command that argv names; the full parser is for
    ``--help`` and for argv without a command.
    """
    parser = _Parser(
        prog="rmtprune",
        description="Random-matrix analysis, compression and pruning of PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"rmtprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    mods = _available_commands(only)
    for mod in mods.values():
        mod.add_parser(sub)  # type: ignore[attr-defined]
    return parser, mods


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    # OpenMP threads that spin while waiting made a calibrated compress 10x slower on a busy
    # 2-core machine (218 s vs 20 s); passive waiting costs nothing measurable when it is idle.
    # Only effective before torch is first imported, which the commands do lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    _threads_from_argv(argv, DEFAULT_THREADS.get(command or ""))
    parser, mods = build_parser(command)
    args = parser.parse_args(argv)
    args._argv = tuple(argv)  # what was asked, for a command that starts copies of itself (train --nproc)
    mod = mods[args.command]
    try:
        return int(mod.run(args) or 0)  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        print("rmtprune: interrupted", file=sys.stderr)
        return 130
    except DistributedError as exc:  # not bad input: another rank stopped, or a collective timed out
        print(f"rmtprune: error: {first_line(exc)}", file=sys.stderr)
        return 1
    except (RmtpruneError, ValueError, TypeError, OSError) as exc:
        print(f"rmtprune: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise  # a bug: keep the traceback
        print(f"rmtprune: error: out of memory: {first_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
