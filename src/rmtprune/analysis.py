"""Spectral analysis of one weight tensor: singular values (torch, float64) plus the BEMA fit.

This is the bridge between tensors and the pure-numpy ``rmtprune.spectral``: it flattens a
weight to a matrix (conv weights ``out x in x k...`` read as ``out x (in * k...)``), computes
``svdvals`` in float64, fits the bulk and gives a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InvalidWeightsError
from .spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX, MIN_P, SpectrumFit, fit_bulk

__all__ = [
    "analyze_matrix",
    "analyze_tensor",
    "as_matrix",
    "singular_values",
    "LayerAnalysis",
    "VERDICTS",
]

#: Verdicts of :func:`analyze_tensor`: ``fit`` (MP-like bulk), ``no-mp-bulk`` (ks above the gate),
#: ``too-small`` (p < MIN_P), ``invalid`` (NaN/Inf weights).
VERDICTS = ("fit", "no-mp-bulk", "too-small", "invalid")


def as_matrix(weight: Any) -> torch.Tensor:
    """View a weight (numpy array or torch tensor, >= 2-D, floating point) as an ``out x rest`` tensor."""
    if isinstance(weight, np.ndarray):
        if not np.issubdtype(weight.dtype, np.floating):
            raise TypeError(f"weight dtype {weight.dtype} is not floating point")
        t = torch.from_numpy(np.ascontiguousarray(weight))
    elif isinstance(weight, torch.Tensor):
        t = weight.detach()
        if not t.is_floating_point():
            raise TypeError(f"weight dtype {t.dtype} is not floating point")
    else:
        raise TypeError(f"weight must be a numpy array or torch tensor, got {type(weight).__name__}")
    if t.ndim < 2:
        raise ValueError(f"weight of shape {tuple(t.shape)} is not a matrix (need >= 2 dims)")
    return t.reshape(t.shape[0], -1)


#: Rows of the float64 copy converted at a time when accumulating the Gram matrix (64 MiB chunks).
_GRAM_CHUNK_ELEMENTS = 8 * 2**20


def singular_values(matrix: torch.Tensor, method: str = "gram") -> np.ndarray:
    """Singular values of a 2-D tensor, descending, computed in float64 on the CPU.

    ``method="gram"`` (default) takes the square roots of the eigenvalues of the ``p x p`` Gram
    matrix ``W^T W`` (tall orientation), accumulated over 64 MiB row chunks converted to float64,
    so no full float64 copy is ever made: 1.8-3.2x faster than ``svdvals`` on 256..2048-wide
    layers (measured on 1 thread), with relative error ``~ eps * (s_max / s_i)**2``, below 1e-9
    on every matrix we tried; the MP fit only needs ``s**2`` anyway. ``method="svd"`` is
    ``torch.linalg.svdvals`` in float64 (exact to rounding for the smallest values too).
    """
    m = matrix.detach().to(device="cpu")
    if m.shape[0] < m.shape[1]:
        # Same values; LAPACK is 3-5x faster on the tall orientation (measured: 768x3072 2.8 s
        # vs 0.63 s for its transpose on 2 cores), and the Gram matrix is the smaller one.
        m = m.T
    if method == "gram":
        rows, cols = m.shape
        step = max(1, _GRAM_CHUNK_ELEMENTS // cols)
        gram = torch.zeros(cols, cols, dtype=torch.float64)
        for start in range(0, rows, step):
            chunk = m[start : start + step].to(torch.float64)
            gram.addmm_(chunk.T, chunk)
        eig = torch.linalg.eigvalsh(gram).numpy()[::-1]
        return np.sqrt(np.clip(eig, 0.0, None))
    if method == "svd":
        return torch.linalg.svdvals(m.to(torch.float64)).numpy()
    raise ValueError(f"method={method!r} must be 'gram' or 'svd'")


def analyze_matrix(W: Any, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> SpectrumFit:
    """BEMA fit of the spectrum of a weight matrix (numpy or torch, any float dtype; float64 math).

    4-D conv weights are read as ``out x (in * kh * kw)``. Raises :class:`InvalidWeightsError`
    for NaN/Inf and ``ValueError`` when the matrix is too small for the trimmed window.

    Examples
    --------
    >>> import numpy as np
    >>> fit = analyze_matrix(np.random.default_rng(0).standard_normal((300, 100)))
    >>> fit.n_spikes, round(fit.sigma2, 1)
    (0, 1.0)
    """
    mat = as_matrix(W)
    if not bool(torch.isfinite(mat).all()):
        raise InvalidWeightsError(f"weight of shape {tuple(mat.shape)} contains NaN or Inf")
    s = singular_values(mat)
    return fit_bulk(s, tuple(mat.shape), alpha=alpha, beta=beta)


@dataclass
class LayerAnalysis:
    """Analysis of one named weight: its verdict and, where the fit ran, the fit."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    verdict: str
    fit: SpectrumFit | None = None
    message: str = ""

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the matrix the weight was read as."""
        rest = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        return (int(self.shape[0]), rest)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (fit fields flattened in, ``None`` where no fit ran)."""
        out: dict[str, Any] = {
            "layer": self.name,
            "shape": list(self.shape),
            "matrix_shape": list(self.matrix_shape),
            "dtype": self.dtype,
            "verdict": self.verdict,
            "message": self.message,
        }
        keys = ("gamma", "sigma2", "lambda_plus", "s_plus", "n_spikes", "n_bulk", "ks", "alpha", "beta")
        fit = self.fit.to_dict() if self.fit is not None else {}
        for k in keys:
            out[k] = fit.get(k)
        return out


def analyze_tensor(
    name: str,
    weight: Any,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    ks_max: float = DEFAULT_KS_MAX,
) -> LayerAnalysis:
    """Analyse one named weight and give it a verdict; never raises for bad values, only reports."""
    mat = as_matrix(weight)
    shape = tuple(int(v) for v in (weight.shape))
    dtype = str(weight.dtype).replace("torch.", "")
    p = min(mat.shape)
    if not bool(torch.isfinite(mat).all()):
        return LayerAnalysis(name, shape, dtype, "invalid", None, f"layer {name!r} contains NaN or Inf")
    if p < MIN_P:
        return LayerAnalysis(name, shape, dtype, "too-small", None, f"p={p} < {MIN_P}: too small to fit")
    fit = fit_bulk(singular_values(mat), tuple(mat.shape), alpha=alpha, beta=beta)
    if fit.accepted(ks_max):
        return LayerAnalysis(name, shape, dtype, "fit", fit, "")
    why = "no positive bulk" if not fit.sigma2 > 0 else f"ks={fit.ks:.3f} > ks_max={ks_max}"
    return LayerAnalysis(name, shape, dtype, "no-mp-bulk", fit, why)
