"""Step 1 of sparsification: sparsify the singular vectors of the noise part and recompose.

``W = U S V^T``; for triplet ``i`` the threshold is ``T_i = theta * max(c_min, (1 - s_i / s_plus)_+ ** q)``,
in units of the typical entry of a unit vector (``1 / sqrt(m)`` for ``u_i``, ``1 / sqrt(n)`` for
``v_i``). Entries below it are zeroed and ``W' = U' S V'^T`` is recomposed: deep-bulk triplets lose
most entries, spikes almost none, a denoising of the noise part before pruning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._progress import progress
from ..analysis import as_matrix
from ..masks import get_mask
from .state import LayerState

__all__ = ["singular_vector_thresholds", "sparsify_singular_vectors", "sv_step"]


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


def _keep(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, s_plus: float, theta: float, c_min: float, q: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which entries of the left and right singular vectors survive their thresholds."""
    m, n = U.shape[0], Vh.shape[1]
    t = torch.from_numpy(singular_vector_thresholds(S.cpu().numpy(), s_plus, theta, c_min, q)).to(U.device)
    keep_u = U.abs() >= (t / math.sqrt(m))[None, :]
    keep_v = Vh.abs() >= (t / math.sqrt(n))[:, None]
    return keep_u, keep_v


def _info(
    keep_u: torch.Tensor, keep_v: torch.Tensor, new: torch.Tensor, old: torch.Tensor
) -> dict[str, float]:
    """Fractions of vector entries zeroed and ``||W' - W||_F / ||W||_F``."""
    norm = float(torch.linalg.norm(old))
    return {
        "zeroed_u": 1.0 - float(keep_u.double().mean()),
        "zeroed_v": 1.0 - float(keep_v.double().mean()),
        "rel_change": float(torch.linalg.norm(new - old)) / norm if norm > 0 else 0.0,
    }


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
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    keep_u, keep_v = _keep(U, S, Vh, s_plus, theta, c_min, q)
    new = (U * keep_u * S[None, :]) @ (Vh * keep_v)
    info = _info(keep_u, keep_v, new, mat)
    return new.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype), info


def _sparsify_factors(layer: LayerState, s_plus: float, config: Any) -> tuple[Any, Any, dict]:
    """Threshold the singular vectors of ``A @ B``; return factors ``U' sqrt(S)``, ``sqrt(S) V'^T``.

    The SVD is the one the analysis made of the product (QR of the factors, float64).
    """
    module = layer.parent_module
    svd = layer.analysis.svd if layer.analysis is not None else None
    U, S, Vh = svd if svd is not None else module.svd(torch.float64)  # type: ignore[union-attr]
    keep_u, keep_v = _keep(U, S, Vh, s_plus, config.theta, config.c_min, config.q)
    root = S.sqrt()
    A = U * keep_u * root[None, :]
    B = root[:, None] * (Vh * keep_v)
    old_A, old_B = module.factors()  # type: ignore[union-attr]
    before = old_A.detach().double() @ old_B.detach().double()
    return A, B, _info(keep_u, keep_v, A @ B, before)


def sv_step(layers: list[LayerState], config: Any, show: bool | None) -> None:
    """Step 1 on every fitted, unprotected layer (a low-rank layer: on the SVD of its product)."""
    done: set[str] = set()
    for layer in progress(layers, total=len(layers), desc="singular vectors", enable=show):
        if not layer.fitted or layer.protected or config.theta == 0:
            continue
        fit = layer.fit
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
        A, B, info = _sparsify_factors(layer, fit.s_plus, config)
        mod.set_factors(A, B)
        for other in layers:
            if other.factored_parent == layer.factored_parent:
                other.sv_info = info
