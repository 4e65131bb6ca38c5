"""analyze_matrix / analyze_tensor: dtypes, conv reshaping, invalid values and verdicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rmtprune.analysis import VERDICTS, analyze_matrix, analyze_tensor, as_matrix, singular_values
from rmtprune.errors import InvalidWeightsError
from rmtprune.spectral import fit_bulk


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((120, 200))
    W[:, :3] += 8.0 * rng.standard_normal((120, 1))  # a rank-one spike
    return W.astype(np.float16).astype(np.float64)  # exactly representable in every float dtype below


@pytest.mark.parametrize(
    "convert",
    [
        lambda w: w,
        lambda w: w.astype(np.float32),
        lambda w: w.astype(np.float16),
        lambda w: torch.from_numpy(w),
        lambda w: torch.from_numpy(w).float(),
        lambda w: torch.from_numpy(w).half(),
        lambda w: torch.from_numpy(w).bfloat16(),
        lambda w: torch.from_numpy(w).float().requires_grad_(),
    ],
)
def test_same_fit_for_every_float_dtype(convert, weight) -> None:
    ref = analyze_matrix(weight)
    fit = analyze_matrix(convert(weight))
    if fit.shape != ref.shape:
        raise AssertionError(fit.shape)
    # bfloat16 rounds the values (8 bits of mantissa); every other dtype holds them exactly.
    exact = not isinstance(convert(weight), torch.Tensor) or convert(weight).dtype != torch.bfloat16
    if exact:
        # numpy input is analysed in numpy, torch input in torch: the same float64 method, another
        # LAPACK/BLAS, so equal to rounding (integers exactly).
        got, want = fit.to_dict(), ref.to_dict()
        assert got.keys() == want.keys()
        for k, v in want.items():
            if isinstance(v, float):
                assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
            else:
                assert got[k] == v, k
        assert fit.singular_values.dtype == np.float64
    else:
        assert fit.sigma2 == pytest.approx(ref.sigma2, rel=1e-2) and fit.n_spikes == ref.n_spikes


def test_conv_weight_read_as_out_by_rest() -> None:
    w = torch.randn(32, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    assert as_matrix(w).shape == (32, 72)
    fit = analyze_matrix(w)
    assert fit.shape == (32, 72)
    np.testing.assert_allclose(fit.singular_values, np.linalg.svd(w.reshape(32, 72).double().numpy())[1])
    assert singular_values(w.reshape(32, 72)).dtype == np.float64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("to_torch", [False, True])
def test_nan_inf_raise(bad: float, to_torch: bool, weight) -> None:
    w = weight.astype(np.float32).copy()
    w[5, 7] = bad
    with pytest.raises(InvalidWeightsError, match=r"shape \(120, 200\) contains NaN or Inf"):
        analyze_matrix(torch.from_numpy(w) if to_torch else w)


@pytest.mark.parametrize(
    ("w", "exc", "match"),
    [
        (np.ones((20, 30), dtype=np.int64), TypeError, "not floating point"),
        (torch.ones(20, 30, dtype=torch.int32), TypeError, "not floating point"),
        (np.ones((20, 30), dtype=bool), TypeError, "not floating point"),
        ([[1.0, 2.0]], TypeError, "numpy array or torch tensor"),
        (np.ones(30), ValueError, "not a matrix"),
        (np.ones((1, 30)), ValueError, "too small"),
    ],
)
def test_bad_input(w, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        analyze_matrix(w)


def test_verdicts() -> None:
    g = torch.Generator().manual_seed(2)
    ok = analyze_tensor("fc1.weight", torch.randn(200, 300, generator=g))
    assert ok.verdict == "fit" and ok.fit is not None and ok.fit.accepted()
    assert ok.matrix_shape == (200, 300) and ok.dtype == "float32"

    # Heavy-tailed, structured bulk: a Cauchy matrix is not MP-like.
    cauchy = torch.from_numpy(np.random.default_rng(3).standard_cauchy((200, 300)))
    bad = analyze_tensor("emb.weight", cauchy)
    assert bad.verdict == "no-mp-bulk" and "ks=" in bad.message and bad.fit is not None

    small = analyze_tensor("head.weight", torch.randn(1, 300, generator=g))
    assert small.verdict == "too-small" and small.fit is None and "p=1 < 10" in small.message

    w = torch.randn(50, 60, generator=g)
    w[0, 0] = float("nan")
    inv = analyze_tensor("fc2.weight", w)
    assert inv.verdict == "invalid" and "'fc2.weight'" in inv.message

    conv = analyze_tensor("conv.weight", torch.randn(64, 16, 3, 3, generator=g))
    assert conv.matrix_shape == (64, 144) and conv.shape == (64, 16, 3, 3)
    for la in (ok, bad, small, inv, conv):
        assert la.verdict in VERDICTS
        d = json.loads(json.dumps(la.to_dict()))
        assert d["verdict"] == la.verdict and d["layer"] == la.name


def test_gate_is_configurable() -> None:
    # Column scales 0.5..1.5: not an MP bulk (ks ~0.04), within the default tolerance ks_max = 0.1 but
    # refused by the pure test ks_max = 0 (a true MP bulk of this size stays below ~0.016, spectral/gate.py).
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.5, 1.5, 300)
    assert analyze_tensor("fc", w).verdict == "fit"
    la = analyze_tensor("fc", w, ks_max=0.0)
    assert la.verdict == "no-mp-bulk" and "ks_max=0.0" in la.message


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200)])
def test_gram_singular_values_match_svdvals(shape: tuple[int, int]) -> None:
    # The default Gram-eigenvalue route agrees with LAPACK's svdvals, spikes and a rank deficit included.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    W[:, :3] *= 40.0  # strong spikes
    W[:, -5:] = 0.0  # exact rank deficit where there are columns to spare
    gram = singular_values(W)
    svd = singular_values(W, method="svd")
    assert gram.shape == svd.shape == (min(shape),)
    assert np.all(np.diff(gram) <= 0)
    big = svd > 1e-6 * svd[0]
    np.testing.assert_allclose(gram[big], svd[big], rtol=1e-8)
    assert np.all(np.abs(gram[~big]) <= 1e-6 * svd[0])
    f_gram = fit_bulk(gram, shape)
    f_svd = fit_bulk(svd, shape)
    assert f_gram.n_spikes == f_svd.n_spikes
    assert f_gram.sigma2 == pytest.approx(f_svd.sigma2, rel=1e-9)


def test_singular_values_unknown_method() -> None:
    with pytest.raises(ValueError, match="method='qr' must be"):
        singular_values(torch.ones(3, 3), method="qr")


def test_gram_accumulates_over_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many small chunks (no full float64 copy) give the same values as one pass and as svdvals.
    import rmtprune._spectrum as spectrum
    import rmtprune.analysis as analysis

    W = torch.randn(257, 40, generator=torch.Generator().manual_seed(1))  # float32, as stored
    one_pass = analysis.singular_values(W)
    monkeypatch.setattr(spectrum, "_GRAM_CHUNK_ELEMENTS", 40 * 7)  # 7 rows a chunk, 37 chunks
    chunked = analysis.singular_values(W)
    np.testing.assert_allclose(chunked, one_pass, rtol=1e-12)
    np.testing.assert_allclose(chunked, analysis.singular_values(W, method="svd"), rtol=1e-10)
    # the numpy path chunks the same way
    np.testing.assert_allclose(analysis.singular_values(W.numpy()), one_pass, rtol=1e-10)
