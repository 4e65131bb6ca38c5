"""Seeded synthetic weight matrices for the spectral tests: i.i.d. noise of several tails plus planted spikes.

Shared by tests/test_spectral_bema.py and tests/test_spectral_heavy.py (a plain module beside them,
imported as ``_synthetic``: pytest puts the tests directory on ``sys.path``).
"""

from __future__ import annotations

import math

import numpy as np

#: Noise standard deviation of :func:`spiked`.
SIGMA = 1.3


def noise(rng: np.random.Generator, kind: str, m: int, n: int) -> np.ndarray:
    """Unit-variance i.i.d. ``m x n`` noise: gaussian, uniform, sign, laplace, t5 or t3 (Student-t)."""
    if kind == "gaussian":
        return rng.standard_normal((m, n))
    if kind == "uniform":
        return rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), (m, n))
    if kind == "sign":
        return rng.choice([-1.0, 1.0], (m, n))
    if kind == "laplace":
        return rng.laplace(0.0, 1.0 / math.sqrt(2.0), (m, n))
    if kind == "t5":
        return rng.standard_t(5, (m, n)) / math.sqrt(5.0 / 3.0)
    if kind == "t3":
        return rng.standard_t(3, (m, n)) / math.sqrt(3.0)
    raise AssertionError(kind)


def spiked(seed: int, kind: str, shape: tuple[int, int], strengths: list[float]) -> np.ndarray:
    """``SIGMA noise + sum theta_i u_i v_i^T``, theta in units of the BBP threshold ``SIGMA (N p)**0.25``."""
    rng = np.random.default_rng(seed)
    m, n = shape
    W = SIGMA * noise(rng, kind, m, n)
    if strengths:
        r = len(strengths)
        U, _ = np.linalg.qr(rng.standard_normal((m, r)))
        V, _ = np.linalg.qr(rng.standard_normal((n, r)))
        W += (U * (np.asarray(strengths) * SIGMA * (m * n) ** 0.25)) @ V.T
    return W
