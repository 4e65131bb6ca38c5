"""Singular values of weight matrices, float64: numpy for numpy weights, torch for tensors and devices.

The spectrum step of the analyze stage (:mod:`rmtprune.analysis` re-exports the public names):
``as_matrix`` reads a weight as ``out x rest``; ``singular_values`` takes the float64 Gram
eigenvalues in the tall orientation over 64 MiB row chunks (numpy alone for a numpy weight, so a
safetensors file is analysed without importing torch); ``singular_values_batched`` does the same
for stacks of same-shape matrices on a torch device (``--device cuda``), the one batched code path
tests run on the CPU. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["as_matrix", "singular_values", "singular_values_batched", "resolve_device"]


def as_matrix(weight: Any) -> torch.Tensor:
    """View a weight (numpy array or torch tensor, >= 2-D, floating point) as an ``out x rest`` tensor."""
    import torch

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


def _as_array(weight: np.ndarray) -> np.ndarray:
    """:func:`as_matrix` for a numpy weight, without torch: an ``out x rest`` view."""
    if not np.issubdtype(weight.dtype, np.floating):
        raise TypeError(f"weight dtype {weight.dtype} is not floating point")
    if weight.ndim < 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not a matrix (need >= 2 dims)")
    return weight.reshape(weight.shape[0], -1)


def _all_finite(mat: Any) -> bool:
    """Whether a numpy array or torch tensor holds no NaN/Inf (numpy in 64 MiB row chunks)."""
    if isinstance(mat, np.ndarray):
        step = max(1, _GRAM_CHUNK_ELEMENTS // max(1, mat.shape[1]))
        return all(bool(np.isfinite(mat[i : i + step]).all()) for i in range(0, mat.shape[0], step))
    import torch

    return bool(torch.isfinite(mat).all())


#: Rows of the float64 copy converted at a time when accumulating the Gram matrix (64 MiB chunks).
_GRAM_CHUNK_ELEMENTS = 8 * 2**20


def _singular_values_numpy(m: np.ndarray, method: str) -> np.ndarray:
    """:func:`singular_values` of a numpy matrix, in numpy (the same method and chunks as torch's)."""
    if m.shape[0] < m.shape[1]:
        m = m.T
    if method == "gram":
        rows, cols = m.shape
        step = max(1, _GRAM_CHUNK_ELEMENTS // cols)
        gram = np.zeros((cols, cols), dtype=np.float64)
        for start in range(0, rows, step):
            chunk = np.ascontiguousarray(m[start : start + step], dtype=np.float64)
            gram += chunk.T @ chunk  # numpy calls BLAS syrk for A.T @ A
        eig = np.linalg.eigvalsh(gram)[::-1]
        return np.sqrt(np.clip(eig, 0.0, None))
    if method == "svd":
        return np.linalg.svd(m.astype(np.float64), compute_uv=False)
    raise ValueError(f"method={method!r} must be 'gram' or 'svd'")


def singular_values(matrix: Any, method: str = "gram") -> np.ndarray:
    """Singular values of a 2-D tensor or numpy array, descending, computed in float64 on the CPU.

    ``method="gram"`` (default) takes the square roots of the eigenvalues of the ``p x p`` Gram
    matrix ``W^T W`` (tall orientation), accumulated over 64 MiB row chunks converted to float64,
    so no full float64 copy is ever made: 1.8-3.2x faster than ``svdvals`` on 256..2048-wide
    layers (measured on 1 thread), with relative error ``~ eps * (s_max / s_i)**2``, below 1e-9
    on every matrix we tried; the MP fit only needs ``s**2`` anyway. ``method="svd"`` is
    ``torch.linalg.svdvals`` in float64 (exact to rounding for the smallest values too). A numpy
    array is computed in numpy (``eigvalsh`` of the same float64 Gram matrix; LAPACK ``gesdd``
    for ``svd``), without importing torch.
    """
    if isinstance(matrix, np.ndarray):
        return _singular_values_numpy(matrix, method)
    import torch

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


def resolve_device(device: Any) -> str | None:
    """The device the batched Gram/eigenvalue step runs on: ``None`` for the plain CPU path, or a
    torch device string. An unavailable CUDA device falls back to the CPU (``None``) with a
    one-line :class:`RuntimeWarning`, never an error; a device torch does not know, or one other than
    cpu and cuda (mps, meta, xla, ...: untested), is a ValueError.
    """
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"device={str(device)!r}: CUDA is not available; analysing on the CPU", RuntimeWarning, 2
        )
        return None
    return str(dev)


def singular_values_batched(matrices: Sequence[Any], device: Any = "cpu") -> list[np.ndarray]:
    """Singular values of several matrices (numpy or torch), float64 Gram eigenvalues on ``device``.

    The method of :func:`singular_values` (``method="gram"``: tall orientation, float64 Gram
    matrix accumulated over row chunks, ``eigvalsh``), run with torch on ``device``; matrices of the
    same shape are stacked and go through one batched ``baddbmm``/``eigvalsh``. Each group is sent
    to the device in its own dtype and converted to float64 there chunk by chunk, so device memory
    is about the group's bytes plus one 64 MiB float64 chunk per matrix and the Gram matrices. The
    caller sizes the batches (:func:`rmtprune.analyze_file` streams them from disk). Returns one
    descending float64 array per matrix, in the input order. On the CPU it agrees with the numpy
    path to ~1e-12 relative (same float64 arithmetic, another summation order).
    """
    import torch

    dev = torch.device(device)
    groups: dict[tuple[int, int], list[int]] = {}
    tall: list[Any] = []
    for i, m in enumerate(matrices):
        t = torch.from_numpy(m) if isinstance(m, np.ndarray) else m.detach()
        if t.ndim != 2:
            raise ValueError(f"matrix {i} has shape {tuple(t.shape)}; need 2-D")
        t = t.T if t.shape[0] < t.shape[1] else t
        tall.append(t)
        groups.setdefault((int(t.shape[0]), int(t.shape[1])), []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(tall)
    for (rows, cols), idx in groups.items():
        batch = torch.stack([tall[i] for i in idx]).to(dev)
        step = max(1, _GRAM_CHUNK_ELEMENTS // cols)
        gram = torch.zeros(len(idx), cols, cols, dtype=torch.float64, device=dev)
        for start in range(0, rows, step):
            chunk = batch[:, start : start + step].to(torch.float64)
            gram.baddbmm_(chunk.transpose(1, 2), chunk)
            del chunk
        del batch
        eig = torch.linalg.eigvalsh(gram).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = np.sqrt(np.clip(eig[j, ::-1], 0.0, None))
    return out
