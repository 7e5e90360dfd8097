"""The ``--eval`` hook: argv substitution without a shell, timeout, score, failures."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from relexd.daemon.config import WatchSettings
from relexd.daemon.evaluations import EvalJob
from relexd.daemon.hook import EvalHook, HookResult, build_argv, parse_score
from relexd.daemon.service import WatchService
from tests.daemon.trainer_sim import hf_save, make_base

PY = sys.executable


def test_placeholders_are_substituted_per_argv_item_without_a_shell() -> None:
    argv = build_argv(
        "eval --model {path} --tag step={step} '{target}' {kind} from={made_from} ; rm -rf /",
        path=Path("/p/a b"),
        step=60,
        target="ahead:2x",
        kind="preview",
        made_from=30,
    )
    assert argv == [
        "eval", "--model", "/p/a b", "--tag", "step=60", "ahead:2x", "preview", "from=30",
        ";", "rm", "-rf", "/",
    ]  # fmt: skip


def test_parse_score() -> None:
    assert parse_score('log\n{"score": 0.75, "n": 3}\n\n') == 0.75
    assert parse_score('{"score": 1}') == 1.0
    for bad in ("", "0.7", '{"score": "high"}', '{"score": true}', '{"score": NaN}', "[1]", '{"acc": 1}'):
        assert parse_score(bad) is None, bad


class Recorder:
    def __init__(self) -> None:
        self.results: list[tuple[EvalJob, HookResult]] = []

    def hook(self, cmd: str, timeout: float = 10.0) -> EvalHook:
        return EvalHook(cmd, timeout, on_result=lambda job, res: self.results.append((job, res)))

    @property
    def outcomes(self) -> list[str]:
        return [r.outcome for _, r in self.results]


def preview_job(path: Path, step: int = 1, target: str = "t", made_from: int = 1) -> EvalJob:
    return EvalJob("preview", step, path, target, made_from)


def test_hook_receives_args_and_reports_score(tmp_path: Path) -> None:
    rec = Recorder()
    out = tmp_path / "args.json"
    script = (
        f"import json,sys; json.dump(sys.argv[1:], open({str(out)!r},'w')); "
        "print('x'); print(json.dumps({'score': 0.5}))"
    )
    hook = rec.hook(f'{PY} -c "{script}" {{path}} {{step}} {{target}} {{kind}} {{made_from}}')
    weights = tmp_path / "with space" / "step-60"
    weights.mkdir(parents=True)
    result = hook.submit(preview_job(weights, 60, "ahead:2x", 30)).result(30)
    hook.close()
    assert result.ok and result.score == 0.5
    assert json.loads(out.read_text()) == [str(weights), "60", "ahead:2x", "preview", "30"]
    assert rec.outcomes == ["ok"]


def test_hook_timeout_nonzero_exit_no_score_missing_program_and_gone_weights(tmp_path: Path) -> None:
    rec = Recorder()
    slow = rec.hook(f"{PY} -c 'import time; time.sleep(30)'", timeout=0.5)
    started = time.monotonic()
    res = slow.submit(preview_job(tmp_path)).result(30)
    assert res.outcome == "timeout" and "timed out" in (res.error or "") and time.monotonic() - started < 10
    slow.close()
    bad = rec.hook(f'{PY} -c \'import sys; print("{{\\"score\\": 1}}"); sys.exit(3)\'')
    assert bad.submit(preview_job(tmp_path)).result(30).outcome == "exit"
    bad.close()
    chatty = rec.hook(f"{PY} -c 'print(\"accuracy 0.9\")'")
    res = chatty.submit(preview_job(tmp_path)).result(30)
    assert res.outcome == "no_score" and "accuracy 0.9" in (res.error or "")
    chatty.close()
    missing = rec.hook("/nonexistent/evaluator {path}")
    assert missing.submit(preview_job(tmp_path)).result(30).outcome == "cannot_run"
    missing.close()
    assert missing.submit(preview_job(tmp_path)) is None  # closed: nothing more is queued
    late = rec.hook(f"{PY} -c 'print(1)'")
    assert late.submit(preview_job(tmp_path / "deleted-by-the-trainer")).result(30).outcome == "gone"
    late.close()
    assert rec.outcomes == ["timeout", "exit", "no_score", "cannot_run", "gone"]
    assert all(r.score is None for _, r in rec.results)


def test_a_newer_preview_replaces_a_queued_one_of_its_target(tmp_path: Path) -> None:
    rec = Recorder()
    hook = rec.hook(f'{PY} -c \'import time; time.sleep(0.5); print("{{\\"score\\": 1}}")\'')
    first = hook.submit(preview_job(tmp_path, 20, "a", 10))  # starts at once
    queued = hook.submit(preview_job(tmp_path, 40, "a", 20))
    other = hook.submit(preview_job(tmp_path, 50, "b", 20))
    newest = hook.submit(preview_job(tmp_path, 60, "a", 30))
    for f in (first, other, newest):
        assert f is not None and f.result(30).ok
    hook.close()
    assert queued is not None and queued.cancelled()
    by_key = {job.key: res.outcome for job, res in rec.results}
    assert by_key == {
        "preview:20@10": "ok",
        "preview:40@20": "superseded",
        "preview:50@20": "ok",
        "preview:60@30": "ok",
    }


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
        eval_command=f"{PY} {evaluator} {{path}} {{step}}",
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
