"""The missed-checkpoint ledger: gaps from the trainer's cadence, each step reported once, restarts."""

from __future__ import annotations

import json
from pathlib import Path

from relexd.daemon.missed import LEDGER_FILE, Missed, MissedLedger, find_gaps, gap_runs, read_ledger


def test_find_gaps_takes_the_trainer_cadence_and_skips_what_is_accounted_for() -> None:
    done = [2, 4, 10]
    assert find_gaps(0, 10, 2, done, every=1, exclude=[]) == [6, 8]
    assert find_gaps(0, 10, 2, done, every=1, exclude=[8]) == [6]
    assert find_gaps(4, 10, 1, done, every=1, exclude=[]) == [5, 6, 7, 8, 9]
    # --every 3: after 4, steps 5 and 6 would have been skipped on purpose
    assert find_gaps(4, 10, 1, done, every=3, exclude=[]) == [7, 8, 9]
    assert find_gaps(0, 3, 5, done, every=1, exclude=[]) == []


def test_gap_runs_group_consecutive_steps() -> None:
    runs = gap_runs([3, 4, 5, 9, 11, 12], 1)
    assert [(r.first, r.last, r.count) for r in runs] == [(3, 5, 3), (9, 9, 1), (11, 12, 2)]
    assert [(r.first, r.last, r.count) for r in gap_runs([10, 20, 40], 10)] == [(10, 20, 2), (40, 40, 1)]


def test_each_step_is_reported_once_across_rotation_and_gap_checks(tmp_path: Path) -> None:
    ledger = MissedLedger(tmp_path, newest_ingested=None)
    assert ledger.checked_upto == 0  # a fresh state checks from the start
    assert ledger.add([Missed.one(5, "rotated", "/run/checkpoint-5")])
    assert not ledger.add([Missed.one(5, "rotated", "/run/checkpoint-5")])  # seen again: not twice
    gaps = ledger.check_gaps(8, 1, [1, 2, 3, 8], every=1, exclude=[])
    assert [(g.first, g.last) for g in gaps] == [(4, 4), (6, 7)]  # 5 is already reported
    ledger.add(gaps)
    assert ledger.check_gaps(8, 1, [1, 2, 3, 8], every=1, exclude=[]) == []  # checked already
    assert ledger.counts == {"rotated": 1, "gap": 3}
    doc = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert doc["checked_upto"] == 8 and doc["counts"] == {"rotated": 1, "gap": 3}


def test_a_restart_resumes_the_checked_mark_and_an_old_state_is_not_checked_backwards(tmp_path: Path) -> None:
    ledger = MissedLedger(tmp_path, newest_ingested=None)
    ledger.add(ledger.check_gaps(6, 2, [2, 6], every=1, exclude=[]))
    again = MissedLedger(tmp_path, newest_ingested=6)
    assert again.checked_upto == 6 and again.counts["gap"] == 1
    assert again.check_gaps(6, 2, [2, 6], every=1, exclude=[]) == []
    assert read_ledger(tmp_path)["recent"][0]["first"] == 4  # type: ignore[index]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    assert MissedLedger(legacy, newest_ingested=50).checked_upto == 50  # no ledger yet: from now on
    assert read_ledger(legacy) is None
