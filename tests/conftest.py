"""Shared test set-up: the real MNIST/Fashion-MNIST files live in ../shared/data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (seeded from the test's name), so CI is
# reproducible; run with --hypothesis-seed=N to explore other examples.
settings.register_profile("rmtprune", derandomize=True, database=None)
settings.load_profile("rmtprune")

# OpenMP threads that spin while waiting make LAPACK up to 100x slower on a busy 2-core box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests and CI read the real IDX files from ../shared/data unless RMTPRUNE_DATA says otherwise.
os.environ.setdefault("RMTPRUNE_DATA", str(SHARED_DATA))
# Tiny test models run faster on one thread, and the suite stays robust on a busy 2-core box.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after (a test may change it): tiny models run fastest
    and deterministically on one thread; on a busy machine 2 threads made a test 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir() -> Path:
    """Directory holding ``mnist/`` and ``fashion-mnist/`` IDX files."""
    return Path(os.environ["RMTPRUNE_DATA"])
