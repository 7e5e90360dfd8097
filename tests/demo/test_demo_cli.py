"""``relexd demo`` end to end, in a reduced configuration: real trainer, real daemon subprocess."""

from __future__ import annotations

import json
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
    # the daemon scored previews and checkpoints through --eval (python -m relexd.demo.score)
    ledger = json.loads((keep / "relexd-state" / "evaluations.json").read_text())
    status = {r["key"]: r["status"] for r in ledger["records"]}
    done = {key.split(":")[0] for key, st in status.items() if st == "done"}
    assert done == {"checkpoint", "preview"}, status
    assert "pending" not in status.values() and "failed" not in status.values(), status
    assert any("realized" in r for r in ledger["records"])  # training passed a preview's target: validated
    assert "what relexd said at step 2" in out and ("quiet" in out or "would fire" in out)


def test_recovered_share_and_verdict_state_what_the_numbers_show() -> None:
    from relexd.demo.cli import DaemonView, DemoResult, recovered_share, verdict
    from relexd.demo.evaluate import Score

    assert recovered_share(0.30, 0.30, 0.20) == pytest.approx(1.0)
    assert recovered_share(0.20, 0.30, 0.20) == pytest.approx(0.0)
    assert recovered_share(0.10, 0.30, 0.20) == pytest.approx(-1.0)
    assert recovered_share(0.5, 0.2005, 0.2) is None  # a share of almost no gain means nothing

    def result(preview: float, skill: float) -> DemoResult:
        rows = [(2, 60, Score(preview, 1.0), Score(0.30, 1.0))]
        return DemoResult(30, 200, Score(0.2, 1.0), Score(0.20, 1.0), rows, DaemonView(skill=skill),
                          DaemonView(skill=skill), 0.2, 0.3)  # fmt: skip

    good = verdict(result(0.29, 0.4))
    assert "beats" in good and "recovering 90 %" in good and "+0.400 (it trusted the line)" in good
    bad = verdict(result(0.15, -0.5))
    assert "does not beat" in bad and "worse than stopping at step 30" in bad and "warned" in bad
