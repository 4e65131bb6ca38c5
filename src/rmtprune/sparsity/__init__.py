"""Sparsification with RMT-guided budgets (Berlyand, Bourdais, Owhadi, Shmalo 2025; METHOD.md section 8).

For every prunable layer (the types of the layer registry :mod:`rmtprune.layers`, including the two
factors of a low-rank layer) with an accepted Marchenko-Pastur fit:

1. **Singular-vector sparsification** (:mod:`.vectors`): deep-bulk singular vectors lose most of
   their entries, spikes almost none; ``W' = U' S V'^T`` is recomposed.
2. **Magnitude pruning with an RMT budget** (:mod:`.budgets`), over ``n_cycles`` cycles whose
   global target ramps linearly to ``target``. ``signal`` (default) thresholds
   ``|w| * bulk_energy ** budget_power``, ``energy`` (METHOD.md's direction)
   ``|w| / bulk_energy ** budget_power``, ``noise`` ``|w| / sigma``; ``bulk`` gives each layer a
   sparsity proportional to ``bulk_fraction ** budget_power``; ``global`` and ``uniform`` are the
   plain magnitude-pruning baselines (no fit needed). Budgets are normalised so the global target,
   counted over all selected layers, is met exactly (up to ``max_layer_sparsity``).
3. **Regularised fine-tuning** (``l1``, ``l2``, optional ``group_lasso`` over rows) for
   ``cycle_steps`` steps after each cycle, with pruned entries frozen by masks; then
4. an optional **short fine-tune** (``finetune_epochs``) on data.

**With calibration** (``sparsify(model, config, calibration=...)``, a
:class:`rmtprune.calibration.Calibration` or batches of inputs) the within-layer score is Wanda's
``|W_ij| * ||X_j||_2`` per output row (:mod:`.scores`), and the pruning is one-shot without data.
The layerwise allocators (:mod:`.layerwise`) give each layer or transformer block a sparsity
around the target: ``owl`` (outlier ratio, arXiv:2310.05175), ``alphapruning`` (ESD heavy-tail
exponent, arXiv:2410.10912) and ``rmt`` (ours: the MP/BEMA fit's bulk energy); ``uniform`` with
Wanda's score is Wanda itself (arXiv:2306.11695).

Steps 3-4 run only when data is given. Layers without an accepted fit are left dense and
reported (under the fit-based budgets). A model that already carries masks is re-sparsified from
them: masks only grow. :func:`plan_sparsity` makes the decision (a :class:`SparsityPlan`) without
touching the model; :func:`sparsify` applies it.

Modules: :mod:`.config` (:class:`SparsifyConfig`), :mod:`.state` (layer selection and fits),
:mod:`.budgets`, :mod:`.layerwise` (OWL, AlphaPruning, RMT allocators), :mod:`.scores`
(magnitude and Wanda within a layer), :mod:`.vectors`, :mod:`.storage` (the sparse file format's
sizes, index bytes included), :mod:`.report`, :mod:`.core` (plan and apply).

References
----------
Berlyand, L., Bourdais, T., Owhadi, H. and Shmalo, Y. (2025). Pruning deep neural networks via a
combination of the Marchenko-Pastur distribution and regularization. arXiv:2503.01922.
"""

from __future__ import annotations

from typing import Any

from .budgets import (
    Budget,
    ProportionalBudget,
    ThresholdBudget,
    budget_names,
    make_budget,
    proportional_counts,
    register_budget,
    shifted_counts,
    threshold_counts,
)
from .config import SparsifyConfig
from .core import SparsityPlan, plan_sparsity, sparsify
from .layerwise import AlphaPruningBudget, LayerwiseBudget, OwlBudget, RmtBudget, block_of, esd_alpha
from .report import LayerSparsity, SparsifyReport
from .state import LayerState
from .vectors import singular_vector_thresholds, sparsify_singular_vectors

__all__ = [
    "BUDGETS",
    "SparsifyConfig",
    "LayerSparsity",
    "SparsifyReport",
    "SparsityPlan",
    "sparsify",
    "plan_sparsity",
    "Budget",
    "ThresholdBudget",
    "ProportionalBudget",
    "LayerState",
    "register_budget",
    "budget_names",
    "make_budget",
    "singular_vector_thresholds",
    "sparsify_singular_vectors",
    "proportional_counts",
    "shifted_counts",
    "threshold_counts",
    "LayerwiseBudget",
    "OwlBudget",
    "AlphaPruningBudget",
    "RmtBudget",
    "block_of",
    "esd_alpha",
]


def __getattr__(name: str) -> Any:
    if name == "BUDGETS":  # the registered budget names, computed so later registrations show
        return budget_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
