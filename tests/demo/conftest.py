"""Shared fixtures: one small warm-up (SFT) base model per test session.

The default warm-up is seconds to a minute of CPU; tests only need *a* deterministic base, so they
use a tiny budget (:data:`TEST_SFT_STEPS`), keeping the whole demo suite within its time budget.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relexd.demo.train import BASE_DIR_NAME, Warmup, configure_torch, sft_warmup

#: Warm-up budget for tests: enough to make a real (if weak) model, small enough to take ~1 s.
TEST_SFT_STEPS = 20
TEST_SFT_BATCH = 64


@pytest.fixture(scope="session")
def cached_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a tiny-budget (seed 0) warm-up model."""
    configure_torch(1)
    d = tmp_path_factory.mktemp("base") / BASE_DIR_NAME
    sft_warmup(0, Warmup(steps=TEST_SFT_STEPS, batch_size=TEST_SFT_BATCH)).save_pretrained(d)
    return d


@pytest.fixture
def run_dir_with_base(tmp_path: Path, cached_base: Path) -> Path:
    """A fresh run dir that already contains the cached base model."""
    run = tmp_path / "run"
    shutil.copytree(cached_base, run / BASE_DIR_NAME)
    return run
