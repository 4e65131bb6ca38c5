"""Exceptions that carry a user-facing, one-line message (the CLI prints them without a traceback)."""

from __future__ import annotations

__all__ = ["RmtpruneError", "CheckpointError", "InvalidWeightsError", "DistributedError", "first_line"]


class RmtpruneError(Exception):
    """A user error: bad input, bad file, bad argument. The message names the culprit."""


class CheckpointError(RmtpruneError, ValueError):
    """A checkpoint file that cannot be read: missing, truncated, not a checkpoint, unsafe pickle."""


class InvalidWeightsError(RmtpruneError, ValueError):
    """Weights that contain NaN or Inf (the layer is named in the message)."""


class DistributedError(RmtpruneError, RuntimeError):
    """A distributed run that cannot go on: a rank stopped, a collective timed out, ranks disagree."""


def first_line(exc: BaseException, limit: int = 1000, *, filename: bool = True) -> str:
    """The first line of ``exc``'s message, cut to ``limit`` characters (torch's C++ errors append a
    stack of frames, and a message must stay one line); an ``OSError`` gives its ``strerror`` and,
    with ``filename``, the file; an empty message gives the exception's type name."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f" {exc.filename!r}" if filename and exc.filename else "")
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
