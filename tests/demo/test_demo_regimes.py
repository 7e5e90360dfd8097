"""The demo's two faces, as numbers: the default learning rate is the regime where extrapolation
helps, and ``--lr COLLAPSE_LR`` is one where relexd's forecast skill turns negative.

These run the full default demo (real warm-up, 200 RL steps, the real daemon as a subprocess). The
demo is deterministic for a torch build and thread count, so the asserted facts are exact replays
of bench/README.md's table, with the thresholds set at the claims the README makes, not at the
measured figures: a regression in the engine, the daemon's capture, or the training recipe that
makes the previews lose to simply stopping fails here.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from relexd.demo import train
from relexd.demo.cli import DemoResult, recovered_share, run_demo


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


def _run(tmp_path: Path, cache: Path, lr: float) -> DemoResult:
    return run_demo(
        tmp_path,
        lr=lr,
        steps=train.DEFAULT_STEPS,
        seed=0,
        observe_fraction=0.15,
        console=Console(file=io.StringIO()),
        cache_dir=cache,
    )


@pytest.mark.slow
def test_default_demo_previews_beat_the_last_observed_checkpoint(tmp_path: Path, cache: Path) -> None:
    result = _run(tmp_path, cache, train.DEFAULT_LR)
    assert result.observed_step == 30
    last = result.observed_score.expected_reward
    assert 0.1 < result.base_score.expected_reward < 0.4  # partly competent: room for RL
    for _, target, preview, trained in result.rows:
        assert trained is not None
        assert trained.expected_reward > last, target  # RL kept improving the reward
        share = recovered_share(preview.expected_reward, trained.expected_reward, last)
        # The RL run is bitwise deterministic on one machine, but another CPU's float kernels sample
        # another trajectory: seed 0 recovered 97/96/89 % at 2×/3×/6× where bench/README.md was
        # measured and 92/88/53 % on the 2026-12-01 CI machine. Near (2×, 3×) the bar is 60 %;
        # at 6× the preview must still beat stopping at step 30.
        floor = 0.6 if target <= 3 * result.observed_step else 0.0
        assert share is not None and share > floor, (target, preview, trained, last)
    assert result.at_capture.skill is not None and result.at_capture.skill > 0
    # through the real --eval hook: at 2x the preview's lead held over the observed prefix and its
    # realized validation was positive, so RelexPreviewAhead would have fired (bench/README.md)
    assert result.signals_at_capture()[0].ahead_fires


@pytest.mark.slow
def test_collapse_lr_turns_the_skill_negative_and_previews_fail(tmp_path: Path, cache: Path) -> None:
    result = _run(tmp_path, cache, train.COLLAPSE_LR)
    last = result.observed_score.expected_reward
    assert all(preview.expected_reward < last for _, _, preview, _ in result.rows)
    # relexd warned already when the previews were made, and more loudly at the end.
    assert result.at_capture.skill is not None and result.at_capture.skill < 0
    assert result.at_end.skill is not None and result.at_end.skill < result.at_capture.skill
    assert not any(sig.ahead_fires for sig in result.signals_at_capture())  # nothing says "take it"
