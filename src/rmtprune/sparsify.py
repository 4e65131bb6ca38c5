"""Deprecated: the sparsification code lives in the package :mod:`rmtprune.sparsity`.

This module re-exports its public names for one release. The public function is
:func:`rmtprune.sparsify`; a module of the same name shadowed it (``rmtprune.SparsifyConfig(...)``
then ``rmtprune.sparsify(model, cfg)`` raised ``TypeError: 'module' object is not callable``).
"""

from __future__ import annotations

import warnings

from .sparsity import (  # noqa: F401
    LayerSparsity,
    SparsifyConfig,
    SparsifyReport,
    SparsityPlan,
    plan_sparsity,
    proportional_counts,
    singular_vector_thresholds,
    sparsify,
    sparsify_singular_vectors,
    threshold_counts,
)
from .sparsity.budgets import budget_names as _budget_names

warnings.warn(
    "rmtprune.sparsify (the module) is deprecated; import from rmtprune.sparsity "
    "(or use rmtprune.sparsify, the function)",
    DeprecationWarning,
    stacklevel=2,
)

#: The registered budget names (as of import; :func:`rmtprune.sparsity.budget_names` stays current).
BUDGETS = _budget_names()

__all__ = [
    "BUDGETS",
    "SparsifyConfig",
    "LayerSparsity",
    "SparsifyReport",
    "SparsityPlan",
    "sparsify",
    "plan_sparsity",
    "singular_vector_thresholds",
    "sparsify_singular_vectors",
    "proportional_counts",
    "threshold_counts",
]
