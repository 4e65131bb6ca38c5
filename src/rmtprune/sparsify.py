"""Deprecated: the sparsification code lives in the package :mod:`rmtprune.sparsity`.

This module re-exports its public names for one release. The public function is
:func:`rmtprune.sparsify`; a module of the same name shadowed it (``rmtprune.SparsifyConfig(...)``
then ``rmtprune.sparsify(model, cfg)`` raised ``TypeError: 'module' object is not callable``).
"""

from __future__ import annotations

import warnings

from . import sparsity as _sparsity
from .sparsity import *  # noqa: F403

warnings.warn(
    "rmtprune.sparsify (the module) is deprecated; import from rmtprune.sparsity "
    "(or use rmtprune.sparsify, the function)",
    DeprecationWarning,
    stacklevel=2,
)

#: The registered budget names (as of import; :func:`rmtprune.sparsity.budget_names` stays current).
BUDGETS = _sparsity.budget_names()

__all__ = list(_sparsity.__all__)

# ``import rmtprune.sparsify as sp`` binds ``sp`` to the *function* ``rmtprune.sparsify`` (the package
# never lets a submodule replace a public function), so the old ``sp.SparsifyConfig`` /
# ``sp.plan_sparsity`` would fail: for this last release the function carries the module's public
# names too. They are set only once this deprecated module is imported.
for _name in __all__:
    if _name != "sparsify":
        setattr(_sparsity.sparsify, _name, getattr(_sparsity, _name))
_sparsity.sparsify.BUDGETS = BUDGETS
