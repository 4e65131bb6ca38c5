"""The sparsify config: every constant of :func:`rmtprune.sparsify`, checked once, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .._format import dumps
from .._validate import check_bool, check_choice, check_int, check_number, check_patterns, from_dict
from ..config import DEFAULT_NOISE, FitConfig
from ..finetune import SCHEDULES
from ..spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX, NOISE_MODELS
from .budgets import budget_names
from .layerwise import ALLOCATIONS, ALPHA_FITS, DEFAULT_RMT_METRIC, RMT_METRICS
from .scores import SCORES
from .storage import FORMATS

__all__ = ["SparsifyConfig", "STORAGE"]

#: Sparse storage formats of :mod:`rmtprune.sparse_format` (``auto`` picks the smaller).
STORAGE = FORMATS
_INF = math.inf


def _meta(help_text: str) -> dict[str, str]:
    return {"help": help_text}


@dataclass
class SparsifyConfig:
    """Every constant of :func:`sparsify`, with the paper's values as defaults where it gives them.

    ``theta`` is in units of ``1 / sqrt(dim)``, the typical entry size of a unit singular vector
    of length ``dim``; a threshold of ``theta / sqrt(dim)`` then means the same thing for a
    64-wide and a 4096-wide layer. ``theta = 1`` zeroes about 68% of the entries of a deep-bulk
    singular vector (Gaussian-like entries below one standard deviation) and, through the floor
    ``c_min = 1/750``, about 0.1% of those of a spike.

    ``score`` is the within-layer score (:mod:`~rmtprune.sparsity.scores`): ``wanda`` (``|W_ij| *
    ||X_j||_2`` per output row, needs ``calibration=``) or ``magnitude``; ``auto`` picks ``wanda``
    when calibration is given. The layerwise budgets (``owl``, ``alphapruning``, ``rmt``,
    :mod:`~rmtprune.sparsity.layerwise`) read ``budget_range`` (their band around the target;
    ``None``: each one's default, 0.08, 0.3 and 0.2), ``allocation`` (per transformer block or per
    layer), and their own ``outlier_m``, ``alpha_fit``, ``rmt_metric``.

    ``protect_last`` keeps the output layer (:func:`rmtprune.layers.output_layer`, the same rule
    as :class:`~rmtprune.config.CompressionConfig.protect_last`) dense. It is off by default,
    unlike compression's: magnitude pruning of a head removes its smallest entries, not whole
    directions, and the committed sparsify benchmarks prune the head with the rest.
    """

    target: float = field(default=0.5, metadata=_meta("global sparsity over the selected layers, in [0, 1)"))
    budget: str = field(default="signal", metadata=_meta(f"per-layer budget rule, one of {budget_names()}"))
    n_cycles: int = field(default=3, metadata=_meta("pruning cycles; cycle c targets target * c / n_cycles"))
    max_layer_sparsity: float = field(
        default=0.95, metadata=_meta("cap on any one layer's sparsity (every budget but global)")
    )
    budget_power: float = field(
        default=1.0,
        metadata=_meta(
            "strength p of the energy (|w| / bulk_energy**p), signal (|w| * bulk_energy**p) and bulk budgets"
        ),
    )
    score: str = field(
        default="auto",
        metadata=_meta(f"within-layer score, one of {SCORES} (auto: wanda with calibration, else magnitude)"),
    )
    budget_range: float | None = field(
        default=None,
        metadata=_meta(
            "band of the layerwise budgets around the target (owl: +-lam, alphapruning: t*(1+-eps), "
            "rmt: +-eps); None: each budget's default (0.08, 0.3, 0.2)"
        ),
    )
    allocation: str = field(
        default="auto",
        metadata=_meta(
            f"layerwise budgets: a sparsity per block or layer, one of {ALLOCATIONS} (auto: the budget's)"
        ),
    )
    rmt_metric: str = field(
        default=DEFAULT_RMT_METRIC, metadata=_meta(f"rmt budget: the fit's metric, one of {RMT_METRICS}")
    )
    outlier_m: float = field(
        default=5.0, metadata=_meta("owl budget: outliers are scores above M x the mean")
    )
    alpha_fit: str = field(
        default="peak",
        metadata=_meta(f"alphapruning budget: ESD exponent estimator, one of {ALPHA_FITS}"),
    )
    refit: bool = field(default=False, metadata=_meta("refit the MP bulk before every cycle (else once)"))
    sv_sparsify: bool = field(default=True, metadata=_meta("step 1: sparsify singular vectors and recompose"))
    theta: float = field(default=1.0, metadata=_meta("singular-vector threshold scale, units of 1/sqrt(dim)"))
    c_min: float = field(default=1.0 / 750.0, metadata=_meta("floor of the threshold factor (paper: 1/750)"))
    q: float = field(default=30.0, metadata=_meta("exponent of (1 - s/s_plus)_+ (paper: 30)"))
    alpha: float = field(default=DEFAULT_ALPHA, metadata=_meta("BEMA trim fraction"))
    beta: float = field(default=DEFAULT_BETA, metadata=_meta("Tracy-Widom level of the edge"))
    ks_max: float = field(
        default=DEFAULT_KS_MAX, metadata=_meta("gate: KS misfit tolerated (the size term is added)")
    )
    noise: str = field(
        default=DEFAULT_NOISE, metadata=_meta(f"noise model of the edge, one of {', '.join(NOISE_MODELS)}")
    )
    include: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "layer-name patterns (glob, exact name or suffix; a factor matches its parent); [] = all"
        ),
    )
    exclude: list[str] = field(default_factory=list, metadata=_meta("layer-name patterns never pruned"))
    protect_last: bool = field(
        default=False, metadata=_meta("keep the output layer (a classifier's logits) dense")
    )
    cycle_steps: int = field(
        default=100, metadata=_meta("regularised fine-tuning steps per cycle (with data)")
    )
    l1: float = field(default=1e-6, metadata=_meta("L1 weight of the regulariser (papers: 1e-6..5e-6)"))
    l2: float = field(default=1e-6, metadata=_meta("L2 weight of the regulariser (papers: 1e-6..5e-6)"))
    group_lasso: float = field(default=0.0, metadata=_meta("group-lasso weight over weight rows"))
    finetune_epochs: float = field(default=1.0, metadata=_meta("final short fine-tune on data, in epochs"))
    lr: float = field(default=1e-4, metadata=_meta("Adam learning rate of both fine-tunes"))
    schedule: str = field(
        default="cosine", metadata=_meta(f"learning-rate schedule of every fine-tune, one of {SCHEDULES}")
    )
    warmup: float = field(
        default=0.05, metadata=_meta("linear learning-rate warmup, as a fraction of each fine-tune's steps")
    )
    storage: str = field(
        default="auto",
        metadata=_meta(
            f"sparse storage format of the pruned weights, one of {STORAGE} (auto: the smaller of bitmask "
            "and CSR per layer); OUT is written in it (rmtprune.io.save(..., storage=)) and the report's "
            "stored bytes are counted in it"
        ),
    )

    def __post_init__(self) -> None:
        self.target = check_number("target", self.target, 0.0, 1.0, hi_open=True)
        check_choice("budget", self.budget, budget_names())
        self.n_cycles = check_int("n_cycles", self.n_cycles, 1, 1000)
        self.max_layer_sparsity = check_number("max_layer_sparsity", self.max_layer_sparsity, 0.0, 1.0)
        self.budget_power = check_number("budget_power", self.budget_power, 0.0, _INF, hi_open=True)
        check_choice("score", self.score, SCORES)
        if self.budget_range is not None:
            self.budget_range = check_number("budget_range", self.budget_range, 0.0, 1.0)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("rmt_metric", self.rmt_metric, RMT_METRICS)
        self.outlier_m = check_number("outlier_m", self.outlier_m, 0.0, _INF, lo_open=True, hi_open=True)
        check_choice("alpha_fit", self.alpha_fit, ALPHA_FITS)
        for name in ("refit", "sv_sparsify", "protect_last"):
            check_bool(name, getattr(self, name))
        self.theta = check_number("theta", self.theta, 0.0, _INF, hi_open=True)
        self.c_min = check_number("c_min", self.c_min, 0.0, 1.0)
        self.q = check_number("q", self.q, 0.0, _INF, lo_open=True, hi_open=True)
        fit = FitConfig(self.alpha, self.beta, self.ks_max, self.noise)
        self.alpha, self.beta, self.ks_max = fit.alpha, fit.beta, fit.ks_max
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)
        self.cycle_steps = check_int("cycle_steps", self.cycle_steps, 0, 10**7)
        for name in ("l1", "l2", "group_lasso"):
            setattr(self, name, check_number(name, getattr(self, name), 0.0, _INF, hi_open=True))
        # bounded run time
        self.finetune_epochs = check_number("finetune_epochs", self.finetune_epochs, 0.0, 1e4)
        self.lr = check_number("lr", self.lr, 0.0, _INF, lo_open=True, hi_open=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        self.warmup = check_number("warmup", self.warmup, 0.0, 1.0, hi_open=True)
        check_choice("storage", self.storage, STORAGE)

    @property
    def fit(self) -> FitConfig:
        """The fit parameters (``alpha``, ``beta``, ``ks_max``) as a :class:`~rmtprune.config.FitConfig`."""
        return FitConfig(self.alpha, self.beta, self.ks_max, self.noise)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsifyConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError`` naming them."""
        return from_dict(cls, data, "SparsifyConfig")

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SparsifyConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
