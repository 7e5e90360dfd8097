"""Daemon options the end-to-end tests do not exercise: --per-tensor-metrics, --preview-keep, --eval
through the CLI, and the human-readable `relexd status` table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relexd.engine.config import default_workers
from tests.daemon.trainer_sim import Daemon, hf_save, make_base

ROOT = Path(__file__).resolve().parents[2]


def relexd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "relexd", *args], capture_output=True, text=True, env=env)


def test_per_tensor_metrics_only_when_asked(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path, noise=0.001)
    run = tmp_path / "run"
    for s in (10, 20, 30):
        hf_save(run, s, planted.at(s))
    for flag, expected in (("--per-tensor-metrics", True), ("--no-per-tensor-metrics", False)):
        root = tmp_path / flag
        root.mkdir()
        daemon = Daemon(root, run, base, flag, "--debounce", "0.1")
        try:
            daemon.wait_url()
            daemon.wait_for(lambda d=daemon: d.steps() == [10, 20, 30], what="ingest")
            daemon.wait_for(lambda d=daemon: d.metric("relexd_observed_checkpoints") == 3, what="metrics")
            value = daemon.metric("relexd_tensor_energy_ratio", tensor="model.norm.weight")
            assert (value is not None) is expected, flag
            if expected:
                assert 0.0 < value <= 1.0
        finally:
            assert daemon.stop() == 0


def test_the_cores_each_ingest_used_are_published(tmp_path: Path) -> None:
    """relexd_ingest_tensors_in_flight says what the newest ingest computed at once: the user's
    --threads as given, and with the default at least one and at most the default's workers.
    The others' busy cores are absent with --threads (nobody is watched), and with the default
    until ingests of half a second in all were measured (these tiny ones take milliseconds)."""
    planted, base = make_base(tmp_path, noise=0.001)
    run = tmp_path / "run"
    for s in (10, 20, 30):
        hf_save(run, s, planted.at(s))
    for flag in ("--threads=3", None):
        root = tmp_path / (flag or "default")
        root.mkdir()
        daemon = Daemon(root, run, base, *([flag] if flag else []), "--debounce", "0.1")
        try:
            daemon.wait_url()
            daemon.wait_for(lambda d=daemon: d.metric("relexd_observed_checkpoints") == 3, what="metrics")
            in_flight = daemon.metric("relexd_ingest_tensors_in_flight")
            busy = daemon.metric("relexd_ingest_others_busy_cores")
            if flag:
                assert (in_flight, busy) == (3, None)
            else:
                assert in_flight is not None and 1 <= in_flight <= default_workers()
                assert busy is None or busy >= 0
        finally:
            assert daemon.stop() == 0


def test_preview_keep_bounds_superseded_previews(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path, noise=0.001)
    run, state = tmp_path / "run", tmp_path / "state"
    previews = state / "previews"

    def once(step: int) -> set[str]:
        hf_save(run, step, planted.at(step))
        res = relexd(
            "watch", str(run), "--base", str(base), "--state-dir", str(state), "--once",
            "--listen", "", "--preview-ahead", "2", "--preview-keep", "1", "--debounce", "0",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return {p.name for p in previews.iterdir() if p.name.startswith("step-")}

    assert once(10) == {"step-20"}
    assert once(20) == {"step-40", "step-20"}  # one superseded preview kept
    assert once(30) == {"step-60", "step-40"}  # …and only the newest one of those


def test_status_table_shows_figures_and_previews(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path, noise=0.001)
    run, state = tmp_path / "run", tmp_path / "state"
    for s in (10, 20, 30, 40, 50):
        hf_save(run, s, planted.at(s))
    res = relexd("watch", str(run), "--base", str(base), "--state-dir", str(state), "--once",
                 "--listen", "", "--preview-at", "500", "--debounce", "0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = relexd("status", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for words in ("observed checkpoints", "10, 20, 30, 40, 50", "rank1 energy ratio", "fit r2", "2x", "500"):
        assert words in text, (words, text)


def test_eval_option_old_name_and_horizons_following_previews(tmp_path: Path) -> None:
    from tests.daemon.test_evaluations import evaluator

    planted, base = make_base(tmp_path, noise=0.001)
    run, state = tmp_path / "run", tmp_path / "state"
    cmd = evaluator(
        tmp_path, {"checkpoint:10": 0.1, "preview:30@10": 0.3, "checkpoint:30": 0.35, "preview:90@30": 0.4}
    )
    common = ["watch", str(run), "--base", str(base), "--state-dir", str(state), "--once", "--listen", "",
              "--preview-ahead", "3", "--debounce", "0"]  # fmt: skip
    hf_save(run, 10, planted.at(10))
    both = relexd(*common, "--eval", cmd, "--on-preview", cmd)
    assert both.returncode == 2 and "only --eval" in both.stderr
    old = relexd(*common, "--on-preview", cmd)  # the old name still works, with a warning
    assert old.returncode == 0, old.stderr
    assert "--on-preview is deprecated; use --eval" in old.stderr
    hf_save(run, 30, planted.at(30))
    new = relexd(*common, "--eval", cmd)
    assert new.returncode == 0, new.stderr
    info = json.loads(relexd("status", "--state-dir", str(state), "--json").stdout)
    assert info["config"]["horizons"] == [3.0]  # a 3x preview is judged by a 3x skill
    ev = info["evaluations"]
    assert [(r["key"], r["status"]) for r in ev["recent"]] == [
        ("checkpoint:10", "done"), ("preview:30@10", "done"),
        ("checkpoint:30", "done"), ("preview:90@30", "done"),
    ]  # fmt: skip
    # (0.3 − 0.1) / (0.35 − 0.1), at the 3x horizon
    assert ev["realized"]["3x"]["gain_share"] == pytest.approx(0.8)
    text = relexd("status", "--state-dir", str(state)).stdout
    for words in ("realized at 3x", "share of training's gain 0.8", "lead of ahead:3x", "preview"):
        assert words in text, (words, text)


def test_the_env_example_covers_every_watch_option() -> None:
    """An operator's env file starts from the example: each option is there, set or commented at
    its default, or named under "Not here on purpose"."""
    import re

    from typer.main import get_command

    from relexd.cli import app

    watch = get_command(app).commands["watch"]  # type: ignore[attr-defined]
    variables = {p.envvar for p in watch.params if p.envvar}
    text = (Path(__file__).resolve().parents[2] / "systemd" / "relexd.env.example").read_text()
    listed = set(re.findall(r"^#?(RELEXD_[A-Z_]+)=", text, re.M))
    excluded = set(re.findall(r"^# (RELEXD_[A-Z_]+) —", text, re.M))
    assert excluded == {"RELEXD_STATE_DIR", "RELEXD_ONCE", "RELEXD_ON_PREVIEW"}
    assert variables - listed - excluded == set()
    assert listed <= variables, listed - variables  # no stale names either


def test_the_daemon_keeps_its_startup_heap_out_of_full_collections(tmp_path: Path) -> None:
    """A full garbage collection holds the GIL while it walks every tracked object: with the
    ~250 000 the daemon starts with, 150 ms of every thread standing still (beside a trainer that
    saves every 50 ms, long enough to lose checkpoints to rotation). ``relexd watch`` freezes them
    at start, so a full collection walks only what was made since (measured: 0.5 ms)."""
    code = (
        "import gc; from relexd.daemon.cli import freeze_startup_heap as f; print(f(), len(gc.get_objects()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    frozen, walked = (int(v) for v in out.stdout.split())
    assert frozen > 100_000 and walked < frozen / 100

    _, base = make_base(tmp_path, noise=0.001)
    daemon = Daemon(tmp_path, tmp_path / "run", base)
    try:
        daemon.wait_url()
        said = [r for r in daemon.logs() if str(r.get("event", "")).startswith("startup objects moved")]
    finally:
        assert daemon.stop() == 0
    assert said and said[0]["objects"] > 100_000  # the daemon itself did it, before its threads started


@pytest.mark.parametrize("idle_s", [0.0, 3600.0])
def test_the_daemon_frees_the_buffers_kept_for_the_next_ingest_once_idle(
    tmp_path: Path, idle_s: float
) -> None:
    """After an ingest the tasks' buffers stay for the next one (relexd.engine.memory.TaskBuffers);
    a round that ingests nothing frees them once none was used for ``buffer_idle_s``."""
    from relexd.daemon.config import WatchSettings
    from relexd.daemon.service import WatchService

    planted, base = make_base(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    settings = WatchSettings(
        run_dir=run, base=base, state_dir=tmp_path / "state", debounce=0.0, buffer_idle_s=idle_s
    )
    service = WatchService(settings)
    service.open()
    assert service.engine is not None
    try:
        hf_save(run, 10, planted.at(10))
        service.pass_once(force_stable=True)
        assert service.engine.steps == [10]
        kept = service.engine.backend.pool.buffers  # type: ignore[attr-defined]
        assert kept.kept_bytes > 0  # an ingest's round keeps them
        service.pass_once(force_stable=True)  # nothing new
        assert (kept.kept_bytes == 0) == (idle_s == 0.0)
    finally:
        service.engine.close()
