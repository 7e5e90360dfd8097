"""--every N: a deliberate thinning, the same in watch and extrapolate, and said in the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from relexd.cli import app
from relexd.engine.config import EngineConfig
from relexd.engine.preview import MANIFEST
from relexd.state.store import read_snapshot
from tests.daemon.test_bad_input import Harness


def test_watch_and_extrapolate_take_the_same_steps(tmp_path: Path) -> None:
    h = Harness(tmp_path / "live", engine=EngineConfig(every=3), preview_at=(100,))
    for step in range(1, 12):
        ckpt = h.save(step)
        shutil.copytree(ckpt, tmp_path / "aside" / ckpt.name)
        h.scan()
        if step > 2:  # rotation: keep two
            shutil.rmtree(h.run / f"checkpoint-{step - 2}")
            h.scan()
    assert h.steps() == [1, 4, 7, 10]
    assert h.missed("rotated") == 0 and h.missed("gap") == 0  # skipped on purpose is not missed
    manifest = json.loads((h.state / "previews" / "step-100" / MANIFEST).read_text())
    assert manifest["ingest_every"] == 3 and manifest["observed_steps"] == [1, 4, 7, 10]
    h.svc.engine.close()

    offline = tmp_path / "offline"
    result = CliRunner().invoke(
        app,
        ["extrapolate", str(tmp_path / "aside"), "--base", str(h.base), "--target", "100", "--every", "3",
         "--out", str(offline / "previews"), "--state-dir", str(offline / "state")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_snapshot(offline / "state").meta["steps"] == [1, 4, 7, 10]


def test_status_says_what_was_missed_and_thinned(tmp_path: Path) -> None:
    h = Harness(tmp_path, engine=EngineConfig(every=2), max_pinned=0)
    h.save(1)
    h.scan()
    h.save(3)
    shutil.rmtree(h.save(5))  # seen by no scan: revealed by nothing (no save_steps): not countable
    h.scan()
    gone = h.save(7)
    h.svc.scan_once()  # seen ...
    shutil.rmtree(gone)  # ... and rotated before the worker read it
    h.scan()
    h.svc.engine.close()
    result = CliRunner().invoke(app, ["status", "--state-dir", str(h.state), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["steps"] == [1, 3] and info["ingest_every"] == 2
    assert info["missed"]["counts"] == {"rotated": 1, "gap": 0}
    assert [(m["first"], m["reason"]) for m in info["missed"]["recent"]] == [(7, "rotated")]
    table = CliRunner().invoke(app, ["status", "--state-dir", str(h.state)])
    assert "1 (1 rotated); latest: steps 7" in table.output
    assert "≥ 2 steps apart" in table.output
