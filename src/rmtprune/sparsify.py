"""Sparsification with RMT-guided budgets (Berlyand, Bourdais, Owhadi, Shmalo 2025; METHOD.md section 8).

For every prunable layer (``Linear``, ``Conv1d``, ``Conv2d``, including the two factors of a
low-rank layer) with an accepted Marchenko-Pastur fit:

1. **Singular-vector sparsification.** ``W = U S V^T``; for triplet ``i`` the threshold is
   ``T_i = theta * max(c_min, (1 - s_i / s_plus)_+ ** q)``, in units of the typical entry of a
   unit vector (``1 / sqrt(m)`` for ``u_i``, ``1 / sqrt(n)`` for ``v_i``). Entries below it are
   zeroed and ``W' = U' S V'^T`` is recomposed. Deep-bulk triplets lose most entries, spikes
   almost none: a denoising of the noise part before pruning.
2. **Magnitude pruning with an RMT budget**, over ``n_cycles`` cycles whose global target ramps
   linearly to ``target``. The budget rule decides how many entries each layer loses:
   ``energy`` (METHOD.md's direction: the budget grows with how random the layer is) is one
   global threshold on ``|w| / bulk_energy ** budget_power``, where ``bulk_energy`` is the share
   of ``||W||_F**2`` in the MP bulk: a pure-noise layer (share 1) is pruned like plain global
   magnitude pruning, a layer whose energy sits in spikes is protected. ``signal`` (default) is
   the reverse, one global threshold on ``|w| * bulk_energy ** budget_power``: a layer whose
   energy sits in well-separated spikes loses more of its small entries, a layer that is all
   bulk is pruned like plain global magnitude pruning (see :func:`_allocate` for why this
   departs from METHOD.md section 8 and why it is the default).
   ``noise`` thresholds ``|w| / sigma`` with ``sigma = sqrt(sigma2)`` the fitted noise level
   (entries small *in units of the layer's noise*); ``bulk`` gives each layer a sparsity
   proportional to ``bulk_fraction ** budget_power``. ``global`` and ``uniform`` are the plain
   magnitude-pruning baselines (no fit needed). Budgets are normalised so the global
   target, counted over all selected layers, is met exactly (up to ``max_layer_sparsity``).
3. **Regularised fine-tuning** (``l1``, ``l2``, optional ``group_lasso`` over rows) for
   ``cycle_steps`` steps after each cycle, with pruned entries frozen by masks; then
4. an optional **short fine-tune** (``finetune_epochs``) on data.

Steps 3-4 run only when data is given. Layers without an accepted fit are left dense and
reported (under the ``noise``/``bulk`` budgets). A model that already carries masks is
re-sparsified from them: masks only grow.

References
----------
Berlyand, L., Bourdais, T., Owhadi, H. and Shmalo, Y. (2025). Pruning deep neural networks via a
combination of the Marchenko-Pastur distribution and regularization. arXiv:2503.01922.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from ._progress import progress
from .analysis import LayerAnalysis, analyze_tensor, as_matrix
from .config import match_pattern
from .errors import InvalidWeightsError
from .finetune import SCHEDULES, check_lr, evaluate, finetune
from .lowrank import LowRankModule
from .masks import (
    count_nonzeros,
    get_mask,
    masks_of,
    parametrization,
    prunable_layers,
    remove_masks,
    restore_masks,
    set_mask,
)
from .spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX, MIN_P, fit_censored

__all__ = [
    "BUDGETS",
    "SparsifyConfig",
    "LayerSparsity",
    "SparsifyReport",
    "sparsify",
    "plan_sparsity",
    "singular_vector_thresholds",
    "sparsify_singular_vectors",
    "proportional_counts",
    "threshold_counts",
]

#: Budget rules: RMT-guided (``noise``, ``bulk``; need a fit) and the baselines (``global``, ``uniform``).
BUDGETS = ("noise", "energy", "signal", "bulk", "global", "uniform")
_RMT_BUDGETS = ("noise", "energy", "signal", "bulk")
_STORAGE = ("auto", "bitmask", "csr")


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
    """

    target: float = field(default=0.5, metadata=_meta("global sparsity over the selected layers, in [0, 1)"))
    budget: str = field(default="signal", metadata=_meta(f"per-layer budget rule, one of {BUDGETS}"))
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
    refit: bool = field(default=False, metadata=_meta("refit the MP bulk before every cycle (else once)"))
    sv_sparsify: bool = field(default=True, metadata=_meta("step 1: sparsify singular vectors and recompose"))
    theta: float = field(default=1.0, metadata=_meta("singular-vector threshold scale, units of 1/sqrt(dim)"))
    c_min: float = field(default=1.0 / 750.0, metadata=_meta("floor of the threshold factor (paper: 1/750)"))
    q: float = field(default=30.0, metadata=_meta("exponent of (1 - s/s_plus)_+ (paper: 30)"))
    alpha: float = field(default=DEFAULT_ALPHA, metadata=_meta("BEMA trim fraction"))
    beta: float = field(default=DEFAULT_BETA, metadata=_meta("Tracy-Widom level of the edge"))
    ks_max: float = field(default=DEFAULT_KS_MAX, metadata=_meta("gate: a fit with ks above is rejected"))
    include: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "layer-name patterns (glob, exact name or suffix; a factor matches its parent); [] = all"
        ),
    )
    exclude: list[str] = field(default_factory=list, metadata=_meta("layer-name patterns never pruned"))
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
    storage: str = field(default="auto", metadata=_meta(f"sparse storage format, one of {_STORAGE}"))

    def __post_init__(self) -> None:
        _check_real("target", self.target, 0.0, 1.0, hi_open=True)
        _check_choice("budget", self.budget, BUDGETS)
        _check_int("n_cycles", self.n_cycles, 1, hi=1000)
        _check_real("max_layer_sparsity", self.max_layer_sparsity, 0.0, 1.0)
        _check_real("budget_power", self.budget_power, 0.0, math.inf)
        _check_bool("refit", self.refit)
        _check_bool("sv_sparsify", self.sv_sparsify)
        _check_real("theta", self.theta, 0.0, math.inf)
        _check_real("c_min", self.c_min, 0.0, 1.0)
        _check_real("q", self.q, 0.0, math.inf, lo_open=True)
        _check_real("alpha", self.alpha, 0.0, 0.5, lo_open=True, hi_open=True)
        _check_real("beta", self.beta, 0.01, 0.99)
        _check_real("ks_max", self.ks_max, 0.0, 1.0)
        self.include = _check_patterns("include", self.include)
        self.exclude = _check_patterns("exclude", self.exclude)
        _check_int("cycle_steps", self.cycle_steps, 0, hi=10**7)
        for name in ("l1", "l2", "group_lasso"):
            _check_real(name, getattr(self, name), 0.0, math.inf)
        _check_real("finetune_epochs", self.finetune_epochs, 0.0, 1e4)  # bounded run time
        _check_real("lr", self.lr, 0.0, math.inf, lo_open=True)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_real("warmup", self.warmup, 0.0, 1.0, hi_open=True)
        _check_choice("storage", self.storage, _STORAGE)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsifyConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SparsifyConfig keys {unknown}; valid: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SparsifyConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _check_real(
    name: str, v: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    # Infinity is never a usable value (an infinite learning rate or epoch count), so an upper
    # bound of inf is always open.
    hi_open = hi_open or hi == math.inf
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or not math.isfinite(v):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}={v!r} must be in {left}{lo:g}, {hi:g}{right}")


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}={v} must be <= {hi}")


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def _check_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a string, got {type(v).__name__}")
    if v not in choices:
        raise ValueError(f"{name}={v!r} must be one of {list(choices)}")


def _check_patterns(name: str, patterns: Any) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"{name}={patterns!r} must be a list of non-empty pattern strings")
    return list(patterns)


# ----------------------------------------------------------------------------- step 1: singular vectors


def singular_vector_thresholds(
    s: np.ndarray | torch.Tensor, s_plus: float, theta: float, c_min: float = 1.0 / 750.0, q: float = 30.0
) -> np.ndarray:
    """``theta * max(c_min, (1 - s_i / s_plus)_+ ** q)`` for each singular value (before the 1/sqrt(dim)).

    Examples
    --------
    >>> singular_vector_thresholds([0.0, 0.5, 2.0], s_plus=1.0, theta=1.0, q=1.0).tolist()
    [1.0, 0.5, 0.0013333333333333333]
    """
    s = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
    if not s_plus > 0:
        raise ValueError(f"s_plus={s_plus!r} must be > 0")
    f = np.clip(1.0 - s / s_plus, 0.0, None) ** q
    return theta * np.maximum(c_min, f)


def sparsify_singular_vectors(
    weight: torch.Tensor, s_plus: float, theta: float, c_min: float = 1.0 / 750.0, q: float = 30.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 1 on one weight: threshold the entries of ``u_i`` and ``v_i`` and recompose.

    ``u_i`` entries below ``T_i / sqrt(m)`` and ``v_i`` entries below ``T_i / sqrt(n)`` are
    zeroed (``m x n`` the matrix view; conv weights are read as ``out x (in * k...)``). Returns
    the new weight (same shape, dtype, device) and ``{"zeroed_u", "zeroed_v", "rel_change"}``:
    the fractions of vector entries zeroed and ``||W' - W||_F / ||W||_F``.
    """
    mat = as_matrix(weight).to(device="cpu", dtype=torch.float64)
    m, n = mat.shape
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    t = torch.from_numpy(singular_vector_thresholds(S.numpy(), s_plus, theta, c_min, q))
    keep_u = U.abs() >= (t / math.sqrt(m))[None, :]
    keep_v = Vh.abs() >= (t / math.sqrt(n))[:, None]
    new = (U * keep_u * S[None, :]) @ (Vh * keep_v)
    norm = float(torch.linalg.norm(mat))
    info = {
        "zeroed_u": 1.0 - float(keep_u.double().mean()),
        "zeroed_v": 1.0 - float(keep_v.double().mean()),
        "rel_change": float(torch.linalg.norm(new - mat)) / norm if norm > 0 else 0.0,
    }
    return new.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype), info


# ----------------------------------------------------------------------------- step 2: budgets


def proportional_counts(
    numels: list[int], floors: list[int], caps: list[int], weights: list[float], total: int
) -> list[int]:
    """Integer prune counts ``k_l = clip(lam * w_l * n_l, floor_l, cap_l)`` summing to ``total``.

    ``lam`` is found by bisection, then counts are rounded by largest remainder so the sum is
    exact. When ``total`` is out of reach the counts saturate (all floors, or all caps where
    ``w_l > 0``); the caller compares the sum with its target.
    """
    n = np.asarray(numels, dtype=np.float64)
    lo_c = np.asarray(floors, dtype=np.float64)
    hi_c = np.maximum(np.asarray(caps, dtype=np.float64), lo_c)
    w = np.asarray(weights, dtype=np.float64)
    reach = np.where(w > 0, hi_c, lo_c)

    def f(lam: float) -> np.ndarray:
        return np.clip(lam * w * n, lo_c, np.where(w > 0, hi_c, lo_c))

    if total <= lo_c.sum():
        return [int(v) for v in lo_c]
    if total >= reach.sum():
        return [int(v) for v in reach]
    pos = (w > 0) & (n > 0)
    lam_lo, lam_hi = 0.0, float(np.max(hi_c[pos] / (w[pos] * n[pos])))
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if f(mid).sum() < total:
            lam_lo = mid
        else:
            lam_hi = mid
    d = f(lam_hi)
    base = np.clip(np.floor(d), lo_c, reach).astype(np.int64)
    rem = int(total - base.sum())
    order = np.argsort(-(d - np.floor(d)), kind="stable")
    while rem > 0:
        moved = False
        for i in order:
            if rem == 0:
                break
            if base[i] < reach[i]:
                base[i] += 1
                rem -= 1
                moved = True
        if not moved:
            break
    while rem < 0:  # bisection overshoot by rounding: take back from the largest fractional parts
        for i in order[::-1]:
            if rem == 0:
                break
            if base[i] > lo_c[i]:
                base[i] -= 1
                rem += 1
    return [int(v) for v in base]


def threshold_counts(scores: list[torch.Tensor], caps: list[int], total: int) -> list[int]:
    """Prune counts from one global threshold on ``scores`` (smallest first), each layer capped.

    The ``total`` smallest scores over all layers are pruned; a layer that would pass its cap is
    fixed at the cap and the rest re-thresholded (water filling). Already-pruned entries carry
    score ``-inf`` so they are always counted first.
    """
    counts = [0] * len(scores)
    frozen: set[int] = set()
    while True:
        active = [i for i in range(len(scores)) if i not in frozen]
        budget = total - sum(caps[i] for i in frozen)
        if not active or budget <= 0:
            for i in active:
                counts[i] = 0
            return counts
        cat = torch.cat([scores[i].reshape(-1) for i in active])
        owner = torch.cat(
            [torch.full((scores[i].numel(),), j, dtype=torch.int64) for j, i in enumerate(active)]
        )
        k = min(budget, cat.numel())
        idx = (
            torch.topk(cat, k, largest=False, sorted=False).indices if k else torch.empty(0, dtype=torch.long)
        )
        got = torch.bincount(owner[idx], minlength=len(active)).tolist()
        over = [i for j, i in enumerate(active) if got[j] > caps[i]]
        for j, i in enumerate(active):
            counts[i] = got[j]
        if not over:
            return counts
        for i in over:
            frozen.add(i)
            counts[i] = caps[i]


def _magnitude_mask(weight: torch.Tensor, old: torch.Tensor | None, k: int) -> torch.Tensor:
    """Mask keeping all but the ``k`` smallest ``|w|`` (already-pruned entries go first)."""
    score = weight.detach().abs().to(torch.float64).reshape(-1)
    if old is not None:
        score = score.masked_fill(~old.reshape(-1).to(score.device), -math.inf)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        keep[torch.topk(score, k, largest=False, sorted=False).indices] = False
    return keep.reshape(weight.shape)


# ----------------------------------------------------------------------------- report


@dataclass
class LayerSparsity:
    """One selected layer: its fit, what step 1 did, its budget and nonzeros before / after."""

    name: str
    layer_type: str
    kind: str
    shape: list[int]
    dtype: str
    verdict: str
    reason: str
    params: int
    nnz_before: int
    nnz_after: int
    n_spikes: int | None = None
    n_bulk: int | None = None
    ks: float | None = None
    s_plus: float | None = None
    sigma: float | None = None
    score: float | None = None
    sv_zeroed_u: float | None = None
    sv_zeroed_v: float | None = None
    sv_rel_change: float | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are pruned (as stored)."""
        return 1.0 - self.nnz_after / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (with ``sparsity``)."""
        out = asdict(self)
        out["sparsity"] = self.sparsity
        return out


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did, layer by layer and cycle by cycle, with nonzeros as stored."""

    target: float
    budget: str
    achieved: float
    selected_params: int
    selected_nnz: int
    total_params: int
    stored_values: int
    layers: list[LayerSparsity]
    cycles: list[dict[str, Any]] = field(default_factory=list)
    final_finetune: dict[str, Any] | None = None
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        out = asdict(self)
        out["layers"] = [layer.to_dict() for layer in self.layers]
        return out

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default)

    def table(self) -> str:
        """Fixed-width per-layer table (the CLI prints it)."""
        head = ("layer", "kind", "shape", "verdict", "spikes", "ks", "sv-zeroed", "sparsity", "nnz")
        rows = [head]
        for r in self.layers:
            sv = "-" if r.sv_zeroed_u is None else f"{(r.sv_zeroed_u + r.sv_zeroed_v) / 2:.1%}"
            rows.append(
                (
                    r.name,
                    r.kind,
                    "x".join(map(str, r.shape)),
                    r.verdict,
                    "-" if r.n_spikes is None else str(r.n_spikes),
                    "-" if r.ks is None else f"{r.ks:.3f}",
                    sv,
                    f"{r.sparsity:.1%}",
                    f"{r.nnz_after:,}/{r.params:,}",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]
        return "\n".join(lines)

    @property
    def saved(self) -> float:
        """Fraction of the model's parameters not stored (``1 - stored_values / total_params``)."""
        return 1.0 - self.stored_values / self.total_params if self.total_params else 0.0

    def summary(self) -> str:
        """One paragraph: target, achieved, nonzeros as stored, accuracy where measured."""
        verb = "planned" if self.dry_run else "achieved"
        text = (
            f"budget={self.budget} target={self.target:.1%} {verb}={self.achieved:.2%} over "
            f"{self.selected_params:,} selected weights; stored values {self.stored_values:,} of "
            f"{self.total_params:,} parameters ({self.saved:.1%} fewer)"
        )
        if self.eval_before and self.eval_after:
            text += f"; accuracy {self.eval_before['accuracy']:.2%} -> {self.eval_after['accuracy']:.2%}"
        return text

    def to_markdown(self) -> str:
        """Markdown: summary, warnings, cycles and the per-layer table."""
        out = ["# rmtprune sparsify report", "", self.summary(), ""]
        if self.warnings:
            out += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        if self.cycles:
            out += [
                "## Cycles",
                "",
                "| cycle | target | achieved | fine-tune loss | accuracy |",
                "|---|---|---|---|---|",
            ]
            for c in self.cycles:
                ft = c.get("finetune") or {}
                ev = c.get("eval") or {}
                loss = f"{ft['mean_loss']:.4f}" if ft.get("steps") else "-"
                acc = f"{ev['accuracy']:.2%}" if ev else "-"
                out.append(f"| {c['cycle']} | {c['target']:.1%} | {c['achieved']:.2%} | {loss} | {acc} |")
            out.append("")
        cols = ("layer", "kind", "shape", "verdict", "reason", "spikes", "ks", "sv zeroed", "sparsity", "nnz")
        out += ["## Layers", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.layers:
            sv = "-" if r.sv_zeroed_u is None else f"{(r.sv_zeroed_u + r.sv_zeroed_v) / 2:.1%}"
            cells = (
                f"`{r.name}`",
                r.kind,
                "x".join(map(str, r.shape)),
                r.verdict,
                r.reason or "-",
                "-" if r.n_spikes is None else str(r.n_spikes),
                "-" if r.ks is None else f"{r.ks:.3f}",
                sv,
                f"{r.sparsity:.1%}",
                f"{r.nnz_after:,}/{r.params:,}",
            )
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class _Layer:
    name: str
    module: nn.Module
    factored_parent: str | None = None
    parent_module: nn.Module | None = None
    analysis: LayerAnalysis | None = None
    sigma: float = float("nan")
    sv_info: dict[str, float] | None = None
    nnz_before: int = 0

    @property
    def numel(self) -> int:
        return int(self.module.weight.numel())

    @property
    def pruned(self) -> int:
        mask = get_mask(self.module)
        return 0 if mask is None else int(self.numel - int(mask.sum()))

    @property
    def fitted(self) -> bool:
        return self.analysis is not None and self.analysis.verdict == "fit" and math.isfinite(self.sigma)


def _select(model: nn.Module, config: SparsifyConfig) -> tuple[list[_Layer], list[str], list[str]]:
    """Selected layers (factors of low-rank layers included), one warning per layer skipped because
    its weight is parametrized (``weight_norm`` and the like), and one per unmatched pattern."""
    parents: dict[str, tuple[str, nn.Module]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankModule):
            for child in ("first", "second"):
                parents[f"{name}.{child}" if name else child] = (name, mod)
    out = []
    skipped: list[str] = []
    names_seen: list[str] = []
    for name, mod in prunable_layers(model):
        parent, parent_mod = parents.get(name, (None, None))
        names = [name] + ([parent] if parent else [])
        names_seen += names

        def hit(pats: list[str], names: list[str] = names) -> bool:
            return any(match_pattern(n, p) for p in pats for n in names)

        if config.include and not hit(config.include):
            continue
        if hit(config.exclude):
            continue
        why = parametrization(mod) or (parametrization(parent_mod) if parent_mod is not None else None)
        if why is not None:
            # Masking the computed weight would be undone at the next forward pass (or drop the
            # parametrization): the layer is left alone and the report says why.
            skipped.append(f"layer {name!r} skipped: {why}")
            continue
        out.append(_Layer(name, mod, parent, parent_mod))
    warnings = [
        f"{kind} pattern {p!r} matches no prunable layer"
        for kind, pats in (("include", config.include), ("exclude", config.exclude))
        for p in pats
        if not any(match_pattern(n, p) for n in names_seen)
    ]
    return out, skipped, warnings


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _analyze_plain(layer: _Layer, config: SparsifyConfig) -> None:
    mod = layer.module
    w = mod.weight.detach()
    if getattr(mod, "groups", 1) != 1:
        why = f"grouped convolution (groups={mod.groups}): no fit of the mixed groups"
        layer.analysis = LayerAnalysis(layer.name, tuple(w.shape), _dtype(w), "grouped", None, why)
        return
    layer.analysis = analyze_tensor(layer.name, w, config.alpha, config.beta, config.ks_max)
    fit = layer.analysis.fit
    layer.sigma = math.sqrt(fit.sigma2) if layer.analysis.verdict == "fit" and fit is not None else math.nan


def _analyze_factored(parent: str, module: nn.Module, factors: list[_Layer], config: SparsifyConfig) -> None:
    """Fit the product ``A @ B`` of a low-rank layer (its k kept values read as the top of a
    p-value MP spectrum) and give each factor the typical entry size of its bulk columns/rows."""
    s = module.singular_values().numpy()
    m, n = module.matrix_shape
    w = module.second.weight
    fit = fit_censored(s, (m, n), config.alpha, config.beta) if min(m, n) >= MIN_P else None
    if fit is None:
        why = f"rank {s.size} of {min(m, n)}: too few kept bulk values to fit"
        analysis = LayerAnalysis(parent, (m, n), _dtype(w), "no-mp-bulk", None, why)
    elif fit.accepted(config.ks_max):
        analysis = LayerAnalysis(parent, (m, n), _dtype(w), "fit", fit, "")
    else:
        why = "no positive bulk" if not fit.sigma2 > 0 else f"ks={fit.ks:.3f} > ks_max={config.ks_max}"
        analysis = LayerAnalysis(parent, (m, n), _dtype(w), "no-mp-bulk", fit, why)
    bulk = s[fit.n_spikes :] if analysis.verdict == "fit" else s[:0]  # type: ignore[union-attr]
    if analysis.verdict == "fit" and bulk.size == 0:
        why = f"all {s.size} kept triplets are spikes: no noise left to prune"
        analysis = LayerAnalysis(parent, (m, n), _dtype(w), "spikes-only", fit, why)
    for layer in factors:
        layer.analysis = analysis
        if bulk.size:
            # A = U sqrt(S) has entries of variance s_i / m in column i; B = sqrt(S) V^T, s_i / n in row i
            dim = m if layer.module is module.second else n
            layer.sigma = math.sqrt(float(np.mean(bulk)) / dim)


def _analyze_all(layers: list[_Layer], config: SparsifyConfig, show: bool | None) -> None:
    groups: dict[str, list[_Layer]] = {}
    for layer in layers:
        if layer.factored_parent is not None:
            groups.setdefault(layer.factored_parent, []).append(layer)
    for layer in progress(layers, total=len(layers), desc="fit", enable=show):
        if layer.factored_parent is None:
            _analyze_plain(layer, config)
        elif layer is groups[layer.factored_parent][0]:
            _analyze_factored(
                layer.factored_parent, layer.parent_module, groups[layer.factored_parent], config
            )


def _bulk_energy(layer: _Layer) -> float:
    """Share of the layer's ``sum(s**2)`` in the MP bulk: 1 for pure noise, small for strong signal."""
    fit = layer.analysis.fit  # type: ignore[union-attr]
    return max(float(fit.bulk_energy), 1e-12)


def _sigma(layer: _Layer) -> float:
    return layer.sigma


def _sv_step(layers: list[_Layer], config: SparsifyConfig, show: bool | None) -> None:
    """Step 1 on every fitted layer; a low-rank layer is thresholded on the SVD of its product."""
    done: set[str] = set()
    for layer in progress(layers, total=len(layers), desc="singular vectors", enable=show):
        if not layer.fitted or config.theta == 0:
            continue
        fit = layer.analysis.fit  # type: ignore[union-attr]
        if layer.factored_parent is None:
            w = layer.module.weight
            new, layer.sv_info = sparsify_singular_vectors(
                w, fit.s_plus, config.theta, config.c_min, config.q
            )
            mask = get_mask(layer.module)
            with torch.no_grad():
                w.copy_(new if mask is None else new * mask.to(new.dtype))
            continue
        if layer.factored_parent in done:
            continue
        done.add(layer.factored_parent)
        mod = layer.parent_module
        if get_mask(mod.first) is not None or get_mask(mod.second) is not None:
            continue  # re-balancing masked factors would scramble their masks: keep them as they are
        A, B, info = _sparsify_factors(mod, fit.s_plus, config)
        mod.set_factors(A, B)
        for other in layers:
            if other.factored_parent == layer.factored_parent:
                other.sv_info = info


def _sparsify_factors(module: nn.Module, s_plus: float, config: SparsifyConfig) -> tuple[Any, Any, dict]:
    """Threshold the singular vectors of ``A @ B``; return factors ``U' sqrt(S)``, ``sqrt(S) V'^T``."""
    U, S, Vh = module.svd(torch.float64)
    m, n = module.matrix_shape
    t = torch.from_numpy(
        singular_vector_thresholds(S.cpu().numpy(), s_plus, config.theta, config.c_min, config.q)
    )
    t = t.to(U.device)
    keep_u = U.abs() >= (t / math.sqrt(m))[None, :]
    keep_v = Vh.abs() >= (t / math.sqrt(n))[:, None]
    root = S.sqrt()
    A = U * keep_u * root[None, :]
    B = root[:, None] * (Vh * keep_v)
    old_A, old_B = module.factors()
    before = old_A.detach().double() @ old_B.detach().double()
    norm = float(torch.linalg.norm(before))
    info = {
        "zeroed_u": 1.0 - float(keep_u.double().mean()),
        "zeroed_v": 1.0 - float(keep_v.double().mean()),
        "rel_change": float(torch.linalg.norm(A @ B - before)) / norm if norm > 0 else 0.0,
    }
    return A, B, info


def _allocate(layers: list[_Layer], config: SparsifyConfig, target: float) -> tuple[list[int], int]:
    """Prune count per layer for a global ``target``; returns ``(counts, wanted_total)``."""
    total_numel = sum(layer.numel for layer in layers)
    wanted = int(round(target * total_numel))
    rmt = config.budget in _RMT_BUDGETS
    active = [i for i, layer in enumerate(layers) if layer.fitted or not rmt]
    fixed = sum(layers[i].pruned for i in range(len(layers)) if i not in set(active))
    floors = [layers[i].pruned for i in active]
    cap_frac = 1.0 if config.budget == "global" else config.max_layer_sparsity
    caps = [max(int(math.floor(cap_frac * layers[i].numel)), f) for i, f in zip(active, floors, strict=True)]
    budget = max(wanted - fixed, sum(floors))
    if config.budget in ("global", "noise", "energy", "signal"):
        scores = []
        for i in active:
            w = layers[i].module.weight.detach().abs().to(torch.float64).reshape(-1).cpu()
            if config.budget == "energy":
                w = w / _bulk_energy(layers[i]) ** config.budget_power
            if config.budget == "signal":
                # Deviation from METHOD.md section 8 (budget growing with randomness), and the
                # default, because it was measured: on trained ViTs the MP-like layers (value
                # and output projections, patch embedding, head: bulk energy ~1, no spikes) carry
                # the function spread over their whole spectrum, so pruning them first (energy)
                # costs 10+ pp at 50% before fine-tuning. A layer whose energy sits in spikes
                # well above the edge keeps them under a perturbation small against the gap
                # (Weyl / Davis-Kahan), so its small entries are the cheaper ones to cut. Found
                # on one Fashion-MNIST ViT, then confirmed on held-out models (other seeds, MNIST,
                # a larger ViT): benchmarks/results/sparsify_vit.md. Not universal: on a Fashion
                # MLP "energy" is the better direction (benchmarks/results/sparsify_budgets.md).
                w = w * _bulk_energy(layers[i]) ** config.budget_power
            if config.budget == "noise":
                w = w / _sigma(layers[i])
            mask = get_mask(layers[i].module)
            if mask is not None:
                w = w.masked_fill(~mask.reshape(-1).cpu(), -math.inf)
            scores.append(w)
        got = threshold_counts(scores, caps, budget)
    else:
        if config.budget == "uniform":
            weights = [1.0] * len(active)
        else:
            weights = [layers[i].analysis.fit.bulk_fraction ** config.budget_power for i in active]  # type: ignore[union-attr]
        got = proportional_counts([layers[i].numel for i in active], floors, caps, weights, budget)
    counts = [layer.pruned for layer in layers]
    for j, i in enumerate(active):
        counts[i] = max(got[j], floors[j])
    return counts, wanted


def _layer_record(layer: _Layer) -> LayerSparsity:
    w = layer.module.weight
    a = layer.analysis
    fit = a.fit if a is not None else None
    mask = get_mask(layer.module)
    nnz_after = layer.numel if mask is None else int(mask.sum())
    sparse = mask is not None and nnz_after < layer.numel
    kind = (
        ("factored+sparse" if sparse else "factored")
        if layer.factored_parent
        else ("sparse" if sparse else "dense")
    )
    reason = ""
    if a is None:
        reason = "no fit needed by this budget"
    elif a.verdict != "fit":
        reason = (
            f"left dense: {a.message or a.verdict}" if nnz_after == layer.numel else (a.message or a.verdict)
        )
    if layer.factored_parent:
        reason = (reason + "; " if reason else "") + f"factor of low-rank layer '{layer.factored_parent}'"
    sv = layer.sv_info or {}
    return LayerSparsity(
        name=layer.name,
        layer_type=type(layer.module).__name__,
        kind=kind,
        shape=[int(v) for v in w.shape],
        dtype=str(w.dtype).replace("torch.", ""),
        verdict=a.verdict if a is not None else "not-fitted",
        reason=reason,
        params=layer.numel,
        nnz_before=layer.nnz_before,
        nnz_after=nnz_after,
        n_spikes=fit.n_spikes if fit is not None else None,
        n_bulk=fit.n_bulk if fit is not None else None,
        ks=fit.ks if fit is not None else None,
        s_plus=fit.s_plus if fit is not None else None,
        sigma=layer.sigma if math.isfinite(layer.sigma) else None,
        score=fit.bulk_fraction if fit is not None else None,
        sv_zeroed_u=sv.get("zeroed_u"),
        sv_zeroed_v=sv.get("zeroed_v"),
        sv_rel_change=sv.get("rel_change"),
    )


def _achieved(layers: list[_Layer]) -> float:
    total = sum(layer.numel for layer in layers)
    return sum(layer.pruned for layer in layers) / total if total else 0.0


def _check_config(config: SparsifyConfig | None) -> SparsifyConfig:
    if config is None:
        return SparsifyConfig()
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    config.__post_init__()  # fields may have been changed after construction
    return config


def _prepare(model: nn.Module, config: SparsifyConfig, show: bool | None) -> tuple[list[_Layer], list[str]]:
    layers, skipped, unmatched = _select(model, config)
    warnings = skipped + unmatched
    if not layers:
        raise ValueError(
            f"no prunable layer (Linear/Conv1d/Conv2d) selected by include={config.include} "
            f"exclude={config.exclude}" + (f"; {skipped[0]}" if skipped else "")
        )
    for layer in layers:
        if not bool(torch.isfinite(layer.module.weight.detach()).all()):
            raise InvalidWeightsError(f"layer {layer.name!r} weight contains NaN or Inf")
        layer.nnz_before = layer.numel - layer.pruned
    if config.budget in _RMT_BUDGETS or config.sv_sparsify:
        _analyze_all(layers, config, show)
    return layers, warnings


def _report(
    model: nn.Module, layers: list[_Layer], config: SparsifyConfig, target: float, wanted: int, dry: bool
) -> SparsifyReport:
    records = [_layer_record(layer) for layer in layers]
    selected = sum(r.params for r in records)
    nnz = sum(r.nnz_after for r in records)
    counts = count_nonzeros(model)
    warnings = []
    achieved_count = selected - nnz
    if achieved_count != wanted:
        warnings.append(
            f"target={target:.4f} asks for {wanted:,} pruned weights, got {achieved_count:,} "
            f"({achieved_count / max(selected, 1):.2%}): "
            + (
                "the model was already sparser (masks only grow)"
                if achieved_count > wanted
                else "layers left dense or capped at max_layer_sparsity cannot absorb the rest"
            )
        )
    dense = [r.name for r in records if r.verdict not in ("fit", "not-fitted") and r.nnz_after == r.params]
    dense += [r.name for r in records if r.verdict == "fit" and r.sigma is None and r.nnz_after == r.params]
    if dense and config.budget in _RMT_BUDGETS:
        warnings.append(f"{len(dense)} layer(s) left dense without an accepted MP fit: {', '.join(dense)}")
    return SparsifyReport(
        target=target,
        budget=config.budget,
        achieved=achieved_count / selected if selected else 0.0,
        selected_params=selected,
        selected_nnz=nnz,
        total_params=counts["total"],
        stored_values=counts["stored"],
        layers=records,
        warnings=warnings,
        config=config.to_dict(),
        dry_run=dry,
    )


def plan_sparsity(
    model: nn.Module, config: SparsifyConfig | None = None, show: bool | None = None
) -> SparsifyReport:
    """Dry run: fits and per-layer budgets at the final target on the current weights; the model is untouched.

    Step 1 (which changes magnitudes slightly) and fine-tuning are not run, so the counts of the
    real run can differ a little under the ``noise`` and ``global`` budgets.
    """
    config = _check_config(config)
    layers, select_warnings = _prepare(model, config, show)
    counts, wanted = _allocate(layers, config, config.target)
    records = []
    for layer, k in zip(layers, counts, strict=True):
        rec = _layer_record(layer)
        rec.nnz_after = layer.numel - k
        if k and rec.kind in ("dense", "factored"):
            rec.kind = "factored+sparse" if layer.factored_parent else "sparse"
        records.append(rec)
    report = _report(model, layers, config, config.target, wanted, dry=True)
    report.layers = records
    report.selected_nnz = sum(r.nnz_after for r in records)
    report.achieved = 1 - report.selected_nnz / report.selected_params
    report.stored_values = report.total_params - sum(r.params - r.nnz_after for r in records)
    report.warnings = select_warnings + [w for w in report.warnings if not w.startswith("target=")]
    pruned = report.selected_params - report.selected_nnz
    if pruned != wanted:
        report.warnings.insert(
            0, f"target={config.target:.4f} asks for {wanted:,} pruned weights, plan reaches {pruned:,}"
        )
    return report


def sparsify(
    model: nn.Module,
    config: SparsifyConfig | None = None,
    *,
    data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    show_progress: bool | None = None,
) -> tuple[nn.Module, SparsifyReport]:
    """Sparsify ``model`` in place (and return it) with RMT-guided budgets; see the module docstring.

    Parameters
    ----------
    model : any ``nn.Module``; its Linear/Conv1d/Conv2d weights (factors of low-rank layers
        included) selected by ``config.include``/``exclude`` are pruned.
    config : :class:`SparsifyConfig` (defaults if None).
    data : re-iterable of ``(inputs, targets)`` training batches (or a zero-argument callable
        returning one); enables the regularised fine-tuning per cycle and the final fine-tune.
    loss_fn : ``loss(outputs, targets)``, default cross-entropy.
    eval_data : batches to measure loss/top-1 accuracy on before, after each cycle and at the end.

    Returns
    -------
    ``(model, report)``. Pruned entries are zero and each pruned layer carries a boolean mask
    buffer (:mod:`rmtprune.masks`). On any error the model's weights and masks are restored.
    """
    config = _check_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if data is not None and (config.cycle_steps > 0 or config.finetune_epochs > 0):
        check_lr(config.lr, model.parameters())  # before any work: lr=1e308 overflows float32 weights
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old_masks = {k: v.clone() for k, v in masks_of(model).items()}
    try:
        return _sparsify(model, config, data, loss_fn, eval_data, show_progress)
    except BaseException:
        with torch.no_grad():
            model.load_state_dict(snapshot)
        remove_masks(model)
        restore_masks(model, old_masks)
        raise


def _sparsify(
    model: nn.Module,
    config: SparsifyConfig,
    data: Any,
    loss_fn: Any,
    eval_data: Any,
    show: bool | None,
) -> tuple[nn.Module, SparsifyReport]:
    layers, select_warnings = _prepare(model, config, show)
    eval_before = evaluate(model, eval_data, loss_fn) if eval_data is not None else None
    if config.sv_sparsify:
        _sv_step(layers, config, show)
    cycles = []
    wanted = 0
    for c in range(1, config.n_cycles + 1):
        t = config.target * c / config.n_cycles
        if config.refit and c > 1:
            _analyze_all(layers, config, show=False)
        counts, wanted = _allocate(layers, config, t)
        for layer, k in zip(layers, counts, strict=True):
            old = get_mask(layer.module)
            if k == 0 and old is None:
                continue
            set_mask(layer.module, _magnitude_mask(layer.module.weight, old, k))
        record: dict[str, Any] = {"cycle": c, "target": t, "achieved": _achieved(layers), "finetune": None}
        if data is not None and config.cycle_steps > 0:
            ft = finetune(
                model,
                data,
                steps=config.cycle_steps,
                lr=config.lr,
                l1=config.l1,
                l2=config.l2,
                group_lasso=config.group_lasso,
                loss_fn=loss_fn,
                schedule=config.schedule,
                warmup=config.warmup,
            )
            record["finetune"] = ft.to_dict()
        record["eval"] = evaluate(model, eval_data, loss_fn) if eval_data is not None else None
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
    report = _report(model, layers, config, config.target, wanted, dry=False)
    report.warnings = select_warnings + report.warnings
    report.cycles = cycles
    report.final_finetune = final
    report.eval_before = eval_before
    report.eval_after = evaluate(model, eval_data, loss_fn) if eval_data is not None else None
    return model, report
