"""Regenerate the Tracy-Widom (TW1) quantile table in ``rmtprune/spectral/tracy_widom.py``.

The GOE Tracy-Widom distribution is evaluated as a Fredholm determinant,
``F1(s) = det(I - K)`` on ``L2(0, inf)`` with ``K(x, y) = Ai(s + (x + y) / 2) / 2``,
discretised by Gauss-Legendre quadrature (Nystroem method; Bornemann 2010,
"On the numerical evaluation of distributions in random matrix theory",
arXiv:0904.1581). Quantiles come from bracketing root-finding. Needs scipy
(a development dependency only; the package itself ships the table).

Run: ``python tools/make_tw_table.py`` and paste the printed table.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import airy


def tw1_cdf(s: float, m: int = 80, length: float = 16.0) -> float:
    """TW1 cdf at ``s`` by the Nystroem discretisation of the Fredholm determinant."""
    x, w = np.polynomial.legendre.leggauss(m)
    x = (x + 1.0) * length / 2.0
    w = w * length / 2.0
    sw = np.sqrt(w)
    kernel = 0.5 * airy(s + (x[:, None] + x[None, :]) / 2.0)[0]
    return float(np.linalg.det(np.eye(m) - sw[:, None] * kernel * sw[None, :]))


def tw1_quantile(level: float) -> float:
    """TW1 quantile at ``level`` by Brent's method on :func:`tw1_cdf`."""
    return brentq(lambda s: tw1_cdf(s) - level, -8.0, 8.0, xtol=1e-12)


def main() -> None:
    levels = np.round(np.arange(0.005, 0.9951, 0.005), 3)
    q = [tw1_quantile(t) for t in levels]
    print("_TW1_LEVELS_STEP = 0.005  # levels 0.005, 0.010, ..., 0.995")
    print("_TW1_QUANTILES = np.array([")
    for i in range(0, len(q), 6):
        print("    " + " ".join(f"{v:.7f}," for v in q[i : i + 6]))
    print("])")
    for t in (0.5, 0.9, 0.95, 0.99):
        print(f"# check: q({t}) = {tw1_quantile(t):.4f}")


if __name__ == "__main__":
    main()
