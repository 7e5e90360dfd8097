"""Observer choice, the polling path, the reconcile rescan, SIGTERM and the CLI's option sources."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from watchdog.observers.polling import PollingObserver

from relexd.daemon import watcher
from relexd.daemon.cli import register
from relexd.daemon.config import WatchSettings
from relexd.daemon.service import WatchService
from relexd.errors import ConfigError
from relexd.state.store import read_snapshot
from tests.daemon.trainer_sim import Daemon, hf_save, make_base

SIM = str(Path(__file__).with_name("trainer_sim.py"))


def test_fs_type_from_mounts_picks_polling_on_network_fs(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        "server:/export /mnt/runs nfs4 rw 0 0\n"
        "lustre@tcp:/fs /mnt/runs/lus lustre rw 0 0\n"
        "s3fs /mnt/s3\\040bucket fuse.s3fs rw 0 0\n"
    )
    assert watcher.fs_type(Path("/mnt/runs/exp42/not-yet"), str(mounts)) == "nfs4"
    assert watcher.fs_type(Path("/mnt/runs/lus/x"), str(mounts)) == "lustre"
    assert watcher.fs_type(Path("/mnt/s3 bucket/x"), str(mounts)) == "fuse.s3fs"
    assert watcher.fs_type(Path("/home/x"), str(mounts)) == "overlay"
    for kind in ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "fuse.s3fs", "fuse.gcsfuse"):
        assert watcher.needs_polling(kind), kind
    for kind in ("ext4", "xfs", "overlay", "tmpfs", "btrfs", None):
        assert not watcher.needs_polling(kind), kind


def test_network_fs_gets_polling_observer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher, "fs_type", lambda path: "nfs4")
    w = watcher.RunWatcher(tmp_path, lambda p: None, poll=False, poll_interval=1.0)
    assert w.polling and isinstance(w.observer, PollingObserver)
    monkeypatch.setattr(watcher, "fs_type", lambda path: "ext4")
    assert not watcher.RunWatcher(tmp_path, lambda p: None, poll=False, poll_interval=1.0).polling


def _start(settings: WatchSettings) -> tuple[WatchService, threading.Thread]:
    svc = WatchService(settings)
    svc.open()
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    return svc, thread


def _wait(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _steps(state: Path) -> list[int]:
    return read_snapshot(state, load_small=False).meta.get("steps", [])


def test_polling_observer_notices_checkpoints(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    run, state = tmp_path / "run", tmp_path / "state"
    hints: list[str] = []
    settings = WatchSettings(
        run_dir=run,
        base=base,
        state_dir=state,
        poll=True,
        poll_interval=0.2,
        debounce=0.1,
        reconcile_interval=600,
    )
    svc, thread = _start(settings)
    try:
        _wait(svc._first_scan.is_set)
        real_hint = svc.hint
        svc.watcher._handler._hint = lambda p: (hints.append(p), real_hint(p))  # type: ignore[attr-defined]
        assert isinstance(svc.watcher.observer, PollingObserver)
        hf_save(run, 10, planted.at(10))  # run dir created after start: noticed by the parent watch
        _wait(lambda: _steps(state) == [10])
        hf_save(run, 20, planted.at(20))
        _wait(lambda: _steps(state) == [10, 20])
        assert hints, "the polling observer delivered no events (reconcile is 600 s)"
    finally:
        svc.stop_event.set()
        thread.join(10)
    assert not thread.is_alive()


def test_reconcile_rescan_catches_what_the_observer_missed(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    settings = WatchSettings(run_dir=run, base=base, state_dir=state, debounce=0.0, reconcile_interval=0.5)
    svc, thread = _start(settings)
    try:
        _wait(svc._first_scan.is_set)
        svc.watcher._handler._hint = lambda p: None  # type: ignore[attr-defined]  # observer goes deaf
        job = svc.scheduler.get_job("reconcile")
        assert job.misfire_grace_time >= 1 and job.coalesce and job.max_instances == 1
        hf_save(run, 10, planted.at(10))
        _wait(lambda: _steps(state) == [10], timeout=20)
    finally:
        svc.stop_event.set()
        thread.join(10)


def test_sigterm_mid_run_exits_zero_quickly(tmp_path: Path) -> None:
    _, base = make_base(tmp_path)
    run = tmp_path / "run"
    daemon = Daemon(tmp_path, run, base, "--preview-ahead", "2", "--debounce", "0")
    writer = subprocess.Popen(
        [
            sys.executable,
            SIM,
            str(run),
            "--steps",
            ",".join(str(s) for s in range(1, 200)),
            "--interval",
            "0.02",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        daemon.wait_url()
        daemon.wait_for(lambda: len(daemon.steps()) >= 3, what="a few ingests")
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        rc = daemon.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        writer.kill()
        writer.wait()
        daemon.stop()
    assert rc == 0 and elapsed < 5, (rc, elapsed, daemon.tail())
    steps = read_snapshot(daemon.state).meta["steps"]  # the state is valid and ordered
    assert steps == sorted(steps) and len(steps) >= 3
    assert any(r.get("event") == "stopped" for r in daemon.logs())


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_config_file_env_and_flags_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, WatchSettings] = {}

    class Fake:
        def __init__(self, settings: WatchSettings, metrics: object) -> None:
            captured["s"] = settings

        def open(self) -> None:
            pass

        def run(self) -> int:
            return 0

    monkeypatch.setattr("relexd.daemon.service.WatchService", Fake)
    cfg = tmp_path / "relexd.toml"
    cfg.write_text(
        'base = "/models/base"\npreview-ahead = [2, 4]\npreview_every = 3\n'
        'debounce = 7.5\nstate-dir = "/s/from-file"\n'
    )
    env = {"RELEXD_CONFIG": str(cfg), "RELEXD_DEBOUNCE": "1.5", "RELEXD_STATE_DIR": "/s/from-env"}
    result = CliRunner().invoke(_app(), ["watch", str(tmp_path / "run"), "--preview-every", "5"], env=env)
    assert result.exit_code == 0, result.output
    s = captured["s"]
    assert s.base == Path("/models/base")  # file
    assert s.preview_ahead == (2.0, 4.0)  # file (list)
    assert s.preview_every == 5  # flag beats file
    assert s.debounce == 1.5  # env beats file
    assert s.state_dir == Path("/s/from-env")
    cfg.write_text('bogus-key = 1\nbase = "/b"\n')
    result = CliRunner().invoke(_app(), ["watch", "run", "--config", str(cfg)])
    assert result.exit_code != 0 and "bogus_key" in result.output


def test_preview_dir_inside_run_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inside the run directory"):
        WatchSettings(
            run_dir=tmp_path / "run", base=tmp_path, state_dir=tmp_path / "s", preview_dir=tmp_path / "run/p"
        )
    result = CliRunner().invoke(
        _app(),
        [
            "watch",
            str(tmp_path / "run"),
            "--base",
            str(tmp_path),
            "--preview-dir",
            str(tmp_path / "run" / "x"),
        ],
    )
    assert result.exit_code == 2 and "inside the run directory" in result.output


def test_changed_base_is_a_clear_startup_error(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path)
    run, state = tmp_path / "run", tmp_path / "state"
    hf_save(run, 10, planted.at(10))
    args = ["watch", str(run), "--state-dir", str(state), "--once", "--listen", ""]
    assert CliRunner().invoke(_app(), [*args, "--base", str(base)]).exit_code == 0
    _, other = make_base(tmp_path / "other", seed=5)
    result = subprocess.run(
        [sys.executable, "-m", "relexd", *args, "--base", str(other)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "different base model" in result.stderr and "Traceback" not in result.stderr
    (state / "CURRENT").write_text('{"format": 99, "generation": null}')
    result = CliRunner().invoke(_app(), [*args, "--base", str(base)])
    assert result.exit_code == 2 and "state format" in result.output


def test_inotify_delivers_completion_events_only(tmp_path: Path) -> None:
    """relexd's own reads (an open and a close per file, for every checkpoint it reads or pins)
    never reach the observer thread: watcher.EVENTS is the inotify mask, so the kernel does not
    queue them. Writing, renaming and deleting still do."""
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    hints: list[str] = []
    delivered: list[str] = []
    w = watcher.RunWatcher(run, hints.append, poll=False, poll_interval=1.0)
    real_dispatch = w._handler.dispatch
    w._handler.dispatch = lambda e: (delivered.append(e.event_type), real_dispatch(e))  # type: ignore[method-assign]
    w.start()
    try:
        time.sleep(0.3)
        part = run / "checkpoint-1" / "model.safetensors.tmp"
        part.write_bytes(b"\0" * 4096)
        part.rename(part.with_suffix(""))
        _wait(lambda: "moved" in delivered, timeout=10)
        assert "closed" in delivered  # close after write: "this file is complete"
        time.sleep(0.3)
        delivered.clear()
        for _ in range(50):
            (run / "checkpoint-1" / "model.safetensors").read_bytes()
        time.sleep(0.5)
        assert delivered == [], f"relexd's own reads reached the observer: {delivered[:6]}"
        (run / "checkpoint-1" / "model.safetensors").unlink()
        _wait(lambda: "deleted" in delivered, timeout=10)
        assert hints
    finally:
        w.stop()


def test_polling_observer_sees_a_file_rewritten_in_place(tmp_path: Path) -> None:
    """Polling has no close events: a tracker file rewritten in place (verl's
    latest_checkpointed_iteration.txt) is only "modified" there and must still wake the scout."""
    run = tmp_path / "run"
    run.mkdir()
    tracker = run / "latest_checkpointed_iteration.txt"
    tracker.write_text("10")
    hints: list[str] = []
    w = watcher.RunWatcher(run, hints.append, poll=True, poll_interval=0.2)
    w.start()
    try:
        time.sleep(0.6)
        hints.clear()
        with tracker.open("w") as fh:  # same inode, new size and mtime
            fh.write("20 ")
        _wait(lambda: any(h.endswith("latest_checkpointed_iteration.txt") for h in hints), timeout=10)
    finally:
        w.stop()
