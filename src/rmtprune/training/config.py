"""What defines a training run (:class:`TrainConfig`) and what it returns (:class:`TrainResult`).

The compression of each cut is a nested :class:`~rmtprune.config.CompressionConfig`
(``TrainConfig.compression``), so every rank-rule option of ``rmtprune compress`` applies to
training too. The flat fields of earlier releases (``keep_bulk``, ``ks_max``, ``min_rank``,
``exclude``, ``keep_output_rank``) are still accepted for one release: as keyword arguments
(with a ``DeprecationWarning``) and in dicts read back from ``config.json`` and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._validate import check_bool, check_choice, check_fields, check_int
from ..config import CompressionConfig

__all__ = ["TrainConfig", "TrainResult", "OPTIMIZERS", "LR_SCHEDULES", "LEGACY_FIELDS"]

#: Optimizers :func:`train` builds (SGD with momentum, or AdamW).
OPTIMIZERS = ("sgd", "adamw")
#: Learning-rate schedules, stepped once per epoch: constant, cosine annealing to 0 over the run,
#: or step decay by ``lr_gamma`` every ``lr_step`` epochs.
LR_SCHEDULES = ("constant", "cosine", "step")
#: Mixed precision of the training forward (``TrainConfig.amp``).
AMP_MODES = ("off", "bf16", "fp16")
#: Config fields that may differ when a run is resumed (they do not change what was trained).
#: The stability tracking only measures (it changes no weight nor random number), so it may be
#: switched or re-timed; ``stability_train_examples`` may not (the stored vectors would not fit).
_RESUME_MAY_CHANGE = (
    "epochs",
    "device",
    "track_spectra",
    "eval_before_prune",
    "track_stability",
    "stability_every",
)
#: Sanity bounds: more epochs than this is a typo, a seed must fit torch's 64-bit generator.
_MAX_EPOCHS = 1_000_000
_MAX_SEED = 2**63 - 1
_MAX_FLOAT32 = float(torch.finfo(torch.float32).max)
#: The fraction of the bulk a cut keeps unless told otherwise (the 2023 notebook's 0.45).
DEFAULT_KEEP_BULK = 0.45
#: The flat fields of earlier releases -> the CompressionConfig field each one now is.
LEGACY_FIELDS = {
    "keep_bulk": "keep_bulk",
    "ks_max": "ks_max",
    "min_rank": "min_rank",
    "exclude": "exclude",
    "keep_output_rank": "protect_last",
}


def default_compression() -> CompressionConfig:
    """The compression of a training run by default: ``CompressionConfig`` with ``keep_bulk=0.45``."""
    return CompressionConfig(keep_bulk=DEFAULT_KEEP_BULK)


def compression_from(value: Any, base: CompressionConfig | None = None) -> CompressionConfig:
    """A CompressionConfig from a config, or from a dict of its fields applied to ``base``."""
    if isinstance(value, CompressionConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"compression={value!r} must be a CompressionConfig or a dict of its fields")
    base = base or default_compression()
    check_fields("CompressionConfig", value, base.to_dict())
    return CompressionConfig.from_dict({**base.to_dict(), **value})


def split_legacy(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` without its flat legacy fields, and those fields under their CompressionConfig names."""
    rest = {k: v for k, v in data.items() if k not in LEGACY_FIELDS}
    legacy = {LEGACY_FIELDS[k]: v for k, v in data.items() if k in LEGACY_FIELDS}
    return rest, legacy


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """A :meth:`TrainConfig.to_dict` dict with the compression fields at the top level (no name is
    both a TrainConfig and a CompressionConfig field), for comparing and merging field by field."""
    flat = {k: v for k, v in data.items() if k != "compression"}
    return {**flat, **data.get("compression", {})}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    names = {f.name for f in dataclasses.fields(CompressionConfig)}
    out = {k: v for k, v in flat.items() if k not in names}
    out["compression"] = {k: v for k, v in flat.items() if k in names}
    return out


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside rmtprune (the user's call), seen from the caller."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("rmtprune."):
        frame, level = frame.f_back, level + 1
    return level


def flat_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``train(**overrides)`` as flat fields: ``compression=`` (a config, or a dict of some of its
    fields) spread out, the deprecated flat names mapped to theirs (with a ``DeprecationWarning``)."""
    rest, legacy = split_legacy(overrides)
    if legacy:
        warnings.warn(
            f"train({', '.join(k for k in overrides if k in LEGACY_FIELDS)}=...) is deprecated: "
            "give compression={...} (CompressionConfig fields) instead",
            DeprecationWarning,
            stacklevel=_caller_level(),
        )
    comp = rest.pop("compression", {})
    if isinstance(comp, CompressionConfig):
        comp = comp.to_dict()
    elif isinstance(comp, dict):
        check_fields("CompressionConfig", comp, (f.name for f in dataclasses.fields(CompressionConfig)))
    else:
        raise TypeError(f"compression={comp!r} must be a CompressionConfig or a dict of its fields")
    return {**rest, **legacy, **comp}


def _check_rate(name: str, value: Any) -> float:
    """A finite float >= 0 that a float32 weight can be multiplied by (the optimizer does)."""
    # These messages are asserted by tests/test_numeric_args.py ("must be a finite number >= 0").
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if value > _MAX_FLOAT32:
        raise ValueError(f"{name}={value!r} must be <= {_MAX_FLOAT32:.3g} (the largest float32)")
    return float(value)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in ``config.json`` and in every checkpoint."""

    dataset: str = field(default="mnist", metadata={"help": "dataset name (see rmtprune.data.DATASETS)"})
    model: str = field(default="mlp:1000", metadata={"help": "model spec (see rmtprune.models)"})
    epochs: int = field(default=10, metadata={"help": "number of epochs"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (with momentum) or adamw"})
    lr: float = field(default=0.01, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "optimizer weight decay"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant, cosine or step"})
    lr_step: int = field(default=10, metadata={"help": "epochs between decays of the step schedule"})
    lr_gamma: float = field(default=0.1, metadata={"help": "factor of each step decay"})
    l1: float = field(default=0.0, metadata={"help": "L1 penalty mu1 on the weights (papers: 1e-6..5e-6)"})
    l2: float = field(default=0.0, metadata={"help": "L2 penalty mu2 on the weights (papers: 1e-6..5e-6)"})
    batch_size: int = field(default=128, metadata={"help": "mini-batch size"})
    seed: int = field(default=0, metadata={"help": "seed of every random number generator"})
    prune: bool = field(default=True, metadata={"help": "prune during training"})
    prune_every: int = field(default=2, metadata={"help": "prune every this many epochs"})
    prune_start: int | None = field(default=None, metadata={"help": "first pruning epoch (default: every)"})
    decay_T: float | None = field(  # noqa: N815 - the papers' T
        default=None, metadata={"help": "f(e) = max(0, 1 - e / T) instead of a constant keep_bulk"}
    )
    train_subset: int | None = field(default=None, metadata={"help": "use the first n training samples"})
    test_subset: int | None = field(default=None, metadata={"help": "use the first n test samples"})
    val_size: int | None = field(
        default=None,
        metadata={
            "help": "images of the training file held out as the validation split (default: the "
            "dataset's, 5000 for MNIST; 0: train on the whole file, no validation)"
        },
    )
    eval_before_prune: bool = field(
        default=False, metadata={"help": "also measure test accuracy just before each cut"}
    )
    track_spectra: bool = field(default=True, metadata={"help": "fit every layer's spectrum every epoch"})
    track_stability: bool = field(
        default=True,
        metadata={"help": "count accuracy-stability events and example flips (train, val) every epoch"},
    )
    stability_every: int = field(
        default=0, metadata={"help": "also measure stability every this many optimizer steps (0: per epoch)"}
    )
    stability_train_examples: int = field(
        default=10_000,
        metadata={"help": "training images of the fixed stability evaluation (seeded subset; 0: all)"},
    )
    device: str = field(default="cpu", metadata={"help": "torch device"})
    amp: str = field(
        default="off",
        metadata={
            "help": "mixed precision of the training forward: off, bf16 or fp16 (CUDA only, with a "
            "gradient scaler); weights, loss, evaluation and every SVD stay float32/64"
        },
    )
    compression: CompressionConfig = field(
        default_factory=default_compression,
        metadata={"help": "the compression of each cut (rule, keep_bulk = f, gate, patterns, protect_last)"},
    )
    # Deprecated flat fields (one release): mapped into ``compression``.
    keep_bulk: InitVar[float | None] = None
    ks_max: InitVar[float | None] = None
    min_rank: InitVar[int | None] = None
    exclude: InitVar[list[str] | None] = None
    keep_output_rank: InitVar[bool | None] = None

    def __post_init__(
        self,
        keep_bulk: float | None,
        ks_max: float | None,
        min_rank: int | None,
        exclude: list[str] | None,
        keep_output_rank: bool | None,
    ) -> None:
        for name in ("dataset", "model", "device"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a string")
        for name in ("prune", "track_spectra", "eval_before_prune", "track_stability"):
            check_bool(name, getattr(self, name))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("epochs", self.epochs, 1, _MAX_EPOCHS)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0, _MAX_SEED)
        check_int("prune_every", self.prune_every, 1)
        check_int("lr_step", self.lr_step, 1)
        check_int("stability_every", self.stability_every, 0)
        check_int("stability_train_examples", self.stability_train_examples, 0)
        if self.prune_start is not None:
            check_int("prune_start", self.prune_start, 0)
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.val_size is not None:
            check_int("val_size", self.val_size, 0)
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "l1", "l2"):
            setattr(self, name, _check_rate(name, getattr(self, name)))
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if self.decay_T is not None:
            if isinstance(self.decay_T, bool) or not isinstance(self.decay_T, (int, float)):
                raise TypeError(f"decay_T={self.decay_T!r} must be a number or None")
            if not (math.isfinite(self.decay_T) and self.decay_T > 0):
                raise ValueError(f"decay_T={self.decay_T!r} must be a positive number")
            self.decay_T = float(self.decay_T)
        self.compression = compression_from(self.compression)
        given = {"keep_bulk": keep_bulk, "ks_max": ks_max, "min_rank": min_rank, "exclude": exclude}
        self._apply_legacy({**given, "keep_output_rank": keep_output_rank})

    def _apply_legacy(self, given: dict[str, Any]) -> None:
        """Map the deprecated flat keyword arguments that were given into ``compression``."""
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            warnings.warn(
                f"TrainConfig({', '.join(given)}=...) is deprecated: "
                "give compression=CompressionConfig(...) (or a dict of its fields) instead",
                DeprecationWarning,
                stacklevel=4,
            )
            self.compression = compression_from(split_legacy(given)[1], self.compression)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field, the compression config nested under ``compression``."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they name the field).

        The flat layout of earlier releases (``keep_bulk``, ``ks_max``, ``min_rank``, ``exclude``,
        ``keep_output_rank`` at the top level: old ``config.json`` files and checkpoints) is read
        too, without a warning: a file written before cannot be changed by its reader.
        """
        if not isinstance(data, dict):
            raise TypeError(f"TrainConfig must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        check_fields("TrainConfig", data, [*known, *LEGACY_FIELDS])
        rest, legacy = split_legacy(data)
        base = compression_from(rest.get("compression", {}))
        return cls(**{**rest, "compression": compression_from(legacy, base) if legacy else base})

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _legacy_property(old: str, new: str) -> property:
    """``TrainConfig.<old>`` read back (deprecated): the nested ``compression.<new>``."""

    def get(self: TrainConfig) -> Any:
        if sys._getframe(1).f_globals.get("__name__") == "dataclasses":
            # dataclasses.replace() copies init-only fields by reading them: the value lives in
            # ``compression`` (copied too), so give the InitVar's "not given" default.
            return None
        warnings.warn(
            f"TrainConfig.{old} is deprecated: read TrainConfig.compression.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self.compression, new)

    return property(get, doc=f"Deprecated: ``compression.{new}``.")


# The flat fields are init-only (dataclass InitVar) keywords; reading them back gives the nested
# value, as the flat field did before (not the InitVar's class default None). The generated
# __init__ captured its defaults already, so replacing the class attributes is safe.
for _old, _new in LEGACY_FIELDS.items():
    setattr(TrainConfig, _old, _legacy_property(_old, _new))


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained (pruned) model and everything it measured.

    ``metrics`` has one dict per epoch (see ``metrics.json``), ``decisions`` one per layer per
    cut, ``initial_params`` the parameter count of the model as built (before any cut),
    ``timings`` the seconds spent training, pruning, evaluating, fitting spectra for the metrics
    and writing files over the whole run (the resumed part only, after a resume).
    """

    model: nn.Module
    config: TrainConfig
    metrics: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    timings: dict[str, float]
    out: Path | None = None
    resumed_from: int | None = None
    initial_params: int = 0

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics."""
        return self.metrics[-1] if self.metrics else {}
