"""Shared fixtures: one warm-up (SFT) base model per test session.

The warm-up is the expensive part of a demo run; tests copy the cached ``base/`` into fresh run
dirs, which :func:`relexd.demo.train.train_run` reuses instead of retraining.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relexd.demo.train import BASE_DIR_NAME, configure_torch, sft_warmup


@pytest.fixture(scope="session")
def cached_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the default (seed 0) warm-up model."""
    configure_torch(2)
    d = tmp_path_factory.mktemp("base") / BASE_DIR_NAME
    sft_warmup(0).save_pretrained(d)
    return d


@pytest.fixture
def run_dir_with_base(tmp_path: Path, cached_base: Path) -> Path:
    """A fresh run dir that already contains the cached base model."""
    run = tmp_path / "run"
    shutil.copytree(cached_base, run / BASE_DIR_NAME)
    return run
