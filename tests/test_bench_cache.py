"""The benchmarks' cache of trained models is keyed by config *and* the code that trains
(issue 14: a table must not mix code versions), and every results file names the revision."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _cache  # noqa: E402
import _env  # noqa: E402


def _copy_package(tmp_path: Path) -> Path:
    dst = tmp_path / "rmtprune"
    shutil.copytree(_env._package_dir(), dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_training_code_follows_training_source_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _copy_package(tmp_path)
    monkeypatch.setattr(_env, "_package_dir", lambda: pkg)
    _env.training_code.cache_clear()
    try:
        base = _env.training_code()
        (pkg / "commands" / "demo.py").write_text("# not training code\n")
        (pkg / "plotting.py").write_text("# not training code\n")
        _env.training_code.cache_clear()
        assert _env.training_code() == base
        trainer = pkg / "training" / "trainer.py"
        trainer.write_text(trainer.read_text() + "\n# changed\n")
        _env.training_code.cache_clear()
        assert _env.training_code() != base
    finally:
        _env.training_code.cache_clear()


def test_cache_key_includes_code_and_val_size() -> None:
    cfg = {"dataset": "mnist", "model": "mlp:10", "epochs": 1, "seed": 0}
    assert _cache.cache_key(cfg, "a") != _cache.cache_key(cfg, "b")
    assert _cache.cache_key(cfg, "a") == _cache.cache_key(dict(cfg), "a")
    assert _cache.cache_key(cfg, "a") != _cache.cache_key({**cfg, "val_size": 0}, "a")
    assert _cache.cache_key(cfg) == _cache.cache_key(cfg, _env.training_code())


def test_training_loads_none_of_the_excluded_modules() -> None:
    """A pruned training run in a fresh process imports no module :data:`_env.NOT_TRAINING` leaves
    out of the code hash (else editing it would change a model without changing the key)."""
    code = (
        "import sys, json\n"
        "from rmtprune.training import TrainConfig, train\n"
        "train(TrainConfig(dataset='digits', model='mlp:32', epochs=2, prune_every=1, train_subset=200))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('rmtprune'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    files = {m.removeprefix("rmtprune.").replace(".", "/") for m in loaded}
    bad = [
        m
        for m in files
        for ex in _env.NOT_TRAINING
        if (ex.endswith("/") and (m + "/").startswith(ex)) or m + ".py" == ex
    ]
    assert not bad, f"training imports {bad}: remove them from _env.NOT_TRAINING"
    assert "training/trainer" in files  # the listing works


def test_git_revision_names_a_commit() -> None:
    rev = _env.git_revision()
    assert rev == "unknown" or len(rev.split()[0]) >= 7


#: Benchmark scripts that write no results file, with the reason; every other script must name the revision.
NO_RESULTS_FILE = {
    "fetch_real.py": "downloads the real-model cache and its manifest, writes nothing under results/",
}


def test_every_results_writing_script_names_the_revision() -> None:
    """A cheap static check of issue 14: each benchmark script (``benchmarks/*.py`` but the ``_`` helpers)
    writes a results file, so its source calls ``git_revision`` itself or writes through
    ``_report.write_report`` (which prints the revision); scripts without a results file are listed above."""
    import re

    bench = ROOT / "benchmarks"
    assert "git_revision()" in (bench / "_report.py").read_text(encoding="utf-8")
    scripts = sorted(p for p in bench.glob("*.py") if not p.name.startswith("_"))
    assert {"latency.py", "exp_mnist_mlp.py", "fetch_real.py"} <= {p.name for p in scripts}
    missing = []
    for path in scripts:
        src = path.read_text(encoding="utf-8")
        if path.name in NO_RESULTS_FILE:
            assert "results/" not in src and '"results"' not in src, f"{path.name} writes results after all"
            continue
        via_report = re.search(r"^from _report import [^\n]*\bwrite_report\b", src, re.M) is not None
        if "git_revision(" not in src and not via_report:
            missing.append(path.name)
    assert not missing, f"the results files of {missing} do not name the revision (`- revision: ...` line)"
