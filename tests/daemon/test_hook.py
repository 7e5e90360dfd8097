"""The ``--on-preview`` hook: argv substitution without a shell, timeout, score, failures."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from relexd.daemon.config import WatchSettings
from relexd.daemon.hook import PreviewHook, build_argv, parse_score
from relexd.daemon.service import WatchService
from tests.daemon.trainer_sim import hf_save, make_base

PY = sys.executable


def test_placeholders_are_substituted_per_argv_item_without_a_shell() -> None:
    argv = build_argv(
        "eval --model {path} --tag step={step} '{target}' ; rm -rf /",
        path=Path("/p/a b"),
        step=60,
        target="ahead:2x",
    )
    assert argv == ["eval", "--model", "/p/a b", "--tag", "step=60", "ahead:2x", ";", "rm", "-rf", "/"]


def test_parse_score() -> None:
    assert parse_score('log\n{"score": 0.75, "n": 3}\n\n') == 0.75
    assert parse_score('{"score": 1}') == 1.0
    for bad in ("", "0.7", '{"score": "high"}', '{"score": true}', '{"score": NaN}', "[1]", '{"acc": 1}'):
        assert parse_score(bad) is None, bad


class Recorder:
    def __init__(self) -> None:
        self.scores: list[tuple[str, float]] = []
        self.failures = 0

    def hook(self, cmd: str, timeout: float = 10.0) -> PreviewHook:
        return PreviewHook(
            cmd, timeout, on_score=lambda t, s: self.scores.append((t, s)), on_failure=self._fail
        )

    def _fail(self) -> None:
        self.failures += 1


def test_hook_receives_args_and_reports_score(tmp_path: Path) -> None:
    rec = Recorder()
    out = tmp_path / "args.json"
    script = (
        f"import json,sys; json.dump(sys.argv[1:], open({str(out)!r},'w')); "
        "print('x'); print(json.dumps({'score': 0.5}))"
    )
    hook = rec.hook(f'{PY} -c "{script}" {{path}} {{step}} {{target}}')
    result = hook.submit(tmp_path / "with space" / "step-60", 60, "ahead:2x").result(30)
    hook.close()
    assert result.ok and result.score == 0.5
    assert json.loads(out.read_text()) == [str(tmp_path / "with space" / "step-60"), "60", "ahead:2x"]
    assert rec.scores == [("ahead:2x", 0.5)] and rec.failures == 0


def test_hook_timeout_nonzero_exit_and_missing_program_are_counted(tmp_path: Path) -> None:
    rec = Recorder()
    slow = rec.hook(f"{PY} -c 'import time; time.sleep(30)'", timeout=0.5)
    started = time.monotonic()
    res = slow.submit(tmp_path, 1, "t").result(30)
    assert not res.ok and "timed out" in (res.error or "") and time.monotonic() - started < 10
    slow.close()
    bad = rec.hook(f'{PY} -c \'import sys; print("{{\\"score\\": 1}}"); sys.exit(3)\'')
    assert not bad.submit(tmp_path, 1, "t").result(30).ok
    bad.close()
    missing = rec.hook("/nonexistent/evaluator {path}")
    assert not missing.submit(tmp_path, 1, "t").result(30).ok
    missing.close()
    assert rec.failures == 3 and rec.scores == []


def test_daemon_runs_hook_after_preview_and_exports_score(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    run = tmp_path / "run"
    hf_save(run, 10, planted.at(10))
    evaluator = tmp_path / "evaluate.py"
    evaluator.write_text(
        "import json, os, sys\nassert os.path.isdir(sys.argv[1])\n"
        "print(json.dumps({'score': int(sys.argv[2])}))\n"
    )
    settings = WatchSettings(
        run_dir=run,
        base=base,
        state_dir=tmp_path / "state",
        preview_ahead=(2.0,),
        on_preview=f"{PY} {evaluator} {{path}} {{step}}",
    )
    svc = WatchService(settings)
    svc.open()
    svc.pass_once(force_stable=True)
    assert svc.hook is not None
    deadline = time.monotonic() + 30
    value = None
    while time.monotonic() < deadline and value is None:
        value = svc.metrics.registry.get_sample_value("relexd_preview_eval_score", {"target": "ahead:2x"})
        time.sleep(0.05)
    svc.shutdown()
    assert value == 20.0
    assert svc.metrics.registry.get_sample_value("relexd_preview_hook_failures_total") == 0
