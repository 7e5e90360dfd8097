"""``relexd watch`` as a subprocess on an empty directory while a separate writer process saves
checkpoints like real trainers (issue 3, acceptance 1)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relexd.errors import REASONS
from relexd.state.store import read_snapshot
from tests.daemon.trainer_sim import Daemon, make_base

SIM = str(Path(__file__).with_name("trainer_sim.py"))
STEPS = [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize(
    ("layout", "writer_args", "marker"),
    [
        ("hf", ["--shards", "3", "--pause", "0.15", "--keep", "2"], "checkpoint-"),
        ("verl", ["--pause", "0.2", "--keep", "2"], "global_step_"),
    ],
)
def test_watch_empty_dir_while_trainer_writes(
    tmp_path: Path, layout: str, writer_args: list[str], marker: str
) -> None:
    _, base = make_base(tmp_path, noise=0.001)
    run = tmp_path / "run"  # does not exist yet when the daemon starts
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.1)
    messages: list[str] = []
    done = threading.Event()

    def drain() -> None:  # like systemd: read promptly (the socket queue is only ~10 datagrams)
        while not done.is_set():
            try:
                messages.append(notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    daemon = Daemon(
        tmp_path,
        run,
        base,
        "--preview-ahead", "2", "--preview-at", "1000", "--debounce", "0.3", "--reconcile-interval", "5",
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"},
    )  # fmt: skip
    try:
        daemon.wait_url()
        daemon.wait_for(lambda: daemon.get("/readyz")[0] == 200, what="readyz")
        assert daemon.get("/healthz")[0] == 200
        writer = subprocess.run(
            [sys.executable, SIM, str(run), "--layout", layout, "--steps", ",".join(map(str, STEPS)),
             "--noise", "0.001", "--interval", "0.5", *writer_args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert writer.returncode == 0, writer.stderr
        daemon.wait_for(lambda: daemon.steps()[-1:] == [60], what="step 60 ingested")
        daemon.wait_for(lambda: (daemon.state / "previews" / "step-120").is_dir(), what="preview 120")
        time.sleep(0.5)

        meta = read_snapshot(daemon.state).meta
        assert meta["steps"] == STEPS  # every checkpoint, in order, exactly once
        sources = [Path(h["source"]).name for h in meta["history"]]
        assert sources == [f"{marker}{s}" for s in STEPS]  # complete checkpoints only
        for reason in REASONS:  # nothing half-written was ever read, not even as an "error"
            assert daemon.metric("relexd_checkpoint_errors_total", reason=reason) == 0, reason
        assert daemon.metric("relexd_checkpoints_ingested_total") == len(STEPS)
        assert daemon.metric("relexd_last_checkpoint_step") == 60
        assert daemon.metric("relexd_watcher_up") == 1
        previews = sorted(p.name for p in (daemon.state / "previews").iterdir())
        assert previews == ["step-1000", "step-120"]  # superseded ahead targets were removed
        assert daemon.metric("relexd_preview_step", target="ahead:2x") == 120
        assert daemon.metric("relexd_preview_step", target="at:1000") == 1000
        logs = daemon.logs()
        ingested = [r for r in logs if r.get("event") == "checkpoint ingested"]
        assert [r["step"] for r in ingested] == STEPS and all(r["path"] for r in ingested)
        # the log says what became of each replaced sketch's pages; a tiny state fits in RAM
        assert [r.get("replaced_sketch") for r in ingested] == [None] + ["kept"] * (len(STEPS) - 1)
        assert [r.get("new_sketch") for r in ingested] == ["cached"] * len(STEPS)
        assert not [r for r in logs if r.get("level") in ("error", "critical")]

        status = subprocess.run(
            [sys.executable, "-m", "relexd", "status", "--state-dir", str(daemon.state), "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert '"observed": 6' in status.stdout and "step-120" in status.stdout
    finally:
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 5
    time.sleep(0.3)
    done.set()
    reader.join(5)
    notify.close()
    assert any("READY=1" in m for m in messages)
    assert any("STOPPING=1" in m for m in messages)
    assert sum("WATCHDOG=1" in m for m in messages) >= 3  # pinged while the workers lived
