"""The scout's bookkeeping between scans, where the two daemon threads meet."""

from __future__ import annotations

from pathlib import Path

import torch

from relexd.daemon.intake import Intake
from relexd.engine.config import EngineConfig
from tests.daemon.trainer_sim import hf_save


def _intake(tmp_path: Path, run: Path) -> Intake:
    return Intake(run, tmp_path / "pins", EngineConfig(), debounce=0.0, max_pinned=2)


def test_a_scan_with_a_stale_step_list_does_not_make_an_ingested_checkpoint_ready_again(
    tmp_path: Path,
) -> None:
    """The scout reads the state's steps, then lists the run; the worker may commit in between."""
    run = tmp_path / "run"
    hf_save(run, 6, {"w": torch.ones(3)})
    intake = _intake(tmp_path, run)
    assert intake.scan([]).ready == 1
    waiting = intake.next_ready()
    assert waiting is not None and waiting.pin is not None
    intake.finish(waiting, ingested=True)  # committed; the next scan's list was read before that
    news = intake.scan([])
    assert news.ready == 0 and news.out_of_order == [] and intake.next_ready() is None
    assert not any((tmp_path / "pins").iterdir())
    intake.close()


def test_pins_are_bounded_and_move_on_to_the_next_ready_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2, 3):
        hf_save(run, step, {"w": torch.full((3,), float(step))})
    intake = _intake(tmp_path, run)
    intake.scan([])
    first = intake.next_ready()
    assert first is not None and first.ref.step == 1
    assert sorted(p.name for p in (tmp_path / "pins").iterdir()) == ["step-1", "step-2"]
    intake.finish(first, ingested=True)
    assert sorted(p.name for p in (tmp_path / "pins").iterdir()) == ["step-2", "step-3"]
    assert intake.backlog() == 2
    intake.close()
