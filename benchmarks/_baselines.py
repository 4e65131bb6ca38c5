"""Compression baselines for the real-model harness, each implemented from its paper (issue 12).

Every method has the signature ``fn(model, keep_fraction, layer_names, calib)`` and modifies
``model`` in place so that the named linear layers (``nn.Linear`` and transformers' GPT-2
``Conv1D``) together store ``keep_fraction`` of their weight parameters; biases are never cut and
always count in full. :func:`stored_params` counts parameters as stored (a factored layer
``r * (m + n)``, a sparse one its nonzeros, plus the bias), :func:`budget` is the target.

- ``magnitude``: global magnitude pruning over all named weights with ``torch.nn.utils.prune``
  (``global_unstructured``, L1), then ``prune.remove`` so the weights hold the zeros.
- ``wanda``: Wanda, Sun et al. 2023, arXiv:2306.11695: score ``|W_ij| * ||X_j||_2``, the same
  fraction pruned in every output row of every layer.
- ``uniform_rank``: truncated SVD of every layer at one common parameter ratio (Eckart-Young).
- ``svd_llm``: SVD-LLM, Wang et al. 2024, arXiv:2403.07378: truncation-aware data whitening. With
  ``S`` the Cholesky factor of the input second moment ``X X^T = S S^T``, the output error of any
  ``W'`` is ``||(W - W') X||_F = ||(W - W') S||_F``, so truncating the SVD of ``W S`` and
  un-whitening gives the rank-``r`` matrix with the smallest output error on the calibration data.
- ``asvd``: ASVD, Yuan et al. 2023, arXiv:2312.05821: activation-aware SVD, columns scaled by
  ``S_j = (mean |x_j|)^alpha`` (``alpha = 0.5``) before truncation and un-scaled after.

Ranks (all three low-rank methods): one ratio ``c`` for every layer, ``r = floor(c * m n / (m + n))``,
``c = keep_fraction`` unless some layers cannot be factored (see :func:`allocate_ranks`); the few
parameters left by the floors go to single extra ranks, so the total is within one rank step of the
budget and never above it. ``keep_fraction = 1.0`` leaves every layer dense (a factored layer at the
full budget would hold ``m n / (m + n)`` of ``min(m, n)`` singular values for the same storage).

Not reproduced (one-shot baselines on statistics of the dense model): Wanda's and SVD-LLM's
layer-by-layer recalibration on the outputs of already compressed layers, SVD-LLM's LoRA-style
parameter update after truncation and ASVD's sensitivity-based per-layer rank search.

Calibration (:func:`collect_calibration`) is :func:`rmtprune.calibration.collect` (the library's
one pass, also what ``rmtprune.compress(calibration=...)`` reads): each layer's input through float64
accumulators, ``X^T X`` (``n x n``), ``sum |x|`` and the token count, so memory does not depend on
the amount of data; padding tokens are left out when a batch carries an ``attention_mask``.
:func:`from_calibration` views a library ``Calibration`` as the baselines' :class:`CalibStats`
without copying, so one pass feeds the library's methods and the baselines alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

from rmtprune.calibration import Calibration, collect
from rmtprune.layers import LayerHandler, LinearHandler, collect_layers, handler_for
from rmtprune.lowrank import LowRankLinear, LowRankModule

__all__ = [
    "LayerStats",
    "CalibStats",
    "collect_calibration",
    "from_calibration",
    "stored_params",
    "dense_counts",
    "budget",
    "allocate_ranks",
    "whitening",
    "magnitude",
    "wanda",
    "uniform_rank",
    "svd_llm",
    "asvd",
    "METHODS",
    "NEEDS_CALIB",
]

Batch = Mapping[str, torch.Tensor] | torch.Tensor


# --------------------------------------------------------------------------------------------------
# calibration statistics


@dataclass
class LayerStats:
    """Streaming statistics of one layer's input ``x`` (``n`` channels) over ``tokens`` rows.

    ``xtx`` is ``sum_t x_t x_t^T`` (``n x n``, float64), ``abs_sum`` is ``sum_t |x_t|`` (``n``).
    """

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @property
    def second_moment(self) -> torch.Tensor:
        """``X^T X / tokens``: the input's uncentred covariance (float64)."""
        return self.xtx / max(self.tokens, 1)

    @property
    def l2_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens, per input channel (Wanda's activation norm)."""
        return torch.sqrt(torch.diagonal(self.xtx).clamp_min(0))

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean_t |x_tj|`` per input channel (ASVD's ``abs_mean`` scaling)."""
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class CalibStats:
    """Calibration statistics of the named layers, by layer name (:func:`collect_calibration`)."""

    layers: dict[str, LayerStats]

    def __getitem__(self, name: str) -> LayerStats:
        try:
            return self.layers[name]
        except KeyError:
            raise ValueError(f"no calibration statistics for layer {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers


def from_calibration(calibration: Calibration) -> CalibStats:
    """The truncation statistics (``calibration.fit``) of a library ``Calibration``, as :class:`CalibStats`.

    The tensors are shared, not copied; the guard's held-out statistics are not part of it.
    """
    if not isinstance(calibration, Calibration):
        raise TypeError(
            f"calibration must be an rmtprune.calibration.Calibration, got {type(calibration).__name__}"
        )
    return CalibStats({name: LayerStats(st.xtx, st.abs_sum, st.rows) for name, st in calibration.fit.items()})


def collect_calibration(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Sequence[Batch],
    *,
    matmul_dtype: torch.dtype = torch.float64,
) -> CalibStats:
    """Input statistics of the named linear layers over ``batches`` (model in eval mode, no grad).

    :func:`rmtprune.calibration.collect` with nothing held out. A batch is a dict
    (``model(**batch)``) or a tensor (``model(batch)``), moved to the model's device. When a dict
    holds an ``attention_mask``, only the rows it marks (non-padding tokens) are counted. Layers fed
    the same input tensor one after the other (q/k/v, gate/up) compute the product once. ``X^T X``
    costs ``2 n^2`` flops per token and layer; ``matmul_dtype=torch.float32`` computes each batch's
    product in float32 (about 3x faster on CPU) before adding it to the float64 accumulator.
    """
    names = [name for name, _, _ in _linear_layers(model, layer_names)]
    if len(batches) == 0:
        raise ValueError("batches is empty: calibration needs at least one batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) and not torch.is_tensor(batch):
            raise TypeError(f"batch {i} is a {type(batch).__name__}: expected a dict or a Tensor")
    try:
        cal = collect(model, batches, layers=names, held_out=0, matmul_dtype=matmul_dtype)
    except ValueError as exc:
        raise ValueError(str(exc).replace("saw no calibration input", "saw no calibration tokens")) from None
    return from_calibration(cal)


# --------------------------------------------------------------------------------------------------
# layers, counts and budgets


def _linear_layers(
    model: nn.Module, layer_names: Sequence[str], check_cuttable: bool = True
) -> list[tuple[str, nn.Module, LayerHandler]]:
    """``(name, module, handler)`` of each named dense linear layer; a clear ValueError otherwise."""
    if isinstance(layer_names, str) or not all(isinstance(n, str) for n in layer_names):
        raise TypeError(f"layer_names={layer_names!r} must be a list of layer names")
    if len(layer_names) == 0:
        raise ValueError("layer_names is empty: name at least one linear layer")
    if len(set(layer_names)) != len(layer_names):
        dup = next(n for n in layer_names if list(layer_names).count(n) > 1)
        raise ValueError(f"layer {dup!r} is named twice")
    reasons = {e.name: e.reason for e in collect_layers(model)} if check_cuttable else {}
    out = []
    for name in layer_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} is not in the model") from None
        if isinstance(module, LowRankModule):
            raise ValueError(f"layer {name!r} is already factored (rank {module.rank})")
        h = handler_for(module)
        if not isinstance(h, LinearHandler):
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}, not a linear layer (nn.Linear or "
                "transformers' Conv1D)"
            )
        if reasons.get(name):
            raise ValueError(f"layer {name!r} cannot be compressed: {reasons[name]}")
        out.append((name, module, h))
    return out


def _check_keep(keep_fraction: float) -> float:
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)):
        raise TypeError(f"keep_fraction={keep_fraction!r} must be a number in (0, 1]")
    if not (math.isfinite(keep_fraction) and 0 < keep_fraction <= 1):
        raise ValueError(f"keep_fraction={keep_fraction!r} must be in (0, 1]")
    return float(keep_fraction)


def _bias_numel(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else int(bias.numel())


def stored_params(model: nn.Module, layer_names: Sequence[str]) -> int:
    """Parameters of the named layers as stored.

    Factored (:class:`rmtprune.LowRankModule`): ``r * (m + n)``; dense or sparse linear: nonzero
    weights (``m * n`` when dense); plus the bias in full.
    """
    total = 0
    for name in layer_names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankModule):
            m, n = module.matrix_shape
            total += module.rank * (m + n)
        elif isinstance(handler_for(module), LinearHandler):
            total += int(torch.count_nonzero(module.weight.detach()))
        else:
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a linear or factored layer")
        total += _bias_numel(module)
    return total


def dense_counts(model: nn.Module, layer_names: Sequence[str]) -> tuple[int, int]:
    """``(weights, biases)``: the named dense layers' ``sum m * n`` and bias entries."""
    layers = _linear_layers(model, layer_names, check_cuttable=False)
    weights = sum(math.prod(h.matrix_shape(mod)) for _, mod, h in layers)
    return weights, sum(_bias_numel(mod) for _, mod, _ in layers)


def budget(model: nn.Module, layer_names: Sequence[str], keep_fraction: float) -> int:
    """The stored parameters every method aims at: ``round(keep * weights) + biases`` (dense model)."""
    keep = _check_keep(keep_fraction)
    weights, biases = dense_counts(model, layer_names)
    return round(keep * weights) + biases


def allocate_ranks(shapes: Sequence[tuple[int, int]], keep_fraction: float) -> list[int | None]:
    """One common parameter ratio for all layers: the rank of each ``m x n`` layer, None = dense.

    A layer is factored at ``r = floor(c * m n / (m + n))`` (at least 1, at most the largest rank
    that stores fewer than ``m n``). ``c = keep_fraction`` when every layer can be factored; a layer
    where even rank 1 does not pay (``m + n >= m n``: a single output or input) stays dense, and
    ``c`` is lowered so that the others meet the budget ``keep * sum(m n)`` instead. Then the
    parameters left by the floors are given out as single extra ranks, largest remainder first:
    the total is at most the budget and within one rank step (``m + n``) of it. ``keep = 1``:
    every layer dense. ValueError when the budget cannot give every factored layer rank 1.
    """
    keep = _check_keep(keep_fraction)
    if keep == 1.0:
        return [None] * len(shapes)
    target = keep * sum(m * n for m, n in shapes)
    idx = [i for i, (m, n) in enumerate(shapes) if m + n < m * n]
    left = target - sum(m * n for m, n in shapes if m + n >= m * n)
    floor_cost = sum(shapes[i][0] + shapes[i][1] for i in idx)
    if not idx or left < floor_cost:
        raise ValueError(
            f"keep_fraction={keep} is too small: the layers that can be factored need at least "
            f"{floor_cost} parameters at rank 1, the budget leaves {max(int(left), 0)}"
        )
    ratio = {i: shapes[i][0] * shapes[i][1] / (shapes[i][0] + shapes[i][1]) for i in idx}
    cap = {i: math.ceil(ratio[i]) - 1 for i in idx}  # largest r with r (m + n) < m n

    def ranks_at(c: float) -> dict[int, int]:
        return {i: min(cap[i], max(1, math.floor(c * ratio[i]))) for i in idx}

    def cost(ranks: dict[int, int]) -> int:
        return sum(r * (shapes[i][0] + shapes[i][1]) for i, r in ranks.items())

    lo, hi = 0.0, 1.0  # cost(ranks_at(0)) = floor_cost <= left; find the largest c within budget
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks_at(mid)) <= left else (lo, mid)
    ranks = ranks_at(lo)
    spare = left - cost(ranks)
    order = sorted(idx, key=lambda i: (-(lo * ratio[i] - math.floor(lo * ratio[i])), i))
    for i in order:
        step = shapes[i][0] + shapes[i][1]
        if ranks[i] < cap[i] and step <= spare:
            ranks[i] += 1
            spare -= step
    return [ranks.get(i) for i in range(len(shapes))]


# --------------------------------------------------------------------------------------------------
# sparse methods


def magnitude(
    model: nn.Module, keep_fraction: float, layer_names: Sequence[str], calib: CalibStats | None = None
) -> None:
    """Global magnitude pruning: the smallest ``|W_ij|`` over all named layers set to zero, in place.

    ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, then ``prune.remove``
    (the weights hold the zeros, no mask or hook is left). ``calib`` is not used.
    """
    keep = _check_keep(keep_fraction)
    layers = _linear_layers(model, layer_names)
    total = sum(mod.weight.numel() for _, mod, _ in layers)
    amount = total - round(keep * total)
    if amount == 0:
        return
    params = [(mod, "weight") for _, mod, _ in layers]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for mod, _ in params:
        prune.remove(mod, "weight")


def wanda(
    model: nn.Module, keep_fraction: float, layer_names: Sequence[str], calib: CalibStats | None = None
) -> None:
    """Wanda (Sun et al. 2023, arXiv:2306.11695): prune by ``|W_ij| * ||X_j||_2`` per output row, in place.

    Every output row of every layer keeps ``round(keep * n)`` weights (``n`` inputs): the paper's
    per-output comparison group with uniform sparsity across layers. ``||X_j||_2`` is the norm of
    input channel ``j`` over the calibration tokens (``calib``, required).
    """
    keep = _check_keep(keep_fraction)
    layers = _linear_layers(model, layer_names)
    stats = _require_calib(calib, layers, "wanda")
    new = {}
    for name, mod, h in layers:
        W = h.matrix(mod).detach()
        m, n = W.shape
        n_prune = n - round(keep * n)
        if n_prune == 0:
            continue
        norm = stats[name].l2_norm.to(device=W.device)
        score = W.abs().to(torch.float64) * norm[None, :]
        drop = torch.sort(score, dim=1, stable=True).indices[:, :n_prune]
        new[name] = W.clone().scatter_(1, drop, 0)
    for name, mod, h in layers:
        if name in new:
            h.write_dense(mod, new[name])


def _require_calib(
    calib: CalibStats | None, layers: list[tuple[str, nn.Module, LayerHandler]], method: str
) -> CalibStats:
    if not isinstance(calib, CalibStats):
        raise ValueError(f"{method} needs calibration statistics (collect_calibration), got {calib!r}")
    for name, mod, h in layers:
        n = h.matrix_shape(mod)[1]
        st = calib[name]
        if st.xtx.shape != (n, n) or st.tokens <= 0:
            raise ValueError(
                f"calibration statistics of layer {name!r} are for {st.xtx.shape[0]} inputs and "
                f"{st.tokens} tokens; the layer has {n} inputs"
            )
    return calib


# --------------------------------------------------------------------------------------------------
# low-rank methods

#: ``(W, stats, rank) -> (A, B)``: ``W`` the ``m x n`` float64 weight, ``A`` ``m x r``, ``B`` ``r x n``.
Factorizer = Callable[[torch.Tensor, "LayerStats | None", int], tuple[torch.Tensor, torch.Tensor]]


def _svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (a wide matrix through its transpose, LAPACK's fast path)."""
    if M.shape[0] < M.shape[1]:
        U, s, Vh = torch.linalg.svd(M.T, full_matrices=False)
        return Vh.T, s, U.T
    return torch.linalg.svd(M, full_matrices=False)


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the rank-``r`` truncation: ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``."""
    root = s[:r].sqrt()
    return U[:, :r] * root[None, :], root[:, None] * Vh[:r]


def _plain_factors(W: torch.Tensor, stats: LayerStats | None, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _split(*_svd(W), r)


def whitening(xtx: torch.Tensor, max_tries: int = 12) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor ``S`` of ``X^T X`` (``S S^T``), and the damping ``lambda`` it needed.

    SVD-LLM (arXiv:2403.07378) whitens with the Cholesky factor of the input second moment; when
    that is singular (fewer tokens than inputs, dead channels), ``lambda * mean(diag)`` is added to
    the diagonal, ``lambda`` = 1e-10, 1e-9, ... until the factorisation succeeds.
    """
    scale = float(torch.diagonal(xtx).mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"input second moment has mean diagonal {scale}: the layer saw no signal")
    S, info = torch.linalg.cholesky_ex(xtx)
    lam = 0.0
    for k in range(max_tries):
        if int(info) == 0 and bool(torch.isfinite(S).all()):
            return S, lam
        lam = 10.0 ** (k - 10)
        eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
        S, info = torch.linalg.cholesky_ex(xtx + lam * scale * eye)
    if int(info) == 0:
        return S, lam
    raise ValueError(f"input second moment is not positive definite even with damping {lam}")


def _svd_llm_factors(damped: list[float]) -> Factorizer:
    def factors(W: torch.Tensor, stats: LayerStats | None, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        S, lam = whitening(stats.second_moment.to(W.device))
        A, Bw = _split(*_svd(W @ S), r)
        B = torch.linalg.solve_triangular(S, Bw, upper=False, left=False)  # B S = Bw: B = Bw S^-1
        if lam:
            damped.append(lam)
        return A, B

    return factors


def _asvd_factors(alpha: float) -> Factorizer:
    def factors(W: torch.Tensor, stats: LayerStats | None, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = stats.mean_abs.to(W.device) ** alpha
        if float(s.max()) <= 0:
            raise ValueError("every input channel has mean |x| = 0: nothing to scale by")
        # ASVD adds 1e-6 to avoid dividing by a dead channel; here relative to the largest scale.
        s = s.clamp_min(1e-6 * float(s.max()))
        A, Bs = _split(*_svd(W * s[None, :]), r)
        return A, Bs / s[None, :]

    return factors


def _factor_layers(
    model: nn.Module,
    keep_fraction: float,
    layer_names: Sequence[str],
    calib: CalibStats | None,
    factorize: Factorizer,
    method: str,
    needs_calib: bool = True,
) -> None:
    """Replace each named layer by the factored layer ``factorize`` gives at its allocated rank.

    All factors are built before the first swap: on an error the model is left unchanged.
    """
    keep = _check_keep(keep_fraction)
    layers = _linear_layers(model, layer_names)
    if needs_calib:
        calib = _require_calib(calib, layers, method)
    ranks = allocate_ranks([h.matrix_shape(mod) for _, mod, h in layers], keep)
    built: list[tuple[str, nn.Module]] = []
    for (name, mod, h), r in zip(layers, ranks, strict=True):
        if r is None:
            continue
        W = h.matrix(mod).detach().to(torch.float64)
        A, B = factorize(W, calib[name] if needs_calib else None, r)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{method}: the factors of layer {name!r} are not finite")
        ref = mod.weight
        bias = None if mod.bias is None else mod.bias.detach()
        new = LowRankLinear.from_factors(
            A.to(device=ref.device, dtype=ref.dtype),
            B.to(device=ref.device, dtype=ref.dtype),
            bias,
            original_type=type(mod).__name__,
        )
        new.train(mod.training)
        built.append((name, new))
    for name, new in built:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def uniform_rank(
    model: nn.Module, keep_fraction: float, layer_names: Sequence[str], calib: CalibStats | None = None
) -> None:
    """Truncated SVD of every named layer at one common parameter ratio (:func:`allocate_ranks`), in place.

    The rank-``r`` truncation is the best rank-``r`` approximation of ``W`` in Frobenius norm
    (Eckart-Young); ``calib`` is not used. Layers become :class:`rmtprune.LowRankLinear`.
    """
    _factor_layers(model, keep_fraction, layer_names, None, _plain_factors, "uniform_rank", False)


def svd_llm(
    model: nn.Module, keep_fraction: float, layer_names: Sequence[str], calib: CalibStats | None = None
) -> None:
    """SVD-LLM (Wang et al. 2024, arXiv:2403.07378): truncation-aware data whitening, in place.

    ``S`` = Cholesky factor of the input second moment (:func:`whitening`), SVD of ``W S``,
    truncation at the rank of :func:`allocate_ranks`, ``W' = U_r Sigma_r V_r^T S^{-1}`` stored as
    ``A = U_r Sigma_r^(1/2)``, ``B = Sigma_r^(1/2) V_r^T S^{-1}``. ``W'`` minimises the output error
    ``||(W - W') X||_F`` on the calibration data over all rank-``r`` matrices. A warning names the
    layers whose covariance needed damping.
    """
    damped: list[float] = []
    _factor_layers(model, keep_fraction, layer_names, calib, _svd_llm_factors(damped), "svd_llm")
    if damped:
        warnings.warn(
            f"svd_llm: {len(damped)} layer(s) had a singular input second moment and were whitened "
            f"with damping up to {max(damped):g} * mean(diag)",
            stacklevel=2,
        )


def asvd(
    model: nn.Module,
    keep_fraction: float,
    layer_names: Sequence[str],
    calib: CalibStats | None = None,
    alpha: float = 0.5,
) -> None:
    """ASVD (Yuan et al. 2023, arXiv:2312.05821): activation-aware SVD, in place.

    Columns scaled by ``S_j = (mean_t |x_tj|)^alpha`` (the paper's ``abs_mean`` scaling, ``alpha``
    0.5), SVD of ``W diag(S)``, truncation at the rank of :func:`allocate_ranks`, then un-scaled:
    ``W' = U_r Sigma_r V_r^T diag(S)^{-1}``.
    """
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0")
    _factor_layers(model, keep_fraction, layer_names, calib, _asvd_factors(float(alpha)), "asvd")


#: The baselines by name: ``fn(model, keep_fraction, layer_names, calib)``, in place.
METHODS: dict[str, Callable[[nn.Module, float, Sequence[str], CalibStats | None], None]] = {
    "magnitude": magnitude,
    "wanda": wanda,
    "uniform_rank": uniform_rank,
    "svd_llm": svd_llm,
    "asvd": asvd,
}

#: Methods that need :func:`collect_calibration` statistics.
NEEDS_CALIB = frozenset({"wanda", "svd_llm", "asvd"})
