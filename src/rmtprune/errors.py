"""Exceptions that carry a user-facing, one-line message (the CLI prints them without a traceback)."""

from __future__ import annotations

__all__ = ["RmtpruneError", "CheckpointError", "InvalidWeightsError"]


class RmtpruneError(Exception):
    """A user error: bad input, bad file, bad argument. The message names the culprit."""


class CheckpointError(RmtpruneError, ValueError):
    """A checkpoint file that cannot be read: missing, truncated, not a checkpoint, unsafe pickle."""


class InvalidWeightsError(RmtpruneError, ValueError):
    """Weights that contain NaN or Inf (the layer is named in the message)."""
