"""A 2-rank FSDP checkpoint of a ~200 MB model streams like safetensors: peak RSS stays within
tests/engine/test_memory.py's bound (two ingests and a preview, the same model shape)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.test_memory import LARGEST, MB, probe_peak_growth

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_peak_rss_of_a_two_rank_fsdp_checkpoint_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / "dtensor_writer.py"),
         str(tmp_path)],
        check=True, timeout=600, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    growth = probe_peak_growth(tmp_path)
    print(f"peak RSS growth {growth / MB:.0f} MB (largest tensor in float32: {LARGEST * 4 / MB:.0f} MB)")
