"""Plan and apply low-rank compression of a model, and undo it: plan, apply, compress, densify.

The pipeline is :func:`rmtprune.analyze` (spectra and fits, :mod:`rmtprune.analysis`), then
:func:`plan` (the rank rule per layer -> a :class:`~rmtprune.plan_record.Plan`; the model is not
touched), then :func:`apply` (replace each layer to factor by a :mod:`rmtprune.lowrank` module, in
place, restoring everything if anything fails). :func:`compress` is the two together, computing
each layer's SVD once. :func:`densify` is the inverse and :func:`is_compressed` the check, as
``torch.nn.utils.prune`` has ``remove`` and ``is_pruned``.

Which layer types are prunable, and how, is the registry of :mod:`rmtprune.layers`; which layer is
the model's output (kept by ``protect_last``) is :func:`rmtprune.layers.output_layer`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._hf_guard import guard_save_pretrained
from ._progress import progress as _progress
from ._validate import check_fields
from .allocation import Candidate, allocate
from .analysis import LayerAnalysis, analyze
from .calibration import Calibration, _held_out_rule, collect, whitening_factor
from .config import CompressionConfig, unmatched_patterns
from .errors import InvalidWeightsError, RmtpruneError, first_line
from .layers import (  # noqa: F401  (LinearHandler, TransposedLinearHandler: old import path, kept one release)
    LayerEntry,
    LayerHandler,
    LinearHandler,
    TransposedLinearHandler,
    collect_layers,
    handler_for,
    parametrized,
    register_handler,
    supported_types,
)
from .lowrank import LowRankLinear, LowRankModule
from .masks import is_sparsified, remove_masks
from .plan_record import ACTIONS, LayerPlan, Plan
from .sequential import block_moments
from .spectral import whitened_noise_edge
from .spectral.rules import gavish_donoho_omega

__all__ = [
    "ACTIONS",
    "LayerPlan",
    "Plan",
    "plan",
    "apply",
    "compress",
    "densify",
    "is_compressed",
    "LayerHandler",
    "register_handler",
    "handler_for",
]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ====================================================================== planning
def _positions(model: nn.Module, entries: list[LayerEntry], example_input: Any) -> dict[str, int]:
    """Output positions per sample of each entry, from one forward pass on ``example_input``."""
    found: dict[str, int] = {}
    hooks = []
    batch = [1]

    def make_hook(name: str, m_out: int) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.numel() and m_out:
                found[name] = int(out.numel() // (m_out * batch[0]))

        return hook

    for e in entries:
        if e.handler is not None and not e.reason:
            m = e.handler.matrix_shape(e.module)[0]
            hooks.append(e.module.register_forward_hook(make_hook(e.name, m)))
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        if isinstance(inputs[0], torch.Tensor) and inputs[0].ndim > 0:
            batch[0] = int(inputs[0].shape[0]) or 1
        with torch.no_grad():
            try:
                model(*inputs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shape = tuple(inputs[0].shape) if isinstance(inputs[0], torch.Tensor) else "?"
                raise ValueError(
                    f"the example input of shape {shape} does not fit the model ({first_line(exc, 200)}); "
                    "check --input-shape"
                ) from None
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    return found


def _warn_unmatched(config: CompressionConfig, names: list[str]) -> list[str]:
    out = unmatched_patterns(
        names, "layer", include=config.include, exclude=config.exclude, override=list(config.overrides)
    )
    for msg in out:
        warnings.warn(msg, UserWarning, stacklevel=3)
    return out


def _check_finite(entries: list[LayerEntry]) -> None:
    for e in entries:
        for w in e.handler.weights(e.module):
            if not bool(torch.isfinite(w.detach()).all()):
                raise InvalidWeightsError(
                    f"layer {e.name!r} has NaN or Inf weights; the model was not changed"
                )


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plan_layer(
    la: LayerAnalysis, cfg: CompressionConfig, positions: int | None, protected: str
) -> LayerPlan:
    """The decision for one analysed layer: the rule's rank, then factor / dense-truncate / keep.

    ``protected`` says why the layer is the model's output layer when ``protect_last`` keeps it
    ("" otherwise): its action can only be ``keep``; the reason still says what the rule found.
    """
    h, mod = la.handler, la.module
    m, n = la.matrix_shape
    k_now = la.rank
    w_now = k_now * (m + n) if la.factored else m * n
    params_now = _param_count(mod)
    lp = LayerPlan(
        name=la.name,
        layer_type=la.layer_type,
        shape=la.shape,
        matrix_shape=(m, n),
        action="keep",
        reason="",
        rank_before=k_now,
        rank=k_now,
        rule=cfg.rule,
        params_before=params_now,
        params_after=params_now,
        macs_before=None if positions is None else w_now * positions,
        macs_after=None if positions is None else w_now * positions,
        dtype=la.dtype,
        svd_dtype=cfg.svd_dtype,
    )
    if la.verdict == "too-small":
        lp.reason = la.message
        return lp
    fit = la.fit
    lp.fit = None if fit is None else fit.to_dict()
    rule = cfg.make_rule()
    if rule.gated and la.verdict != "fit":
        lp.reason = f"{la.message}; kept" if fit is None else f"no MP-like bulk ({la.message}); kept"
        return lp
    try:
        decision = rule.select(la.s, (m, n), fit=fit)
    except ValueError as exc:
        raise ValueError(f"{exc} for layer {la.name!r} (rule {cfg.rule!r})") from None
    lp.decision = decision.to_dict()
    k = min(max(decision.rank, cfg.min_rank), min(m, n))
    why = decision.reason + (f", raised to min_rank={cfg.min_rank}" if decision.rank < cfg.min_rank else "")
    action, lp.reason = _action(la, cfg, k, why)
    if action == "keep":
        return lp
    if protected:
        lp.reason = f"{lp.reason}; {protected} kept: protect_last=True"
        return lp
    w_after = k * (m + n) if action == "factor" else m * n
    lp.action, lp.rank = action, k
    if action == "factor":
        lp.params_after = w_after + (m if h.has_bias(mod) else 0)
    if positions is not None:
        lp.macs_after = w_after * positions
    if la.svd is not None and la.svd[0] is not None:
        U, s_t, Vh = la.svd
        lp._svd = (U[:, :k].clone(), s_t[:k].clone(), Vh[:k].clone(), _versions(h, mod))
    return lp


def _action(la: LayerAnalysis, cfg: CompressionConfig, k: int, why: str) -> tuple[str, str]:
    """What rank ``k`` means for the layer (``factor``, ``dense-truncate`` or ``keep``), and the reason."""
    m, n = la.matrix_shape
    k_now = la.rank
    if k > k_now or (k == k_now and (la.factored or cfg.factor_only_if_smaller)):
        return "keep", f"{why}; rank {k} >= current rank {k_now}: nothing to cut"
    if la.factored or k * (m + n) < m * n or not cfg.factor_only_if_smaller:
        return "factor", why
    if cfg.dense_truncate:
        return (
            "dense-truncate",
            f"{why}; k(m+n)={k * (m + n)} >= mn={m * n}: rank-{k} weight written back dense",
        )
    return "keep", f"{why}; k(m+n)={k * (m + n)} >= mn={m * n}: factoring would not save parameters; kept"


def _versions(h: LayerHandler, mod: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((id(w), w._version) for w in h.weights(mod))


def _skipped(la: LayerAnalysis) -> LayerPlan:
    n_params = _param_count(la.module)
    return LayerPlan(
        name=la.name,
        layer_type=la.layer_type,
        shape=la.shape,
        matrix_shape=la.matrix,
        action="skip",
        reason=la.message,
        params_before=n_params,
        params_after=n_params,
    )


# ====================================================================== a budget across layers
def _tall_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if M.shape[0] < M.shape[1]:
        U, s, Vh = torch.linalg.svd(M.T, full_matrices=False)
        return Vh.T, s, U.T
    return torch.linalg.svd(M, full_matrices=False)


def _dense_matrix(la: LayerAnalysis) -> torch.Tensor:
    """The layer's ``m x n`` matrix in float64 (a factored layer's product ``A @ B``)."""
    return _dense_matrix_of(la.handler, la.module)


def _dense_matrix_of(h: LayerHandler, mod: nn.Module) -> torch.Tensor:
    """:func:`_dense_matrix` of a module and its handler."""
    if h.factored:
        A, B = mod.factors()
        return (A.detach().to(torch.float64) @ B.detach().to(torch.float64)).cpu()
    return h.matrix(mod).detach().to(torch.float64).cpu()


def _gd_edge(s: np.ndarray, m: int, n: int, k: int | None = None) -> float:
    """Gavish-Donoho's unknown-noise threshold ``omega(beta) median(s)``: a layer's edge without an MP fit.

    Over the ``k`` values a factored layer holds (its cut values are zeros, which would make the
    median 0); 1.0 for an all-zero layer (every score is then 0 whatever the edge).
    """
    vals = np.asarray(s[: k if k else len(s)], dtype=np.float64)
    vals = vals[vals > 0]
    if vals.size == 0:
        return 1.0
    return float(gavish_donoho_omega(min(m, n) / max(m, n)) * np.median(vals))


class _Layer:
    """One layer of a budgeted plan: its truncation-space SVD, noise edge and candidate."""

    def __init__(
        self,
        la: LayerAnalysis,
        cfg: CompressionConfig,
        positions: int | None,
        macs: bool,
        calib: Any,
        memo: dict[str, Any] | None = None,
    ) -> None:
        self.la = la
        m, n = la.matrix_shape
        self.m, self.n = m, n
        self.positions = positions  # output positions per sample (None: unknown), for the MACs record
        k_now = la.rank if la.rank is not None else min(m, n)
        fit = la.fit
        has_sigma = fit is not None and fit.sigma2 > 0
        gate = "accepted" if la.verdict == "fit" else f"refused by the gate ({la.message})"
        self.held = None
        if calib is None:
            self.truncation = "svd"
            if la.svd is not None and la.s is not None and len(la.s) == min(m, n):
                self.U, _, self.Vh = la.svd
                self.s = np.asarray(la.s, dtype=np.float64)
            else:  # not decomposed by the analysis (a layer too small to fit): cheap to do here
                self.U, s_t, self.Vh = _tall_svd(_dense_matrix(la))
                self.s = s_t.numpy()
            if has_sigma:
                self.edge, self.edge_how = float(fit.s_plus), f"BEMA edge, fit {gate}"
            else:
                self.edge = _gd_edge(self.s, m, n, k_now if la.factored else None)
                self.edge_how = "no MP fit: Gavish-Donoho median threshold"
            self.W = None
        else:
            self.truncation = "whitened"
            try:
                stats = calib[la.name]
            except ValueError:
                raise ValueError(f"the calibration has no statistics for layer {la.name!r}") from None
            if stats.n != n:
                raise ValueError(f"calibration of layer {la.name!r} has {stats.n} features, the layer {n}")
            C = stats.second_moment.cpu()
            memo = {} if memo is None else memo
            last = memo.get("C")
            # q/k/v (gate/up) read the same input: reuse the previous layer's Cholesky factor and
            # covariance spectrum when its moment is the same matrix (a third of the plan's time)
            same = last is not None and last.shape == C.shape and memo["damping"] == cfg.damping
            if not (same and torch.equal(last, C)):
                memo.clear()
                memo.update(C=C, damping=cfg.damping, factor=whitening_factor(C, cfg.damping))
            S, lam = memo["factor"]
            W = _dense_matrix(la)
            U, s_w, Vh = _tall_svd(W @ S)
            # un-whiten the right factor: B = Vh S^-1, so that W = U diag(s) B exactly
            self.Vh = torch.linalg.solve_triangular(S.T, Vh.T, upper=True).T
            self.U, self.s, self.W = U, s_w.numpy(), W
            if has_sigma:
                if "cov" not in memo:
                    eye = torch.eye(n, dtype=C.dtype)
                    memo["cov"] = torch.linalg.eigvalsh(C + lam * eye).clamp_min(0).numpy()
                cov = memo["cov"]
                self.edge = float(whitened_noise_edge(fit.sigma2, cov, (m, n), cfg.beta))
                self.edge_how = f"generalized-MP edge of the whitened noise, BEMA sigma2 from a fit {gate}"
            else:
                self.edge = _gd_edge(self.s, m, n, k_now if la.factored else None)
                self.edge_how = "no MP fit: Gavish-Donoho median threshold of the whitened spectrum"
            held = calib.held_out.get(la.name)
            if held is not None and held.rows > 0:
                # guard error at rank k in closed form: W - W_k = sum_{i>=k} u_i s_i b_i^T with
                # orthonormal u_i, so ||(W - W_k) x||^2 summed over the held-out rows is
                # sum_{i>=k} s_i^2 (b_i^T C_h b_i)
                Ch = held.second_moment.cpu()
                d = ((self.Vh @ Ch) * self.Vh).sum(1).clamp_min(0).numpy()
                e = self.s**2 * d
                self.held = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])  # tail sums from k
        n_spikes = int(np.count_nonzero(self.s > self.edge))
        if n_spikes == 0 and self.s.size and self.s[0] > 0:
            # Not one direction above the noise edge: by the edge alone the layer would be cut to
            # min_rank (a small ViT's patch embedding, whose 49 correlated pixel inputs put every
            # whitened direction under the generalized-MP edge, went to rank 2 and the model from
            # 87% to 12%). Such a layer is scored against its own largest value instead: its best
            # direction counts as one at the edge, and the rest compete from there.
            self.edge_how += f"; no direction above it ({self.edge:.4g}): scored against its own s_1"
            self.edge = float(self.s[0])
        self.cand = Candidate(
            la.name,
            self.s,
            m,
            n,
            positions=1 if not macs or positions is None else int(positions),
            min_rank=cfg.min_rank,
            max_rank=k_now,
            edge=self.edge,
            n_spikes=n_spikes,
            factored=la.factored,
        )

    def guard_error(self, k: int) -> float:
        """Relative output error ``||(W - W_k) x|| / ||W x||`` over the held-out calibration inputs."""
        total = float(self.held[0])
        return math.sqrt(max(float(self.held[k]), 0.0) / total) if total > 0 else 0.0


def _guard(layers: list[_Layer], ranks: dict[str, int], tol: float) -> dict[str, dict[str, Any]]:
    """Raise the rank of every layer whose held-out error exceeds ``tol`` (dense if need be).

    Layers without held-out statistics (never reached by the held-out batches) are not guarded.
    """
    changed = {}
    for ly in layers:
        c = ly.cand
        k = ranks[c.name]
        if ly.held is None or k >= c.max_rank or c.cost(k) >= c.dense:
            continue
        err = ly.guard_error(k)
        if err <= tol:
            continue
        new = next((j for j in range(k + 1, c.max_rank) if ly.guard_error(j) <= tol), c.max_rank)
        if c.cost(new) >= c.dense:
            new = c.max_rank
        changed[c.name] = {
            "rank": k,
            "error": err,
            "new_rank": new,
            "new_error": 0.0 if new >= c.max_rank else ly.guard_error(new),
        }
    return changed


def _budget_plan(
    analysis: Any,
    config: CompressionConfig,
    pos: dict[str, int],
    protected: str | None,
    calib: Calibration | None,
    keep_svd: bool,
    progress: bool | None,
) -> tuple[list[LayerPlan], dict[str, Any], list[str]]:
    """Every layer's rank from one budget (``target`` / ``target_macs``) and the allocation."""
    macs = config.target_macs is not None
    fraction = config.target_macs if macs else config.target
    out: list[LayerPlan | None] = []
    layers: list[_Layer] = []
    warns: list[str] = []
    work = [la for la in analysis]
    memo: dict[str, Any] = {}  # the last whitening, shared by layers reading the same input
    for la in _progress(work, total=len(work), desc="budget", enable=progress):
        if la.verdict == "skip":
            out.append(_skipped(la))
            continue
        cfg = config.for_layer(la.name)
        positions = pos.get(la.name, la.handler.default_positions(la.module))
        if la.name == protected:
            n_now = _param_count(la.module)
            mm, nn_ = la.matrix_shape
            w_now = None if positions is None else (la.rank * (mm + nn_) if la.factored else mm * nn_)
            out.append(
                LayerPlan(
                    name=la.name,
                    layer_type=la.layer_type,
                    shape=la.shape,
                    matrix_shape=la.matrix_shape,
                    action="keep",
                    reason=f"{analysis.output_reason}; kept outside the budget: protect_last=True",
                    rank_before=la.rank,
                    rank=la.rank,
                    rule=f"target:{config.allocation}",
                    fit=None if la.fit is None else la.fit.to_dict(),
                    params_before=n_now,
                    params_after=n_now,
                    macs_before=None if w_now is None else w_now * positions,
                    macs_after=None if w_now is None else w_now * positions,
                    dtype=la.dtype,
                    svd_dtype=cfg.svd_dtype,
                )
            )
            continue
        if macs and positions is None:
            raise ValueError(
                f"target_macs needs each layer's output size: layer {la.name!r} is a {la.layer_type}; "
                "give example_input (CLI: --input-shape)"
            )
        layers.append(_Layer(la, cfg, positions, macs, calib, memo))
        out.append(None)
    if not layers:
        raise RmtpruneError("no selected layer can take part in the budget")
    cands = [ly.cand for ly in layers]
    bias = {ly.la.name: (ly.m if ly.la.handler.has_bias(ly.la.module) else 0) for ly in layers}
    if macs:
        before = sum(c.cost(c.max_rank) for c in cands)
        budget = int(math.floor(fraction * before))
    else:
        before = sum(c.cost(c.max_rank) + bias[c.name] for c in cands)
        budget = int(math.floor(fraction * before)) - sum(bias.values())
    alloc = allocate(cands, budget, config.allocation)
    guard_log: list[dict[str, Any]] = []
    skipped: list[str] = []
    tol = config.guard if calib is not None and calib.held_out else None
    if config.guard is not None and calib is not None and not calib.held_out:
        warns.append("guard skipped: the calibration has no held-out slice (collect(..., held_out=))")
    if tol is not None:
        blind = [ly.la.name for ly in layers if ly.held is None]
        if blind:
            warns.append(
                f"guard: {len(blind)} layer(s) saw no held-out calibration input and are not guarded "
                f"({', '.join(blind[:5])}{', ...' if len(blind) > 5 else ''})"
            )
        by_name = {c.name: c for c in cands}
        for round_ in range(1, 5):
            changed = _guard(layers, alloc.ranks, tol)
            # worst first, and only while the raised floors still fit the budget: the guard moves
            # parameters between layers, it never breaks the target
            took = False
            for name, rec in sorted(changed.items(), key=lambda kv: -kv[1]["error"]):
                c = by_name[name]
                old_floor = c.min_rank
                c.min_rank = rec["new_rank"]
                if sum(x.cost(x.min_rank) for x in cands) > budget:
                    c.min_rank = old_floor
                    skipped.append(name)
                    continue
                guard_log.append({"layer": name, "round": round_, **rec})
                took = True
            if not took:
                break
            alloc = allocate(cands, budget, config.allocation)
        else:
            warns.append("the guard was still raising ranks after 4 rounds; the last allocation stands")
        if skipped:
            names = sorted(set(skipped))
            warns.append(
                f"guard: {len(names)} layer(s) above the tolerance could not get rank back within the "
                f"budget ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            )
    if not alloc.feasible:
        warns.append(
            f"the budget ({fraction:.4g} of the selected layers' {'MACs' if macs else 'parameters'}) "
            "is below what min_rank needs; the plan keeps more"
        )
    guarded = {g["layer"]: g for g in guard_log}
    it = iter(layers)
    plans: list[LayerPlan] = []
    for item in out:
        if item is not None:
            plans.append(item)
            continue
        ly = next(it)
        plans.append(_budget_layer(ly, alloc, config, guarded.get(ly.la.name), bias[ly.la.name]))
    after = sum(c.cost(alloc.ranks[c.name]) for c in cands) + (0 if macs else sum(bias.values()))
    record = {
        "target": config.target,
        "target_macs": config.target_macs,
        "of": "macs" if macs else "params",
        "allocation": config.allocation,
        "truncation": "whitened" if calib is not None else "svd",
        "threshold": None if not math.isfinite(alloc.threshold) else float(alloc.threshold),
        "before": int(before),
        "wanted": int(math.floor(fraction * before)),
        "after": int(after),
        "kept": after / before if before else 1.0,
        "guard": tol,
        "guard_changes": guard_log,
        "calibration": None if calib is None else calib.summary(),
    }
    return plans, record, warns


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _budget_layer(
    ly: _Layer, alloc: Any, config: CompressionConfig, guard: dict[str, Any] | None, bias: int
) -> LayerPlan:
    la, c = ly.la, ly.cand
    m, n = ly.m, ly.n
    k = alloc.ranks[c.name]
    k_now = c.max_rank
    pos = ly.positions  # the MACs record uses the real output positions (None: unknown)
    w_now = k_now * (m + n) if la.factored else m * n
    lp = LayerPlan(
        name=la.name,
        layer_type=la.layer_type,
        shape=la.shape,
        matrix_shape=(m, n),
        action="keep",
        reason="",
        rank_before=k_now,
        rank=k_now,
        rule=f"target:{config.allocation}",
        fit=None if la.fit is None else la.fit.to_dict(),
        params_before=_param_count(la.module),
        params_after=_param_count(la.module),
        macs_before=w_now * pos if pos else None,
        macs_after=w_now * pos if pos else None,
        dtype=la.dtype,
        svd_dtype=config.for_layer(la.name).svd_dtype,
    )
    score = alloc.scores[c.name]
    top = float(score[0]) if score.size else float("nan")
    lp.decision = {
        "allocation": config.allocation,
        "truncation": ly.truncation,
        "edge": ly.edge,
        "edge_how": ly.edge_how,
        "n_above_edge": c.n_spikes,
        "threshold": alloc.threshold if math.isfinite(alloc.threshold) else None,
        "score_at_rank": None if k == 0 or k > score.size else _finite(float(score[k - 1])),
        "top_score": _finite(top),
        "guard": guard,
    }
    why = (
        f"{config.allocation}: rank {k} of {c.s.size}, {c.n_spikes} directions above the edge "
        f"{ly.edge:.4g} ({ly.edge_how})"
    )
    if guard is not None:
        why += (
            f"; guard: held-out error {guard['error']:.3g} > {config.guard:g} at rank {guard['rank']}, "
            f"raised to {guard['new_rank']}"
        )
    dense = not la.factored and c.cost(k) >= c.dense
    if k >= k_now or dense:
        lp.reason = why + ("; kept dense: k(m+n) >= mn" if dense and k < k_now else "; nothing to cut")
        return lp
    lp.action, lp.rank, lp.reason = "factor", k, why
    lp.params_after = k * (m + n) + bias
    if pos:
        lp.macs_after = k * (m + n) * pos
    if ly.U is not None:
        # on U's device: the analysis's SVD of a model on a GPU stays there (a CPU s_k would not mix)
        s_k = torch.as_tensor(ly.s[:k], dtype=ly.U.dtype, device=ly.U.device)
        lp._svd = (ly.U[:, :k].clone(), s_k, ly.Vh[:k].clone(), _versions(la.handler, la.module))
    lp.truncation = ly.truncation
    return lp


def plan(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    example_input: Any = None,
    progress: bool | None = False,
    keep_svd: bool = False,
    calibration: Calibration | Any = None,
) -> Plan:
    """Decide, for every prunable layer of ``model``, what :func:`apply` will do. The model is not changed.

    Parameters
    ----------
    model : the network.
    config : rule and layer selection (default :class:`CompressionConfig()`).
    example_input : optional input batch (a tensor or a tuple of arguments); one forward pass in
        eval mode records each layer's output size, so conv MACs can be counted.
    progress : show a progress bar over layers (None: when stderr is a terminal).
    keep_svd : compute each layer's full SVD now and keep the top-``k`` triplets of the layers to cut
        in the plan, so :func:`apply` needs no second decomposition (:func:`compress` does this).
    calibration : a :class:`~rmtprune.calibration.Calibration` (or batches of real inputs, collected
        with :func:`rmtprune.calibration.collect`): truncate each layer in the space whitened by its
        input covariance (SVD-LLM, arXiv:2403.07378), the output error on those inputs being what
        is minimised, and score directions against the generalized-MP edge of the whitened noise.
        Needs ``config.target`` or ``target_macs``. A whitened plan keeps its factors in memory:
        it cannot be re-applied from JSON.

    Raises
    ------
    RmtpruneError : the model has no prunable layer.
    InvalidWeightsError : a selected layer has NaN/Inf weights (named in the message).
    ValueError : a rule parameter impossible for a layer (e.g. a fixed rank above ``p``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    entries = collect_layers(model)
    if not any(e.handler is not None for e in entries):
        kinds = ", ".join(sorted({c.__name__ for c in supported_types()}))
        raise RmtpruneError(f"model {type(model).__name__} has no prunable layer (supported types: {kinds})")
    warns = _warn_unmatched(config, [e.name for e in entries])

    todo = [e for e in entries if e.handler is not None and not e.reason and config.selects(e.name)[0]]
    _check_finite(todo)
    budgeted = config.target is not None or config.target_macs is not None
    if calibration is not None and not budgeted:
        raise ValueError("calibration= needs a budget: give target= (or target_macs=)")
    if config.sequential and calibration is None:
        raise ValueError("sequential=True needs calibration data: give calibration= batches")
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = collect(
            model,
            calibration,
            layers=[e.name for e in todo],
            held_out=0.125 if config.guard is not None else 0.0,  # the guard's slice, only when asked
            progress=progress,
        )
    pos = _positions(model, todo, example_input) if example_input is not None else {}

    whiten = calibration is not None
    analysis = analyze(
        model, config, keep_svd=keep_svd and not whiten, progress=progress, entries=entries, metrics=False
    )
    # The one output-layer rule (layers.output_layer), known before any layer is decided.
    protected = analysis.output_layer if config.protect_last else None
    if budgeted:
        layers, budget, more = _budget_plan(analysis, config, pos, protected, calibration, keep_svd, progress)
        plan_ = Plan(layers, config, _param_count(model), warns + more)
        plan_.budget = budget
        return plan_
    layers = []
    for la in analysis:
        if la.verdict == "skip":
            layers.append(_skipped(la))
            continue
        positions = pos.get(la.name, la.handler.default_positions(la.module))
        why = analysis.output_reason if la.name == protected else ""
        layers.append(_plan_layer(la, config.for_layer(la.name), positions, why))
    return Plan(layers, config, _param_count(model), warns)


# ====================================================================== surgery
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"the plan does not match the model: layer {name!r} is missing") from None


def _factors(
    lp: LayerPlan, h: LayerHandler, mod: nn.Module, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U_k sqrt(s_k)`` and ``B = sqrt(s_k) V_k^T``, from the plan's SVD when still valid."""
    k = lp.rank
    cached = lp._svd
    if cached is not None and cached[3] == _versions(h, mod):
        U, s, Vh = cached[:3]
    elif lp.truncation == "whitened":
        raise ValueError(
            f"layer {lp.name!r} was planned with calibration data (whitened truncation) and its factors "
            "are gone (the weights changed, or the plan was read from JSON); plan again with calibration="
        )
    else:
        U, s, Vh = h.svd(mod, _DTYPES[lp.svd_dtype or "float64"])
        U, s, Vh = U[:, :k], s[:k], Vh[:k]
    r = s.clamp_min(0).sqrt()
    A = (U * r).to(dtype)
    B = (r[:, None] * Vh).to(dtype)
    return A, B


def _carry_over(old: nn.Module, new: nn.Module, ref: torch.Tensor) -> None:
    """Give ``new`` the train/eval mode of ``old``, the ``requires_grad`` of its weight ``ref`` and bias."""
    new.train(old.training)
    for prm in new.parameters():
        prm.requires_grad_(ref.requires_grad)
    bias = getattr(old, "bias", None)
    if isinstance(bias, torch.Tensor) and getattr(new, "bias", None) is not None:
        new.bias.requires_grad_(bias.requires_grad)


def _matching(model: nn.Module, lp: LayerPlan) -> tuple[nn.Module, LayerHandler]:
    """The layer ``lp`` speaks about and its handler, or ``ValueError`` if the model does not match."""
    mod = _get(model, lp.name)
    h = handler_for(mod)
    if h is None or type(mod).__name__ != lp.layer_type:
        raise ValueError(
            f"the plan does not match the model: layer {lp.name!r} is {type(mod).__name__}, "
            f"the plan says {lp.layer_type}"
        )
    why = parametrized(mod, h)
    if why:
        raise ValueError(f"the plan does not match the model: layer {lp.name!r} has a {why}")
    if h.matrix_shape(mod) != tuple(lp.matrix_shape) or h.current_rank(mod) != lp.rank_before:
        raise ValueError(
            f"the plan does not match the model: layer {lp.name!r} has matrix "
            f"{h.matrix_shape(mod)} rank {h.current_rank(mod)}, the plan says {tuple(lp.matrix_shape)} "
            f"rank {lp.rank_before}"
        )
    return mod, h


def _apply_one(model: nn.Module, lp: LayerPlan, mod: nn.Module, h: LayerHandler, undo: list[Any]) -> None:
    """Cut one layer as ``lp`` says (factors from its kept SVD), recording how to put it back in ``undo``."""
    ref = h.weights(mod)[0]
    A, B = _factors(lp, h, mod, ref.dtype)
    A, B = A.to(ref.device), B.to(ref.device)
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise InvalidWeightsError(f"the factors of layer {lp.name!r} are not finite")
    if lp.action == "factor":
        new = h.build(mod, A, B)
        _carry_over(mod, new, ref)
        parent, child = _parent(model, lp.name)
        setattr(parent, child, new)
        undo.append(("module", parent, child, mod))
    else:
        old = mod.weight.detach().clone()
        undo.append(("weight", mod, old))
        h.write_dense(mod, A @ B)
    lp._svd = None


def _undo(undo: list[Any]) -> None:
    """Put back, newest first, every layer :func:`_apply_one` changed."""
    for item in reversed(undo):
        if item[0] == "module":
            setattr(item[1], item[2], item[3])
        else:
            with torch.no_grad():
                item[1].weight.copy_(item[2])


def apply(model: nn.Module, plan: Plan, *, progress: bool | None = False) -> nn.Module:
    """Perform the plan's surgery on ``model`` in place (and return it).

    ``factor`` layers are replaced by their :mod:`rmtprune.lowrank` module (same device and dtype;
    ``requires_grad`` and train/eval mode carried over; hooks on the old module are not), and
    ``dense-truncate`` layers get their rank-k weight, each at the SVD precision its
    :class:`LayerPlan` records. If anything fails half way, every layer already changed is put back
    and the error re-raised.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    if plan.applied:
        raise ValueError("this plan was already applied; make a new plan for the current model")
    if plan.config.sequential and any(lp.truncation == "whitened" for lp in plan.layers if lp.changes):
        warnings.warn(
            "this plan's config asks for sequential=True, but apply() cuts every layer one-shot; "
            "use apply_sequential(model, plan, batches) (compress() does)",
            stacklevel=2,
        )
    work = [(lp, *_matching(model, lp)) for lp in plan.layers if lp.changes]
    undo: list[Any] = []
    try:
        for lp, mod, h in _progress(work, total=len(work), desc="apply", enable=progress):
            _apply_one(model, lp, mod, h, undo)
    except BaseException:
        _undo(undo)
        raise
    plan.applied = True
    factored = [lp.name for lp in plan if lp.action == "factor"]
    if factored:  # transformers' own save_pretrained would lose the factored layers
        guard_save_pretrained(model, factored)
    return model


def _refit(lp: LayerPlan, W: torch.Tensor, C: torch.Tensor, damping: float) -> tuple:
    """Top-``lp.rank`` SVD triplets of ``W`` whitened by ``C`` (the cut model's input moment), the
    right factor un-whitened: the rank-k ``W'`` with the least output error on those inputs."""
    S, _ = whitening_factor(C, damping)
    U, s, Vh = _tall_svd(W @ S)
    k = lp.rank
    Vh = torch.linalg.solve_triangular(S.T, Vh[:k].T, upper=True).T
    return U[:, :k].contiguous(), s[:k].contiguous(), Vh.contiguous()


def _check_batch_list(batches: Any) -> None:
    """Sequential compression reads the calibration batches once per block: they must be a list
    (a sequence) of model inputs, not nothing, a collected Calibration or a one-shot iterator."""
    if batches is None or isinstance(batches, Calibration):
        raise ValueError(
            "sequential=True needs the calibration batches themselves (a list of model inputs), not "
            + ("nothing" if batches is None else "a collected Calibration")
        )
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise ValueError(
            "sequential compression reads the calibration batches once per block: give them as a list, "
            f"not a {type(batches).__name__}"
        )


def apply_sequential(
    model: nn.Module,
    plan: Plan,
    batches: Sequence[Any],
    *,
    held_out: float | None = None,
    progress: bool | None = False,
) -> nn.Module:
    """Apply a calibrated ``plan`` block after block, each block's layers truncated in the space
    whitened by the inputs the already-cut model gives them (SparseGPT's order; see
    :mod:`rmtprune.sequential`). Same ranks and stored size as :func:`apply`, new factors.

    Parameters
    ----------
    model : the model the plan was made for; changed in place (every layer put back if anything
        fails half way).
    plan : a plan made with ``calibration=`` (whitened truncation) and a ``target``.
    batches : the calibration batches the plan was made from, as a list (read once per block).
    held_out : the share of batches the plan's calibration kept for the guard, left out here too
        (default: 0.125 if the plan's config has a guard, else 0, as :func:`plan` collects).
    progress : a progress bar over blocks (None: when stderr is a terminal).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    if plan.applied:
        raise ValueError("this plan was already applied; make a new plan for the current model")
    _check_batch_list(batches)
    work = [(lp, *_matching(model, lp)) for lp in plan.layers if lp.changes]
    flat = [lp.name for lp, _, _ in work if lp.truncation != "whitened"]
    if flat:
        raise ValueError(
            f"sequential application needs a plan made with calibration data; layer {flat[0]!r} is not "
            "whitened"
        )
    if held_out is None:
        held_out = 0.125 if plan.config.guard is not None else 0.0
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 <= held_out < 1:
        raise ValueError(f"held_out={held_out!r} must be a fraction in [0, 1)")
    is_held = _held_out_rule(batches, held_out)
    fit = [b for i, b in enumerate(batches) if not is_held(i)]
    if not fit:
        raise ValueError("calibration needs at least one batch that is not held out; got none")
    by_name = {lp.name: (lp, mod, h) for lp, mod, h in work}
    modes = {mod: mod.training for mod in model.modules()}
    saved = {lp.name: (lp._svd, lp.truncation) for lp, _, _ in work}  # the one-shot plan, kept on failure
    undo: list[Any] = []
    try:
        if by_name:
            model.eval()  # measured in eval mode; every module's mode is restored below
            for group, moments in block_moments(model, list(by_name), fit, progress=progress):
                for name in group:
                    lp, mod, h = by_name[name]
                    U, s, Vh = _refit(lp, _dense_matrix_of(h, mod), moments[name], plan.config.damping)
                    lp._svd = (U, s, Vh, _versions(h, mod))
                    _apply_one(model, lp, mod, h, undo)
                    lp.truncation = "whitened-sequential"
    except BaseException:
        _undo(undo)
        for lp, _, _ in work:
            lp._svd, lp.truncation = saved[lp.name]
        raise
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    for lp, mod, _ in work:  # the replacements take the mode of the layer they replace
        if lp.action == "factor":
            _get(model, lp.name).train(modes[mod])
    plan.applied = True
    if plan.budget is not None:
        plan.budget["truncation"] = "whitened, sequential"
    factored = [lp.name for lp in plan if lp.action == "factor"]
    if factored:  # transformers' own save_pretrained would lose the factored layers
        guard_save_pretrained(model, factored)
    return model


def compress(
    model: nn.Module,
    config: CompressionConfig | None = None,
    *,
    example_input: Any = None,
    progress: bool | None = False,
    calibration: Calibration | Any = None,
    **overrides: Any,
) -> tuple[nn.Module, Plan]:
    """Plan and apply low-rank compression in place; returns ``(model, report)``.

    ``overrides`` replace fields of ``config`` (e.g. ``compress(model, keep_bulk=0.3)``; an unknown
    name is a ``TypeError``, as for any keyword argument). Each layer is decomposed once (the plan
    keeps the top-``k`` SVD of the layers it cuts). Works on already compressed models too:
    factored layers are re-cut from QR of their factors. The report is the applied :class:`Plan`.

    ``compress(model, target=0.8)`` keeps 80% of the selected layers' parameters as stored, the
    ranks allocated across layers by ``allocation`` (default ``rmt``: each direction's singular value
    over its own layer's noise edge); with ``calibration=`` (batches of real inputs, or a
    :class:`~rmtprune.calibration.Calibration`) each layer is truncated in its input-whitened space
    and ``guard=`` can give rank back to layers whose held-out output error is too large (see
    :func:`plan`).
    """
    config = CompressionConfig() if config is None else config
    if overrides:
        try:
            check_fields("config", overrides, (f.name for f in dataclasses.fields(CompressionConfig)))
        except ValueError as exc:
            raise TypeError(str(exc)) from None
        config = dataclasses.replace(config, **overrides)
    if config.sequential:
        _check_batch_list(calibration)
    p = plan(
        model, config, example_input=example_input, progress=progress, keep_svd=True, calibration=calibration
    )
    if config.sequential:
        apply_sequential(model, p, calibration, progress=progress)
    else:
        apply(model, p, progress=progress)
    return model, p


# ====================================================================== the inverse and the check
def is_compressed(model: nn.Module) -> bool:
    """Whether ``model`` holds a factored (``LowRank*``) layer or a sparsity mask.

    A ``dense-truncate`` cut leaves an ordinary dense layer and is not detected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return any(isinstance(m, LowRankModule) for m in model.modules()) or is_sparsified(model)


def _dense_of(name: str, mod: LowRankModule) -> nn.Module:
    """The dense layer of the type ``mod`` replaced (``original_type``), weight ``A @ B``, bias kept."""
    kind = mod.original_type
    if not isinstance(mod, LowRankLinear) or kind == "Linear":
        dense = mod.to_dense()
        if type(dense).__name__ != kind:
            raise ValueError(f"layer {name!r} replaced a {kind}, which densify cannot rebuild")
        return dense
    # A registered transposed-linear type (transformers' Conv1D): built as T(out, in), its signature.
    t = next((t for t in supported_types() if t.__name__ == kind), None)
    m, n = mod.matrix_shape
    try:
        dense = t(m, n) if t is not None else None
    except Exception:  # any constructor failure means: not rebuildable this way
        dense = None
    h = None if dense is None else handler_for(dense)
    if h is None or h.matrix_shape(dense) != (m, n):
        raise ValueError(
            f"layer {name!r} replaced a {kind}, which densify cannot rebuild (it rebuilds Linear, "
            "Conv1d, Conv2d and registered layer types built as T(out_features, in_features))"
        )
    ref = mod.first.weight
    dense = dense.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        h.write_dense(dense, mod.factors()[0] @ mod.factors()[1])
        if getattr(dense, "bias", None) is not None:
            if mod.bias is None:
                dense.bias = None
            else:
                dense.bias.copy_(mod.bias)
    return dense


def densify(model: nn.Module) -> nn.Module:
    """Undo compression in place (and return the model): the inverse of :func:`compress` and ``sparsify``.

    Every factored ``LowRank*`` layer is replaced by a dense layer of the type it replaced
    (``original_type``: ``Linear``, ``Conv1d``, ``Conv2d``, transformers' ``Conv1D``) holding the
    product ``A @ B`` as its weight and the same bias, on the same device and dtype, with
    ``requires_grad`` and train/eval mode carried over; the outputs are unchanged up to float
    rounding. Sparsity masks are removed (:func:`rmtprune.masks.remove_masks`; the weights keep
    their zeros). The cut is not undone: the noise removed stays removed. Every new layer is built
    before any is swapped in, so a layer that cannot be rebuilt raises ``ValueError`` with the model
    unchanged. An optimizer holding the old parameters must be rebuilt.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LowRankModule):
        raise ValueError("the model itself is a factored layer; use model.to_dense()")
    names: dict[int, list[str]] = {}
    found: dict[int, LowRankModule] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, LowRankModule):
            names.setdefault(id(mod), []).append(name)
            found[id(mod)] = mod
    new = {}
    for key, mod in found.items():
        dense = _dense_of(names[key][0], mod)
        _carry_over(mod, dense, mod.first.weight)
        new[key] = dense
    for key, dense in new.items():  # a module registered under two names stays one module
        for name in names[key]:
            parent, child = _parent(model, name)
            setattr(parent, child, dense)
    if is_sparsified(model):
        remove_masks(model)
    return model


#: The old private name of :func:`rmtprune.layers.collect_layers` (benchmarks of earlier revisions use it).
_collect = collect_layers
