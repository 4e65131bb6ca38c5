"""Sparsification with RMT-guided budgets: :func:`plan_sparsity` decides, :func:`sparsify` applies.

The pipeline, top to bottom:

1. **Select and analyze** (:func:`plan_sparsity`): the layers from the layer registry, filtered by
   ``include``/``exclude`` (:func:`~rmtprune.sparsity.state.select_layers`), each layer's input
   norms ``||X_j||_2`` from ``calibration=`` for Wanda's score, fitted by :func:`rmtprune.analyze`
   where the budget or step 1 needs a fit or a spectrum; the budget's counts at the final target
   give a :class:`SparsityPlan` (per layer: count, verdict, reason), the model untouched.
2. **Apply** (:func:`sparsify`): singular-vector sparsification (:mod:`~rmtprune.sparsity.vectors`)
   on the plan's fits, then ``n_cycles`` cycles of pruning whose target ramps linearly to
   ``target`` (counts from the budget, :mod:`~rmtprune.sparsity.budgets` and
   :mod:`~rmtprune.sparsity.layerwise`; entries by the score, :mod:`~rmtprune.sparsity.scores`),
   each followed by a regularised fine-tune when data is given, and a final short fine-tune. With
   Wanda's score and no data the pruning is one-shot: one cycle at the target.

References
----------
Berlyand, L., Bourdais, T., Owhadi, H. and Shmalo, Y. (2025). Pruning deep neural networks via a
combination of the Marchenko-Pastur distribution and regularization. arXiv:2503.01922.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration import Calibration, collect
from ..finetune import check_lr, evaluate, finetune
from ..masks import count_nonzeros, get_mask, masks_of, remove_masks, restore_masks, set_mask
from .budgets import Budget, allocate, make_budget
from .config import SparsifyConfig
from .report import LayerSparsity, SparsifyReport, dense_warning, layer_record, storage_totals
from .scores import as_matrix, layer_mask, magnitude_keep
from .state import LayerState, check_finite, fit_layers, select_layers
from .vectors import sv_step

__all__ = ["SparsityPlan", "plan_sparsity", "sparsify"]


@dataclass
class SparsityPlan:
    """The decision of :func:`plan_sparsity`: per layer, how many entries the final target prunes.

    ``layers`` are the report rows at the final target (fit, verdict, reason, planned nonzeros);
    ``counts`` the planned prune counts in the same order; ``warnings`` the selection warnings
    followed by what the plan cannot meet. :meth:`report` renders it as a dry-run
    :class:`SparsifyReport`; ``sparsify(model, plan)`` applies it (it must be the model the plan
    was made for, unchanged since).
    """

    config: SparsifyConfig
    layers: list[LayerSparsity]
    counts: list[int]
    wanted: int
    total_params: int
    selection_warnings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The within-layer score the plan resolved (``magnitude`` or ``wanda``).
    score: str = "magnitude"
    #: The report's byte fields at the plan (:func:`~rmtprune.sparsity.report.storage_totals`).
    storage_bytes: dict[str, Any] = field(default_factory=dict)
    _states: list[LayerState] = field(default_factory=list, repr=False, compare=False)
    _versions: list[int] = field(default_factory=list, repr=False, compare=False)

    dry_run = True

    @property
    def target(self) -> float:
        return self.config.target

    @property
    def budget(self) -> str:
        return self.config.budget

    @property
    def selected_params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def selected_nnz(self) -> int:
        return sum(r.nnz_after for r in self.layers)

    @property
    def achieved(self) -> float:
        """The planned global sparsity over the selected layers."""
        return 1 - self.selected_nnz / self.selected_params if self.selected_params else 0.0

    @property
    def stored_values(self) -> int:
        """Nonzero values the plan leaves (index bytes not counted; ``storage_bytes`` counts them)."""
        return self.total_params - sum(r.params - r.nnz_after for r in self.layers)

    def report(self) -> SparsifyReport:
        """The plan as a dry-run :class:`SparsifyReport` (what the CLI's ``--dry-run`` prints)."""
        return SparsifyReport(
            target=self.target,
            budget=self.budget,
            achieved=self.achieved,
            selected_params=self.selected_params,
            selected_nnz=self.selected_nnz,
            total_params=self.total_params,
            stored_values=self.stored_values,
            layers=self.layers,
            warnings=list(self.warnings),
            config=self.config.to_dict(),
            dry_run=True,
            score=self.score,
            storage=self.config.storage,
            **self.storage_bytes,
        )

    def table(self) -> str:
        """Per-layer table of the plan."""
        return self.report().table()

    def summary(self) -> str:
        """One line: budget, target and the planned sparsity."""
        return self.report().summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the dry-run report."""
        return self.report().to_dict()

    def to_json(self) -> str:
        """Indented JSON of the dry-run report."""
        return self.report().to_json()

    def to_markdown(self) -> str:
        """Markdown of the dry-run report."""
        return self.report().to_markdown()

    def check_fresh(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` is the model planned for, with unchanged weights."""
        modules = {id(m) for m in model.modules()}
        for layer, version in zip(self._states, self._versions, strict=True):
            if id(layer.module) not in modules:
                raise ValueError(f"the plan is for another model: layer {layer.name!r} is not in this one")
            if layer.module.weight._version != version:
                raise ValueError(f"the plan is stale: layer {layer.name!r} changed since plan_sparsity")


def _check_config(config: SparsifyConfig | None) -> SparsifyConfig:
    if config is None:
        return SparsifyConfig()
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    config.__post_init__()  # fields may have been changed after construction
    return config


def _score(config: SparsifyConfig, calibration: Any) -> str:
    """The within-layer score: ``config.score``, ``auto`` resolved by whether calibration is given."""
    if config.score == "auto":
        return "wanda" if calibration is not None else "magnitude"
    if config.score == "wanda" and calibration is None:
        raise ValueError("score='wanda' needs calibration= (a Calibration or batches of model inputs)")
    return config.score


def _attach_norms(model: nn.Module, layers: list[LayerState], calibration: Any, show: bool | None) -> None:
    """Give every prunable layer its ``||X_j||_2`` from ``calibration`` (collected here from batches)."""
    todo = [layer for layer in layers if not layer.protected]
    for layer in todo:
        if layer.factored_parent is not None:
            raise ValueError(
                f"score='wanda' cannot prune layer {layer.name!r}, a factor of low-rank layer "
                f"{layer.factored_parent!r} (calibration reads the inputs of whole layers): exclude it"
            )
    if not isinstance(calibration, Calibration):
        if isinstance(calibration, (str, bytes, nn.Module)) or not isinstance(calibration, Iterable):
            raise TypeError(
                "calibration must be a rmtprune.calibration.Calibration or an iterable of model inputs, "
                f"got {type(calibration).__name__}"
            )
        calibration = collect(model, calibration, layers=[x.name for x in todo], held_out=0.0, progress=show)
    for layer in todo:
        if layer.name not in calibration:
            raise ValueError(
                f"calibration has no statistics for layer {layer.name!r} ({len(calibration.names)} layers "
                "calibrated): collect them for every selected layer, or exclude it"
            )
        st = calibration[layer.name]
        n = int(as_matrix(layer, layer.module.weight).shape[1])
        if st.n != n or st.rows <= 0:
            raise ValueError(
                f"calibration statistics of layer {layer.name!r} are for {st.n} input features and "
                f"{st.rows} rows; the layer has {n} input features"
            )
        layer.act_norm = st.l2_norm.detach().to(device="cpu", dtype=torch.float64)


def _prepare(
    model: nn.Module, config: SparsifyConfig, budget: Budget, show: bool | None, calibration: Any = None
) -> tuple[list[LayerState], list[str]]:
    """Selected layers with their scores' data and fits (where the budget or step 1 needs one), and
    the selection warnings."""
    layers, skipped, unmatched = select_layers(model, config.include, config.exclude, config.protect_last)
    if not layers:
        raise ValueError(
            f"no prunable layer selected by include={config.include} exclude={config.exclude}"
            + (f"; {skipped[0]}" if skipped else "")
        )
    check_finite(layers)
    score = _score(config, calibration)
    for layer in layers:
        layer.nnz_before = layer.numel - layer.pruned
        layer.score = score
    if score == "wanda":
        _attach_norms(model, layers, calibration, show)
    if budget.needs_fit or budget.needs_spectrum or config.sv_sparsify:
        fit_layers(model, layers, config.fit, show)
    return layers, skipped + unmatched


def plan_sparsity(
    model: nn.Module,
    config: SparsifyConfig | None = None,
    show: bool | None = None,
    *,
    calibration: Calibration | Iterable[Any] | None = None,
) -> SparsityPlan:
    """Fits and per-layer budgets at the final target on the current weights; the model is untouched.

    Step 1 (which changes magnitudes slightly) and fine-tuning are not run, so the counts of the
    real run can differ a little under the ``noise`` and ``global`` budgets. ``calibration`` (a
    :class:`rmtprune.calibration.Calibration`, or batches of model inputs collected here with
    :func:`rmtprune.calibration.collect`) gives Wanda's score (``config.score``).
    """
    config = _check_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget = make_budget(config.budget, config)
    layers, select_warnings = _prepare(model, config, budget, show, calibration)
    counts, wanted = allocate(layers, budget, config.max_layer_sparsity, config.target)
    records = [
        layer_record(layer, planned=k, storage=config.storage)
        for layer, k in zip(layers, counts, strict=True)
    ]
    kept: dict[str, Any] = dict(masks_of(model))
    for layer, k in zip(layers, counts, strict=True):
        if k or layer.mask is not None:  # _cycle leaves a layer with nothing to prune unmasked
            kept[f"{layer.name}.weight" if layer.name else "weight"] = layer.numel - k
    sizes, size_warnings = storage_totals(model, kept, config.storage)
    warnings = select_warnings + dense_warning(layers, records, budget.needs_fit) + size_warnings
    pruned = sum(counts)
    if pruned != wanted:
        warnings.insert(
            0, f"target={config.target:.4f} asks for {wanted:,} pruned weights, plan reaches {pruned:,}"
        )
    return SparsityPlan(
        config=config,
        layers=records,
        counts=counts,
        wanted=wanted,
        total_params=count_nonzeros(model)["total"],
        selection_warnings=select_warnings,
        warnings=warnings,
        score=layers[0].score,
        storage_bytes=sizes,
        _states=layers,
        _versions=[layer.module.weight._version for layer in layers],
    )


def sparsify(
    model: nn.Module,
    config: SparsifyConfig | SparsityPlan | None = None,
    *,
    data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    show_progress: bool | None = None,
    calibration: Calibration | Iterable[Any] | None = None,
) -> tuple[nn.Module, SparsifyReport]:
    """Sparsify ``model`` in place (and return it) with RMT-guided budgets: plan, then apply.

    Parameters
    ----------
    model : any ``nn.Module``; the weights of its registered layer types (:mod:`rmtprune.layers`;
        factors of low-rank layers included) selected by ``config.include``/``exclude`` are pruned.
    config : :class:`SparsifyConfig` (defaults if None), or a :class:`SparsityPlan` of this model
        from :func:`plan_sparsity` (its fits are reused).
    data : re-iterable of ``(inputs, targets)`` training batches (or a zero-argument callable
        returning one); enables the regularised fine-tuning per cycle and the final fine-tune.
    loss_fn : ``loss(outputs, targets)``, default cross-entropy.
    eval_data : batches to measure loss/top-1 accuracy on before, after each cycle and at the end.
    calibration : a :class:`rmtprune.calibration.Calibration` of the selected layers, or batches of
        model inputs (collected with :func:`rmtprune.calibration.collect`): the within-layer score
        becomes Wanda's ``|W_ij| * ||X_j||_2`` per output row (``config.score="auto"``). Without
        ``data`` the run is one-shot (one cycle at the target, exactly the target's count).
        Ignored when ``config`` is a plan (the plan holds its own).

    Returns
    -------
    ``(model, report)``. Pruned entries are zero and each pruned layer carries a boolean mask
    buffer (:mod:`rmtprune.masks`). On any error the model's weights and masks are restored.
    """
    plan = config if isinstance(config, SparsityPlan) else None
    config = plan.config if plan is not None else _check_config(config)  # type: ignore[union-attr]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if plan is not None:
        _check_config(config)
        plan.check_fresh(model)
    if data is not None and (config.cycle_steps > 0 or config.finetune_epochs > 0):
        check_lr(config.lr, model.parameters())  # before any work: lr=1e308 overflows float32 weights
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old_masks = {k: v.clone() for k, v in masks_of(model).items()}
    try:
        if plan is None:
            plan = plan_sparsity(model, config, show=show_progress, calibration=calibration)
        return _apply(model, plan, data, loss_fn, eval_data, show_progress)
    except BaseException:
        with torch.no_grad():
            model.load_state_dict(snapshot)
        remove_masks(model)
        restore_masks(model, old_masks)
        raise


def _cycle(
    model: nn.Module, layers: list[LayerState], budget: Budget, config: SparsifyConfig, c: int, run: dict
) -> tuple[dict[str, Any], int]:
    """Cycle ``c``: refit if asked, prune to ``target * c / n_cycles``, fine-tune and evaluate."""
    t = config.target * c / run["n_cycles"]
    if config.refit and c > 1:
        fit_layers(model, layers, config.fit, show=False)
    counts, wanted = allocate(layers, budget, config.max_layer_sparsity, t)
    for layer, k in zip(layers, counts, strict=True):
        old = get_mask(layer.module)
        if k == 0 and old is None:
            continue
        if layer.score == "magnitude":
            set_mask(layer.module, _magnitude_mask(layer.module.weight, old, k))
        else:
            set_mask(layer.module, layer_mask(layer, old, k, layer.score))
    record: dict[str, Any] = {"cycle": c, "target": t, "achieved": _achieved(layers), "finetune": None}
    if run["data"] is not None and config.cycle_steps > 0:
        ft = finetune(
            model,
            run["data"],
            steps=config.cycle_steps,
            lr=config.lr,
            l1=config.l1,
            l2=config.l2,
            group_lasso=config.group_lasso,
            loss_fn=run["loss_fn"],
            schedule=config.schedule,
            warmup=config.warmup,
        )
        record["finetune"] = ft.to_dict()
    record["eval"] = _evaluate(model, run)
    return record, wanted


def _evaluate(model: nn.Module, run: dict) -> dict[str, float] | None:
    return evaluate(model, run["eval_data"], run["loss_fn"]) if run["eval_data"] is not None else None


def _apply(
    model: nn.Module, plan: SparsityPlan, data: Any, loss_fn: Any, eval_data: Any, show: bool | None
) -> tuple[nn.Module, SparsifyReport]:
    """Step 1 on the plan's fits, the pruning cycles, the final fine-tune, and the report."""
    config, layers = plan.config, plan._states
    budget = make_budget(config.budget, config)
    one_shot = plan.score == "wanda" and data is None  # nothing between cycles would change the scores
    run = {
        "data": data,
        "loss_fn": loss_fn,
        "eval_data": eval_data,
        "n_cycles": 1 if one_shot else config.n_cycles,
    }
    eval_before = _evaluate(model, run)
    if config.sv_sparsify:
        sv_step(layers, config, show)
    cycles, wanted = [], 0
    for c in range(1, run["n_cycles"] + 1):
        record, wanted = _cycle(model, layers, budget, config, c, run)
        cycles.append(record)
    final = None
    if data is not None and config.finetune_epochs > 0:
        final = finetune(
            model,
            data,
            epochs=config.finetune_epochs,
            lr=config.lr,
            loss_fn=loss_fn,
            schedule=config.schedule,
            warmup=config.warmup,
        ).to_dict()
    report = _report(model, layers, config, budget, wanted)
    report.score = plan.score
    report.warnings = plan.selection_warnings + report.warnings
    report.cycles = cycles
    report.final_finetune = final
    report.eval_before = eval_before
    report.eval_after = _evaluate(model, run)
    return model, report


def _report(
    model: nn.Module, layers: list[LayerState], config: SparsifyConfig, budget: Budget, wanted: int
) -> SparsifyReport:
    """The report of a finished run: the layers as they are now, against the target's count."""
    records = [layer_record(layer, storage=config.storage) for layer in layers]
    selected = sum(r.params for r in records)
    nnz = sum(r.nnz_after for r in records)
    counts = count_nonzeros(model)
    warnings = []
    achieved_count = selected - nnz
    if achieved_count != wanted:
        warnings.append(
            f"target={config.target:.4f} asks for {wanted:,} pruned weights, got {achieved_count:,} "
            f"({achieved_count / max(selected, 1):.2%}): "
            + (
                "the model was already sparser (masks only grow)"
                if achieved_count > wanted
                else "layers left dense or capped at max_layer_sparsity cannot absorb the rest"
            )
        )
    sizes, size_warnings = storage_totals(model, masks_of(model), config.storage)
    return SparsifyReport(
        target=config.target,
        budget=config.budget,
        achieved=achieved_count / selected if selected else 0.0,
        selected_params=selected,
        selected_nnz=nnz,
        total_params=counts["total"],
        stored_values=counts["stored"],
        layers=records,
        warnings=warnings + dense_warning(layers, records, budget.needs_fit) + size_warnings,
        config=config.to_dict(),
        dry_run=False,
        storage=config.storage,
        **sizes,
    )


def _achieved(layers: list[LayerState]) -> float:
    total = sum(layer.numel for layer in layers)
    return sum(layer.pruned for layer in layers) / total if total else 0.0


def _magnitude_mask(weight: torch.Tensor, old: torch.Tensor | None, k: int) -> torch.Tensor:
    """Mask keeping all but the ``k`` smallest ``|w|`` (already-pruned entries go first)."""
    return magnitude_keep(weight, old, k)
