"""Deprecated (one release): the weights-file readers moved to :mod:`rmtprune.weights_file` and the
analysis to :mod:`rmtprune.weights_analysis` ("checkpoint" now means only a training checkpoint).

Every name the old module had, public or private, is still found here, from its new module.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import _safetensors_reader, _tensor_source, _torch_reader, weights_analysis, weights_file
from .weights_analysis import (
    IGNORE_REASONS,
    CheckpointAnalysis,
    IgnoredTensor,
    analyze_checkpoint,
)
from .weights_file import TensorInfo, iter_tensors, list_tensors

warnings.warn(
    "rmtprune.checkpoint is deprecated; use rmtprune.weights_file (list_tensors, iter_tensors) and "
    "rmtprune.weights_analysis (analyze_file, FileAnalysis)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "TensorInfo",
    "IgnoredTensor",
    "CheckpointAnalysis",
    "list_tensors",
    "iter_tensors",
    "analyze_checkpoint",
    "IGNORE_REASONS",
]

_MODULES = (weights_analysis, weights_file, _safetensors_reader, _torch_reader, _tensor_source)


def __getattr__(name: str) -> Any:
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'rmtprune.checkpoint' has no attribute {name!r}")
