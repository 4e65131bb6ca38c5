"""The compression config: which rank rule, its parameters, which layers, and per-layer overrides.

A small dataclass checked in ``__post_init__`` with a JSON round trip (:meth:`to_json` /
:meth:`from_json`). The rank rule's parameters are checked by the rule itself
(:attr:`~rmtprune.spectral.RankRule.parameters`): a field a rule reads (``energy``, ``ratio``...)
is checked by that rule's check, and :meth:`make_rule` asks the registered rule class to build
itself from the config, so a rule added with :func:`~rmtprune.spectral.register_rule` needs no
change here (its own parameters go in ``rule_params``). :func:`rmtprune.plan` resolves it per layer
with :meth:`for_layer`: the ``overrides`` whose pattern matches the layer name are applied in order,
later ones winning.

Layer patterns are shell-style globs matched against the dotted module name (``"features.*"``,
``"*.fc?"``); a pattern without a wildcard also matches a name ending in ``"." + pattern``, so
``"fc1"`` matches both ``fc1`` and ``encoder.fc1``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._validate import check_bool, check_choice, check_int, check_number, check_patterns, from_dict
from .spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX, NOISE_MODELS, RULES, get_rule
from .spectral.rules import RankRule, check_alpha, check_beta

__all__ = [
    "CompressionConfig",
    "FitConfig",
    "match_pattern",
    "unmatched_patterns",
    "OVERRIDABLE",
    "ALLOCATIONS",
    "DEFAULT_NOISE",
]

#: The noise model of the fits by default (``rmtprune.spectral.fit_matrix``). ``mp`` (the Tracy-Widom edge
#: of METHOD.md section 3) keeps every published result reproducible; ``auto`` switches a layer whose
#: entries fail the tail test to the heavy-tailed (resampled Student-t null) edge. See docs/spectral.md.
DEFAULT_NOISE = "mp"

#: How :func:`rmtprune.compress` spreads a ``target`` budget over layers (:mod:`rmtprune.allocation`).
ALLOCATIONS = ("rmt", "uniform", "energy", "gavish_donoho", "spikes")

#: Fields a per-layer override may set (everything but the layer selection itself).
OVERRIDABLE = (
    "rule",
    "keep_bulk",
    "alpha",
    "beta",
    "ks_max",
    "noise",
    "min_rank",
    "energy",
    "ratio",
    "rank",
    "sigma",
    "rule_params",
    "factor_only_if_smaller",
    "dense_truncate",
    "svd_dtype",
)

_SVD_DTYPES = ("float64", "float32")


def match_pattern(name: str, pattern: str) -> bool:
    """Whether the dotted layer ``name`` matches ``pattern`` (glob, or exact name / name suffix)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    return fnmatch.fnmatchcase(name, pattern)


def unmatched_patterns(names: list[str], what: str, **patterns: list[str]) -> list[str]:
    """One message per pattern that matches none of ``names``, in the order given.

    ``patterns`` maps a kind (``include``, ``exclude``, ``override``) to its patterns; the message is
    ``"<kind> pattern '<p>' matches no <what>"``.
    """
    return [
        f"{kind} pattern {p!r} matches no {what}"
        for kind, pats in patterns.items()
        for p in pats
        if not any(match_pattern(n, p) for n in names)
    ]


@dataclass(frozen=True)
class FitConfig:
    """The parameters of a BEMA bulk fit and its gate, shared by every config and analysis function.

    alpha : BEMA trim fraction in (0, 0.5) (METHOD.md section 3).
    beta : Tracy-Widom level of the edge, in [0.01, 0.99].
    ks_max : the misfit tolerance of the gate: a fit is refused (``no-mp-bulk``) when its bulk's KS
        distance to its MP law exceeds ``max(ks_max, q)``, ``q`` the 99% quantile of that distance on
        a true MP bulk of the same size (``rmtprune.spectral.gate``; above ``ks_max`` only for p < ~23).
        In [0, inf]; 0 is the pure 1% test, ``inf`` (or anything >= 1) turns the gate off.
    noise : the noise model of the edge: ``mp`` (Tracy-Widom edge of the MP law), ``resample``
        (heavy-tailed entries: the edge of simulated Student-t nulls matched to the entries' tail),
        ``gamma`` (BEMA's Gamma model, heteroscedastic columns) or ``auto`` (``resample`` when the tail
        test on the entries fires, else ``mp``). Factored layers are always fitted with ``mp``.
    """

    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    ks_max: float = DEFAULT_KS_MAX
    noise: str = DEFAULT_NOISE

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha("alpha", self.alpha))
        object.__setattr__(self, "beta", check_beta("beta", self.beta))
        object.__setattr__(self, "ks_max", check_number("ks_max", self.ks_max, 0.0, math.inf, allow_inf=True))
        check_choice("noise", self.noise, NOISE_MODELS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompressionConfig:
    """How to choose the rank of every prunable layer (METHOD.md sections 3-6).

    Attributes
    ----------
    rule : ``bema`` (spikes above the fitted MP edge, plus ``keep_bulk`` of the bulk),
        ``gavish_donoho`` (optimal hard threshold), ``energy`` (keep ``energy`` of sum(s**2)),
        ``fixed`` (``ratio`` of p, or an absolute ``rank``), or a rule added with
        :func:`~rmtprune.spectral.register_rule`.
    keep_bulk : fraction of the bulk kept by ``bema``, in [0, 1] (0: spikes only).
    alpha, beta : BEMA trim fraction and Tracy-Widom level.
    ks_max : the gate's misfit tolerance (see :class:`FitConfig`); a refused layer is kept (``bema`` only).
    noise : the noise model of the fit's edge (see :class:`FitConfig`).
    min_rank : never keep fewer than this many triplets (>= 1).
    energy : fraction for the ``energy`` rule.
    ratio, rank : for the ``fixed`` rule, exactly one of them.
    sigma : known noise level for ``gavish_donoho`` (None: unknown, median rule).
    rule_params : parameters of the rule that are not config fields (a registered rule's own),
        ``{parameter: value}``, checked by the rule.
    include, exclude : layer-name patterns; an empty ``include`` means every supported layer.
    overrides : pattern -> dict of fields from :data:`OVERRIDABLE`, applied in order.
    factor_only_if_smaller : factor only when ``k (m + n) < m n``.
    dense_truncate : when factoring would not save parameters, write the rank-k reconstruction back
        into the dense weight (True) or keep the layer as it is (False).
    svd_dtype : precision of the SVD, ``float64`` (default) or ``float32`` (faster on big layers;
        the fit always runs in float64).
    target : keep this fraction of the selected layers' parameters as stored (weights ``k (m + n)``
        when factored, ``m n`` dense, plus biases), in (0, 1]; the ranks are then chosen across
        layers by ``allocation`` and ``rule`` is not used. None: every layer by its own ``rule``.
    target_macs : the same budget on multiply-accumulates per sample instead (convolutions need an
        example input to count theirs). At most one of ``target`` and ``target_macs``.
    allocation : how a target is spread over layers: ``rmt`` (each direction's ``s_i / s_plus``
        against its own layer's noise edge; the generalized-MP edge when calibrated), ``uniform``,
        ``energy``, ``gavish_donoho``, ``spikes`` (see :mod:`rmtprune.allocation`).
    damping : with calibration data, the input covariance ``C`` is whitened as ``C + damping *
        mean(diag C) I`` (keeps the Cholesky factor invertible on unseen directions, and pulls the
        truncation towards plain SVD, which does not depend on the calibration domain). 0.1 was
        chosen on SmolLM2's validation text (docs/compression.md).
    guard : with calibration data, the largest relative output error ``||(W - W') x|| / ||W x||`` a
        layer may have on the calibration's held-out slice; a layer above it gets rank back (or stays
        dense) and the budget is rebalanced over the others, never exceeded. None (the default): no
        guard. 0.2 helped MiniLM-L6 at 60% and hurt a small ViT at 25-40% on their validation data
        (docs/compression.md), so it is opt-in. Data-free plans have nothing to measure it on and
        ignore it.
    sequential : with calibration data, apply the plan block after block, each block's layers
        truncated in the space whitened by the inputs the already-cut blocks give them
        (:mod:`rmtprune.sequential`); same ranks, new factors. Needs the calibration batches as a
        list; costs about ``blocks / 2`` calibration passes. Measured within noise of one-shot on
        MiniLM-L6 (docs/compression.md).
    protect_last : keep the model's last layer of a prunable type (in registration order: the
        logits layer of a classifier) uncut; it is still analysed and reported. The output-width guard of
        METHOD.md section 6: a 10-class head cut to rank 1 by a noisy fit destroys the classifier.
    """

    rule: str = field(default="bema", metadata={"help": "rank rule: bema, gavish_donoho, energy, fixed"})
    keep_bulk: float = field(default=0.0, metadata={"help": "fraction of the bulk kept (bema)"})
    alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "BEMA trim fraction in (0, 0.5)"})
    beta: float = field(default=DEFAULT_BETA, metadata={"help": "Tracy-Widom level in [0.01, 0.99]"})
    ks_max: float = field(
        default=DEFAULT_KS_MAX, metadata={"help": "gate: KS misfit tolerated (the size term is added)"}
    )
    noise: str = field(
        default=DEFAULT_NOISE, metadata={"help": f"noise model of the edge: {', '.join(NOISE_MODELS)}"}
    )
    min_rank: int = field(default=1, metadata={"help": "smallest rank kept (>= 1)"})
    energy: float = field(default=0.9, metadata={"help": "energy fraction kept (energy rule)"})
    ratio: float | None = field(default=None, metadata={"help": "rank ratio of p (fixed rule)"})
    rank: int | None = field(default=None, metadata={"help": "absolute rank (fixed rule)"})
    sigma: float | None = field(default=None, metadata={"help": "known noise level (gavish_donoho)"})
    rule_params: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "parameters of a registered rule that are not config fields"}
    )
    include: list[str] = field(default_factory=list, metadata={"help": "layer-name patterns to include"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "layer-name patterns to exclude"})
    overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "pattern -> {field: value}, later patterns win"}
    )
    factor_only_if_smaller: bool = field(default=True, metadata={"help": "factor only if k(m+n) < mn"})
    dense_truncate: bool = field(
        default=False, metadata={"help": "write the rank-k weight back when factoring does not pay"}
    )
    svd_dtype: str = field(default="float64", metadata={"help": "SVD precision: float64 or float32"})
    protect_last: bool = field(
        default=True, metadata={"help": "never cut the last prunable layer (a classifier's logits)"}
    )
    target: float | None = field(
        default=None, metadata={"help": "keep this fraction of the selected layers' parameters (0, 1]"}
    )
    target_macs: float | None = field(
        default=None, metadata={"help": "keep this fraction of the selected layers' MACs (0, 1]"}
    )
    allocation: str = field(
        default="rmt", metadata={"help": f"how a target is spread over layers: {', '.join(ALLOCATIONS)}"}
    )
    damping: float = field(
        default=1e-1, metadata={"help": "relative damping of the calibration covariance before whitening"}
    )
    guard: float | None = field(
        default=None, metadata={"help": "largest relative output error of a layer on held-out calibration"}
    )
    sequential: bool = field(
        default=False,
        metadata={"help": "with calibration: cut block after block, each refit to the cut model's inputs"},
    )

    def __post_init__(self) -> None:
        get_rule(self.rule)
        fit = FitConfig(self.alpha, self.beta, self.ks_max, self.noise)
        self.alpha, self.beta, self.ks_max = fit.alpha, fit.beta, fit.ks_max
        self._check_rule_fields()
        self.min_rank = check_int("min_rank", self.min_rank, 1)
        if not isinstance(self.rule_params, dict) or not all(isinstance(k, str) for k in self.rule_params):
            raise TypeError(f"rule_params={self.rule_params!r} must be a dict of parameter name -> value")
        self.rule_params = dict(self.rule_params)
        self.make_rule()  # the rule checks its parameters together (fixed: exactly one of ratio, rank)
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)
        for flag in ("factor_only_if_smaller", "dense_truncate", "protect_last", "sequential"):
            check_bool(flag, getattr(self, flag))
        check_choice("svd_dtype", self.svd_dtype, _SVD_DTYPES)
        for name in ("target", "target_macs"):
            if getattr(self, name) is not None:
                setattr(self, name, check_number(name, getattr(self, name), 0.0, 1.0, lo_open=True))
        if self.target is not None and self.target_macs is not None:
            raise ValueError("give target or target_macs, not both")
        check_choice("allocation", self.allocation, ALLOCATIONS)
        self.damping = check_number("damping", self.damping, 0.0, 1e6)
        if self.guard is not None:
            self.guard = check_number("guard", self.guard, 0.0, math.inf, lo_open=True, allow_inf=True)
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides={self.overrides!r} must be a dict pattern -> {{field: value}}")
        for pattern, values in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"override pattern {pattern!r} must be a non-empty string")
            if not isinstance(values, dict):
                raise TypeError(f"override for {pattern!r} must be a dict of fields, got {values!r}")
            bad = sorted(set(values) - set(OVERRIDABLE))
            if bad:
                raise ValueError(
                    f"override for {pattern!r} sets unknown or non-overridable field(s) {bad}; "
                    f"valid: {', '.join(OVERRIDABLE)}"
                )
            # Check the values by building the resolved config once (raises with the field name).
            try:
                dataclasses.replace(self, overrides={}, include=[], exclude=[], **values)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"override for {pattern!r}: {exc}") from None
        self.overrides = {k: dict(v) for k, v in self.overrides.items()}

    def _check_rule_fields(self) -> None:
        """Check each field a registered rule reads with that rule's check (the first rule declaring it)."""
        names = {f.name for f in dataclasses.fields(self)}
        done: set[str] = set()
        for cls in RULES.values():
            for prm in cls.parameters.values():
                if prm.field is None or prm.field in done or prm.field not in names:
                    continue  # a field the config lacks is refused when that rule is built
                done.add(prm.field)
                if prm.check is not None:
                    setattr(self, prm.field, prm.check(prm.field, getattr(self, prm.field)))

    # ------------------------------------------------------------------ per layer
    def selects(self, name: str) -> tuple[bool, str]:
        """Whether layer ``name`` is selected by include/exclude, and if not, why."""
        if self.include and not any(match_pattern(name, p) for p in self.include):
            return False, f"not matched by include patterns {self.include}"
        for p in self.exclude:
            if match_pattern(name, p):
                return False, f"excluded by pattern {p!r}"
        return True, ""

    def for_layer(self, name: str) -> CompressionConfig:
        """The config with every override whose pattern matches ``name`` applied (in order)."""
        values: dict[str, Any] = {}
        for pattern, over in self.overrides.items():
            if match_pattern(name, pattern):
                values.update(over)
        if not values:
            return self
        return dataclasses.replace(self, **values)

    @property
    def fit(self) -> FitConfig:
        """The fit parameters (``alpha``, ``beta``, ``ks_max``, ``noise``) as a :class:`FitConfig`."""
        return FitConfig(self.alpha, self.beta, self.ks_max, self.noise)

    def make_rule(self) -> RankRule:
        """The rank rule object this config describes (overrides not applied): the registered rule
        class builds itself from the fields it reads and ``rule_params``."""
        return get_rule(self.rule).from_config(self)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError`` naming them."""
        return from_dict(cls, data, "config")

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Sorted, indented JSON text; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            from ._atomic import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> CompressionConfig:
        """Parse JSON text, or read it from a file path."""
        text = str(text_or_path)
        if isinstance(text_or_path, os.PathLike) or not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise OSError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)
