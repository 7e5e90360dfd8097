"""``--eval``: which previews and checkpoints get scored, the realized figures against a hand
computation on a scripted score sequence, rotation, restarts and kill -9 around a hook's result."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relexd.daemon.config import WatchSettings
from relexd.daemon.evaluations import LEDGER_FILE, EvalLedger, read_ledger
from relexd.daemon.service import WatchService
from relexd.daemon.status import collect
from relexd.engine.preview import MANIFEST
from tests.daemon.trainer_sim import hf_save, make_base

PY = sys.executable

#: The evaluator the tests point --eval at: looks its score up in scores.json (keys "checkpoint:N"
#: and "preview:TAU@A"), appends every call to calls.jsonl, and waits while a file "gate" exists.
EVALUATOR = """
import json, os, sys, time
from pathlib import Path
here = Path(sys.argv[0]).parent
kind, step, made_from, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
target = sys.argv[5]
while (here / "gate").exists():
    time.sleep(0.02)
key = f"checkpoint:{step}" if kind == "checkpoint" else f"preview:{step}@{made_from}"
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps({"key": key, "path": path, "target": target}) + "\\n")
assert os.path.isdir(path), path
print("evaluating", key)
print(json.dumps({"score": json.loads((here / "scores.json").read_text())[key]}))
"""


def evaluator(root: Path, scores: dict[str, float]) -> str:
    (root / "eval").mkdir(exist_ok=True)
    script = root / "eval" / "evaluate.py"
    script.write_text(EVALUATOR)
    (root / "eval" / "scores.json").write_text(json.dumps(scores))
    return f"{PY} {script} {{kind}} {{step}} {{made_from}} {{path}} {{target}}"


def calls(root: Path) -> list[str]:
    path = root / "eval" / "calls.jsonl"
    return [json.loads(line)["key"] for line in path.read_text().splitlines()] if path.exists() else []


def settings(root: Path, base: Path, cmd: str, **kw: Any) -> WatchSettings:
    return WatchSettings(
        run_dir=root / "run",
        base=base,
        state_dir=root / "state",
        preview_ahead=(2.0,),
        eval_command=cmd,
        **kw,
    )


def settle(svc: WatchService, timeout: float = 60.0) -> None:
    """Wait until every queued hook run has ended and its result is recorded *and published*.

    The ledger says "done" a moment before the hook thread sets the metrics and stamps the
    manifest, so waiting on the ledger alone let assertions race the hook thread; a run's future
    completes only after all of that (:meth:`EvalHook.wait_idle`)."""
    assert svc.evaluations is not None and svc.hook is not None
    expired = threading.Event()
    timer = threading.Timer(timeout, expired.set)
    timer.start()
    try:
        svc.hook.wait_idle(expired)
    finally:
        timer.cancel()
    assert not expired.is_set(), svc.evaluations.records()
    assert not svc.evaluations.unfinished(), svc.evaluations.records()


def status_of(svc: WatchService) -> dict[str, str]:
    assert svc.evaluations is not None
    return {r["key"]: r["status"] for r in svc.evaluations.records()}


SCORES = {
    "checkpoint:10": 0.10,
    "checkpoint:20": 0.30,
    "checkpoint:30": 0.40,
    "checkpoint:40": 0.45,
    "preview:20@10": 0.25,
    "preview:40@20": 0.50,
    "preview:60@30": 0.42,
    "preview:80@40": 0.50,
}


def test_scripted_scores_give_the_hand_computed_realized_figures(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    svc = WatchService(settings(tmp_path, base, evaluator(tmp_path, SCORES)))
    svc.open()
    try:
        for step in (10, 20, 30, 40):
            hf_save(tmp_path / "run", step, planted.at(step))
            svc.pass_once(force_stable=True)
            settle(svc)
        m = svc.metrics
        # each checkpoint once, first the one a preview is made from, then the preview; the
        # checkpoints reaching the targets 20 and 40 are the made-from ones of later previews
        assert calls(tmp_path) == [
            "checkpoint:10", "preview:20@10", "checkpoint:20", "preview:40@20",
            "checkpoint:30", "preview:60@30", "checkpoint:40", "preview:80@40",
        ]  # fmt: skip
        records = {r["key"]: r for r in svc.evaluations.records()}
        # preview 20@10: (0.25 − 0.10) / (0.30 − 0.10) = 0.75; preview 40@20: (0.50 − 0.30) / (0.45 − 0.30)
        assert records["preview:20@10"]["realized"]["gain_share"] == pytest.approx(0.75)
        assert records["preview:20@10"]["reached_by"] == 20
        assert records["preview:40@20"]["realized"]["gain_share"] == pytest.approx(0.2 / 0.15)
        assert "realized" not in records["preview:60@30"]  # training has not reached step 60
        # the metrics show the newest realized preview at 2x (made from 20)
        assert m.eval_value("relexd_preview_realized_gain_share", ("2x",)) == pytest.approx(0.2 / 0.15)
        assert m.eval_value("relexd_preview_realized_advantage", ("2x",)) == pytest.approx(0.20)
        assert m.eval_value("relexd_checkpoint_eval_score") == pytest.approx(0.45)
        assert m.eval_value("relexd_checkpoint_eval_step") == 40
        # lead of target ahead:2x = preview 80@40 − checkpoint 40; leads at evaluation time were
        # 0.15, 0.20, 0.02, 0.05: four positive in a row
        assert m.eval_value("relexd_preview_lead", ("ahead:2x",)) == pytest.approx(0.05)
        assert m.eval_value("relexd_preview_lead_streak", ("ahead:2x", "2x")) == 4
        assert m.registry.get_sample_value("relexd_preview_eval_score", {"target": "ahead:2x"}) == 0.5
        ok = {"kind": "preview", "outcome": "ok"}
        assert m.registry.get_sample_value("relexd_evaluations_total", ok) == 4
        assert m.registry.get_sample_value("relexd_preview_hook_failures_total") == 0
        # the published preview carries its score; status shows the ledger
        manifest = json.loads((tmp_path / "state" / "previews" / "step-80" / MANIFEST).read_text())
        assert manifest["evaluation"]["score"] == 0.5 and manifest["evaluation"]["made_from"] == 40
        info = collect(tmp_path / "state")
        assert info["evaluations"]["realized"]["2x"]["gain_share"] == pytest.approx(0.2 / 0.15)
        assert info["evaluations"]["leads"]["ahead:2x"]["streak"] == 4
    finally:
        svc.shutdown()


def test_rotated_checkpoint_is_recorded_gone_and_eval_every_thins_previews(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    scores = SCORES | {"checkpoint:50": 0.5, "preview:100@50": 0.6, "checkpoint:60": 0.55}
    svc = WatchService(settings(tmp_path, base, evaluator(tmp_path, scores), eval_every=2))
    svc.open()
    gate = tmp_path / "eval" / "gate"
    try:
        gate.touch()  # the evaluator waits: the trainer rotates checkpoint 20 meanwhile
        hf_save(tmp_path / "run", 10, planted.at(10))
        svc.pass_once(force_stable=True)  # refresh 0: evaluated
        for step in (20, 30):
            hf_save(tmp_path / "run", step, planted.at(step))
            svc.pass_once(force_stable=True)  # 20: reaches preview 20@10; 30: refresh 2, evaluated
        shutil.rmtree(tmp_path / "run" / "checkpoint-20")
        gate.unlink()
        settle(svc)
        assert status_of(svc) == {
            "checkpoint:10": "done",
            "preview:20@10": "superseded",  # still queued when preview 60@30 of its target came
            "checkpoint:20": "gone",  # the first checkpoint at the target, deleted before its turn
            "checkpoint:30": "done",
            "preview:60@30": "done",
        }  # refresh 1 (step 20, preview 40@20) was not due with --eval-every 2
        records = {r["key"]: r for r in svc.evaluations.records()}
        assert records["preview:20@10"]["reached_by"] == 20 and "realized" not in records["preview:20@10"]
        gone = {"kind": "checkpoint", "outcome": "gone"}
        assert svc.metrics.registry.get_sample_value("relexd_evaluations_total", gone) == 1
        assert (
            svc.metrics.eval_value("relexd_preview_realized_gain_share", ("2x",)) is None
        )  # unknown: absent
    finally:
        svc.shutdown()


def test_failed_and_unscored_runs_are_counted_and_not_retried(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    cmd = evaluator(tmp_path, {"checkpoint:10": 0.1})  # no score for the preview: KeyError, exit 1
    svc = WatchService(settings(tmp_path, base, cmd))
    svc.open()
    try:
        hf_save(tmp_path / "run", 10, planted.at(10))
        svc.pass_once(force_stable=True)
        settle(svc)
        svc.pass_once(force_stable=True)  # nothing new: nothing re-run
        settle(svc)
        assert status_of(svc) == {"checkpoint:10": "done", "preview:20@10": "failed"}
        assert "exit status 1" in next(
            r["error"] for r in svc.evaluations.records() if r["status"] == "failed"
        )
        assert svc.metrics.registry.get_sample_value("relexd_preview_hook_failures_total") == 1
        assert calls(tmp_path) == ["checkpoint:10", "preview:20@10"]
    finally:
        svc.shutdown()


def _run_until_killed(root: str, base: str, cmd: str, kill_at: str) -> None:
    """Child process: a daemon that SIGKILLs itself inside the ledger's write of a result —
    ``before``: after the hook exited, before its result is on disk; ``after``: right after."""
    import relexd.daemon.evaluations as ev

    real = ev.EvalLedger.finish

    def finish(self: EvalLedger, job: Any, status: str, *a: Any, **kw: Any) -> None:
        if job.kind == "preview" and kill_at == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, job, status, *a, **kw)
        if job.kind == "preview" and kill_at == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    ev.EvalLedger.finish = finish  # type: ignore[method-assign]
    svc = WatchService(settings(Path(root), Path(base), cmd))
    svc.open()
    svc.pass_once(force_stable=True)
    time.sleep(60)  # the hook thread kills the process long before this


@pytest.mark.parametrize("kill_at", ["before", "after"])
def test_kill_between_hook_exit_and_commit_records_once_or_reruns(tmp_path: Path, kill_at: str) -> None:
    planted, base = make_base(tmp_path)
    cmd = evaluator(tmp_path, SCORES)
    hf_save(tmp_path / "run", 10, planted.at(10))
    child = multiprocessing.get_context("spawn").Process(
        target=_run_until_killed, args=(str(tmp_path), str(base), cmd, kill_at)
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    on_disk = {r["key"]: r["status"] for r in read_ledger(tmp_path / "state")["records"]}
    assert on_disk == {"checkpoint:10": "done", "preview:20@10": "pending" if kill_at == "before" else "done"}
    svc = WatchService(settings(tmp_path, base, cmd))
    svc.open()  # re-queues what is pending
    try:
        svc.pass_once(force_stable=True)
        settle(svc)
        assert status_of(svc) == {"checkpoint:10": "done", "preview:20@10": "done"}
        ran = calls(tmp_path)
        # the hook ran the preview twice when its result was lost with the process, once otherwise;
        # either way the ledger holds it once, with its score
        assert ran.count("preview:20@10") == (2 if kill_at == "before" else 1)
        assert ran.count("checkpoint:10") == 1
        records = [r for r in svc.evaluations.records() if r["key"] == "preview:20@10"]
        assert len(records) == 1 and records[0]["score"] == 0.25
    finally:
        svc.shutdown()


def test_ledger_keeps_a_bounded_history_and_moves_an_unreadable_file_aside(
    tmp_path: Path, monkeypatch
) -> None:
    import relexd.daemon.evaluations as ev

    monkeypatch.setattr(ev, "MAX_RECORDS", 6)
    ledger = EvalLedger(tmp_path, (2.0,))
    for a in range(1, 6):
        for job in ledger.after_preview("ahead:2x", 2 * a, a, tmp_path, tmp_path):  # checkpoint, preview
            if a < 5:
                ledger.finish(job, "done", 0.1 * a)
    keys = [r["key"] for r in read_ledger(tmp_path)["records"]]
    # the oldest finished records went; the pending ones (a = 5) are never dropped
    assert keys == [
        "checkpoint:3",
        "preview:6@3",
        "checkpoint:4",
        "preview:8@4",
        "checkpoint:5",
        "preview:10@5",
    ]
    assert [j.key for j in EvalLedger(tmp_path, (2.0,)).unfinished()] == ["checkpoint:5", "preview:10@5"]
    (tmp_path / LEDGER_FILE).write_text("{not json")
    fresh = EvalLedger(tmp_path, (2.0,))
    assert fresh.records() == []
    assert list(tmp_path.glob(LEDGER_FILE + ".unreadable-*"))


def test_a_preview_far_from_every_horizon_is_no_evidence_for_one(tmp_path: Path) -> None:
    """--preview-at 1000 made from step 30 is a 33x preview: recorded and validated in the ledger,
    but published neither as the 6x realized figure nor with a horizon the alert could match."""
    ledger = EvalLedger(tmp_path, (2.0, 6.0))
    ckpt, preview = ledger.after_preview("at:1000", 1000, 30, tmp_path, tmp_path)
    ledger.finish(ckpt, "done", 0.2)
    ledger.finish(preview, "done", 0.5)
    (reached,) = ledger.after_ingest(1000, tmp_path)
    ledger.finish(reached, "done", 0.4)
    rec = next(r for r in ledger.records() if r["key"] == "preview:1000@30")
    assert rec["realized"]["gain_share"] == pytest.approx(1.5)  # (0.5 − 0.2) / (0.4 − 0.2)
    fig = ledger.figures()
    assert fig.realized == {}
    assert fig.leads["at:1000"] == (pytest.approx(0.1), 1, "")


def test_malformed_records_are_skipped_not_fatal(tmp_path: Path) -> None:
    doc = {"format": 1, "last_evaluated_refresh": "x", "records": [{"key": "preview:2@1"}, 7]}
    (tmp_path / LEDGER_FILE).write_text(json.dumps(doc))
    ledger = EvalLedger(tmp_path, (2.0,))
    assert ledger.records() == [] and ledger.due(0, 1)
