"""rmtprune: compress and regularise PyTorch networks with random matrix theory.

Every weight matrix is split into signal (singular values above a fitted Marchenko-Pastur bulk)
and noise (the bulk); the noise is cut as low-rank factors or as sparsity. The pipeline is
**analyze** (spectra and BEMA fits) -> **plan** (a serializable per-layer decision) -> **apply**
(module surgery); :func:`compress` is plan + apply.

Heavy submodules are imported lazily, so ``import rmtprune`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    # spectral engine (numpy only)
    "SpectrumFit": "rmtprune.spectral",
    "fit_bulk": "rmtprune.spectral",
    "MarchenkoPastur": "rmtprune.spectral",
    "tw1_quantile": "rmtprune.spectral",
    "RankDecision": "rmtprune.spectral",
    "make_rule": "rmtprune.spectral",
    "register_rule": "rmtprune.spectral",
    # analysis of tensors and checkpoints
    "analyze_matrix": "rmtprune.analysis",
    "analyze_tensor": "rmtprune.analysis",
    "LayerAnalysis": "rmtprune.analysis",
    "analyze": "rmtprune.analysis",
    "ModelAnalysis": "rmtprune.analysis",
    # the layer registry
    "LayerHandler": "rmtprune.layers",
    "register_handler": "rmtprune.layers",
    "handler_for": "rmtprune.layers",
    "analyze_file": "rmtprune.weights_analysis",
    "analyze_checkpoint": "rmtprune.weights_analysis",
    # data and reference models
    "load_dataset": "rmtprune.zoo.data",
    "seed_everything": "rmtprune.zoo.data",
    "build_model": "rmtprune.zoo.models",
    "count_parameters": "rmtprune.zoo.models",
    # compression
    "CompressionConfig": "rmtprune.config",
    "FitConfig": "rmtprune.config",
    "Plan": "rmtprune.plan_record",
    "LayerPlan": "rmtprune.plan_record",
    "plan": "rmtprune.surgery",
    "apply": "rmtprune.surgery",
    "apply_sequential": "rmtprune.surgery",
    "compress": "rmtprune.surgery",
    "densify": "rmtprune.surgery",
    "is_compressed": "rmtprune.surgery",
    "LowRankLinear": "rmtprune.lowrank",
    "LowRankConv1d": "rmtprune.lowrank",
    "LowRankConv2d": "rmtprune.lowrank",
    "save": "rmtprune.hf",
    "load": "rmtprune.hf",
    # training
    "RMTPruner": "rmtprune.training",
    "TrainConfig": "rmtprune.training",
    "train": "rmtprune.training",
    # sparsification
    "SparsifyConfig": "rmtprune.sparsity",
    "sparsify": "rmtprune.sparsity",
    "plan_sparsity": "rmtprune.sparsity",
    "SparsifyReport": "rmtprune.sparsity",
    "SparsityPlan": "rmtprune.sparsity",
    "register_budget": "rmtprune.sparsity",
    "remove_masks": "rmtprune.masks",
    "is_sparsified": "rmtprune.masks",
}

__all__ = ["__version__", *_LAZY]


class _Package(types.ModuleType):
    """The package module: a submodule import never replaces a public function of the same name.

    Python's import system binds ``rmtprune.X`` to the submodule ``rmtprune/X.py`` when that is
    imported; for a public function ``X`` (``rmtprune.sparsify``) that silently turned the function
    into a module (``TypeError: 'module' object is not callable``). Here the binding is refused, so
    the function stays reachable while ``import rmtprune.X`` still works through ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rmtprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
