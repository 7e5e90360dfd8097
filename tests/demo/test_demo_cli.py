"""``relexd demo`` end to end, in a reduced configuration: real trainer, real daemon subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_non_interactively_and_prints_the_table(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "relexd", "demo", "--steps", "12", "--observe-fraction", "0.16"]
    cmd += ["--sft-steps", "5", "--prompts-per-step", "4", "--keep", str(keep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "previews made from steps 1…2" in out
    assert "greedy exact-answer accuracy" in out
    for target in ("4", "6", "12"):  # 2×, 3×, 6× of the observed prefix
        assert (keep / "observed-previews" / f"step-{target}" / "relexd-preview.json").is_file()
    assert "forecast skill" in out
    assert (keep / "run" / "checkpoint-12" / "trainer_state.json").is_file()
    assert "\x1b[" not in out  # no TTY: plain lines, no live-view escape codes
