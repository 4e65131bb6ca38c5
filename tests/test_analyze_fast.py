"""The torch-free analyze path: numpy reads of safetensors, numpy spectra, the batched device path,
lazy CLI start, --threads and the ESD metrics of analyze(model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rmtprune import analyze, analyze_file
from rmtprune.analysis import resolve_device, singular_values, singular_values_batched
from rmtprune.cli import _command_in, build_parser
from rmtprune.commands._options import set_threads
from rmtprune.weights_file import _open, iter_tensors


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 64, generator=g)
    w[:, :2] += 6.0 * torch.randn(96, 1, generator=g)  # a spike
    return {
        "a.weight": w,
        "b.weight": torch.randn(64, 96, generator=g).half(),
        "c.weight": torch.randn(64, 96, generator=g).bfloat16(),
        "d.weight": torch.randn(32, 4, 3, 3, generator=g),
        "e.weight": (torch.randn(80, 48, generator=g) * 4).to(torch.float8_e4m3fn),
        "f.weight": (torch.randn(80, 48, generator=g) * 4).to(torch.float8_e5m2),
        "g.weight": torch.randn(64, 96, generator=g, dtype=torch.float64),
        "a.bias": torch.randn(96, generator=g),
        "steps": torch.tensor([3]),
    }


@pytest.fixture(scope="module")
def st_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fast") / "model.safetensors"
    save_file(_weights(), str(path))
    return path


def test_numpy_reads_equal_torch_reads_for_every_float_dtype(st_file: Path) -> None:
    src = _open(st_file)
    names = [i.name for i in src.infos() if i.is_float]
    assert src.numpy_readable(names)
    by_torch = dict(iter_tensors(st_file))
    for name, arr in src.read_numpy(names):
        ref = by_torch[name]
        want = ref.float().numpy() if ref.dtype.itemsize <= 2 and ref.dtype != torch.float16 else ref.numpy()
        assert arr.shape == tuple(ref.shape), name
        np.testing.assert_array_equal(arr, want, err_msg=name)


def test_fp8_tables_match_torch_on_all_256_codes() -> None:
    from rmtprune._safetensors_reader import _fp8_table

    codes = torch.arange(256, dtype=torch.uint8)
    for dtype, table in (
        (torch.float8_e4m3fn, _fp8_table(4, 3, True)),
        (torch.float8_e5m2, _fp8_table(5, 2, False)),
    ):
        ref = codes.view(dtype).float().numpy()
        np.testing.assert_array_equal(table, ref, err_msg=str(dtype))


def test_file_analysis_in_numpy_matches_torch_tensors(st_file: Path) -> None:
    res = analyze_file(st_file)
    assert [la.dtype for la in res.layers] == [
        "float32",
        "float16",
        "bfloat16",
        "float32",
        "float8_e4m3fn",
        "float8_e5m2",
        "float64",
    ]
    from rmtprune.analysis import analyze_tensor

    for (name, t), la in zip(iter_tensors(st_file, [la.name for la in res.layers]), res.layers, strict=True):
        ref = analyze_tensor(name, t.float() if t.dtype.itemsize == 1 else t)
        assert la.verdict == ref.verdict, name
        np.testing.assert_allclose(la.fit.singular_values, ref.fit.singular_values, rtol=1e-9)
        assert la.metrics.alpha == pytest.approx(ref.metrics.alpha, rel=1e-6)


def test_batched_torch_path_equals_numpy_path_on_cpu() -> None:
    rng = np.random.default_rng(1)
    mats = [rng.standard_normal(s).astype(np.float32) for s in [(70, 40), (40, 70), (70, 40), (30, 30)]]
    mats.append(torch.randn(50, 20, dtype=torch.float64))
    got = singular_values_batched(mats, "cpu")
    assert len(got) == len(mats)
    for m, s in zip(mats, got, strict=True):
        ref = singular_values(m)  # numpy for the arrays, torch for the tensor
        assert s.shape == (min(m.shape),) and np.all(np.diff(s) <= 0)
        np.testing.assert_allclose(s, ref, rtol=1e-9)


def test_device_file_analysis_equals_default(st_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmtprune.weights_analysis as wa

    monkeypatch.setattr(wa, "BATCH_BYTES", 30_000)  # several batches, and a tensor above the budget
    ref, dev = analyze_file(st_file), analyze_file(st_file, device="cpu")
    assert [la.name for la in dev.layers] == [la.name for la in ref.layers]
    for a, b in zip(ref.layers, dev.layers, strict=True):
        assert (a.verdict, a.dtype) == (b.verdict, b.dtype)
        np.testing.assert_allclose(b.fit.singular_values, a.fit.singular_values, rtol=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback when CUDA is absent")
def test_cuda_absent_falls_back_with_a_warning(st_file: Path) -> None:
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        assert resolve_device("cuda") is None
    with pytest.warns(RuntimeWarning):
        res = analyze_file(st_file, device="cuda")
    assert res.counts["fit"] + res.counts["no-mp-bulk"] == 7
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("tpu-7")


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_devices_other_than_cpu_and_cuda_are_refused(device: str, st_file: Path) -> None:
    # torch knows them, but the batched path was never run there: one clear error, not a traceback
    with pytest.raises(ValueError, match="only cpu and cuda devices are supported"):
        analyze_file(st_file, device=device)


def test_gate_off_writes_valid_json(st_file: Path) -> None:
    # ks_max=inf: every layer's effective gate is inf too, written as null (JSON has no Infinity)
    d = analyze_file(st_file, ks_max=float("inf")).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["ks_max"] is None and all(la["ks_gate"] is None for la in json.loads(text)["layers"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batched_equals_numpy(st_file: Path) -> None:
    ref, dev = analyze_file(st_file), analyze_file(st_file, device="cuda")
    for a, b in zip(ref.layers, dev.layers, strict=True):
        assert a.verdict == b.verdict
        if a.fit is not None:
            np.testing.assert_allclose(b.fit.singular_values, a.fit.singular_values, rtol=1e-9)


def test_analyze_model_device_and_metrics() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 60), torch.nn.ReLU(), torch.nn.Linear(60, 40))
    ref = analyze(model, method="gram")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dev = analyze(model, device="cpu", randomize=True)
    for a, b in zip(ref, dev, strict=True):
        np.testing.assert_allclose(b.s, a.s, rtol=1e-9)
        assert a.metrics is not None and a.traps is None and b.traps is not None
    d = json.loads(json.dumps(dev.to_dict()))
    assert d["summary"]["n_layers"] == 2 and d["layers"][0]["traps"]["n_traps"] >= 0
    assert analyze(model, metrics=False)[0].metrics is None


def test_cli_picks_only_the_named_subcommand() -> None:
    assert _command_in(["analyze", "f", "--help"]) == "analyze"
    assert _command_in(["--help", "analyze"]) is None
    assert _command_in(["--version"]) == ""
    assert _command_in(["nope"]) is None and _command_in([]) is None
    parser, mods = build_parser("analyze")
    assert list(mods) == ["analyze"]


def test_set_threads_sets_blas_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        monkeypatch.setenv(var, "1")
    try:
        set_threads(2)
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        set_threads(1)


_NO_TORCH = """
import sys
import rmtprune.cli
code = rmtprune.cli.main(["analyze", sys.argv[1], "--json", sys.argv[2], "--threads", "1", "--no-progress"])
assert code == 0, code
assert "torch" not in sys.modules, "torch was imported"
"""


def test_cli_analyze_of_safetensors_never_imports_torch(st_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(st_file), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["counts"]["fit"] + d["counts"]["no-mp-bulk"] == 7 and d["summary"]["n_layers"] == 7


def test_analyze_defaults_to_one_thread_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from rmtprune.cli import _threads_from_argv

    before = torch.get_num_threads()
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
    try:
        for argv, want in ((["analyze", "f"], "1"), (["analyze", "f", "--threads", "0"], None)):
            for var in names:
                monkeypatch.delenv(var, raising=False)
            _threads_from_argv(argv, 1)
            assert os.environ.get("OMP_NUM_THREADS") == want, argv
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
        _threads_from_argv(["analyze", "f"], 1)
        assert os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)
