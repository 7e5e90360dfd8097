"""The shipped bases are what their recipe makes: retraining seed 0 reproduces its file bit for bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from relexd.demo import bases


@pytest.mark.slow
def test_retraining_seed_0_reproduces_the_shipped_base(tmp_path: Path) -> None:
    fresh = bases.write_shipped(0, tmp_path) / bases.WEIGHTS_NAME
    shipped = bases.shipped_dir(0) / bases.WEIGHTS_NAME
    assert hashlib.sha256(fresh.read_bytes()).digest() == hashlib.sha256(shipped.read_bytes()).digest()
