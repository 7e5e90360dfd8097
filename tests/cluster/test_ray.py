"""relexd on a real (local) Ray cluster: two workers follow a planted run and commit what one host
commits; a worker SIGKILLed mid-ingest at several points, and the coordinator killed -9, end in
the uninterrupted state with nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.ray_cluster import AUTH, ROOT, local_cluster

os.environ.update(AUTH)  # read when ray is imported (tests/cluster/ray_cluster.py)
ray = pytest.importorskip("ray")  # the relexd[ray] extra; the test dependencies include it

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from relexd.cluster.ray_backend import ClusterSettings, ray_tensors  # noqa: E402
from relexd.engine import Engine, EngineConfig  # noqa: E402
from relexd.errors import WorkerLost  # noqa: E402
from relexd.state.store import read_snapshot  # noqa: E402
from tests.cluster.state_view import assert_same_state  # noqa: E402
from tests.daemon.trainer_sim import Daemon  # noqa: E402
from tests.engine.test_workers import STEPS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


def _connect(address: str, pause: str | None = None) -> None:
    env = {"PYTHONPATH": str(ROOT)} | ({"RELEXD_TEST_PAUSE": pause} if pause else {})
    runtime_env: dict[str, object] = {"env_vars": env}
    if pause:
        runtime_env["worker_process_setup_hook"] = "tests.cluster.pause_hook.install"
    ray.init(address=address, namespace="relexd-test", log_to_driver=False, runtime_env=runtime_env)


def _engine(state: Path, base: Path, workers: int = 2) -> Engine:
    settings = ClusterSettings(workers=workers, cpus_per_worker=0.5, timeout_s=120)
    backend = ray_tensors(settings, base, EngineConfig(), state)
    return Engine(state, base, EngineConfig(), backend=backend)


def test_two_ray_workers_commit_the_single_host_state(
    cluster: str, run: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    root, base = run
    _connect(cluster)
    try:
        with _engine(tmp_path / "state", base) as engine:
            hosts = {(w.host, w.pid) for w in engine.backend.status}
            assert len(hosts) == 2 and all(pid != os.getpid() for _, pid in hosts)  # separate processes
            for step in STEPS:
                engine.ingest(root / f"checkpoint-{step}", step)
    finally:
        ray.shutdown()
    assert_same_state(reference, tmp_path / "state")
    assert len(read_snapshot(tmp_path / "state").meta["partition"]["parts"]) == 2


@pytest.mark.parametrize("point", ["reading", "writing", "written"])
def test_a_worker_killed_mid_ingest_is_restarted_and_the_run_ends_in_the_same_state(
    cluster: str, run: tuple[Path, Path], reference: Path, tmp_path: Path, point: str
) -> None:
    root, base = run
    marks = tmp_path / "marks"
    marks.mkdir()
    state = tmp_path / "state"
    killed: list[int] = []

    def kill_when_stopped() -> None:
        deadline = time.monotonic() + 120
        while not (marks / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if (marks / "pid").exists():
            killed.append(int((marks / "pid").read_text()))
            os.kill(killed[-1], signal.SIGKILL)

    _connect(cluster, pause=f"{point}:{marks}")
    try:
        with _engine(state, base) as engine:
            for step in STEPS[:2]:
                engine.ingest(root / f"checkpoint-{step}", step)
            killer = threading.Thread(target=kill_when_stopped)
            killer.start()
            (marks / "armed").touch()
            with pytest.raises(WorkerLost):  # an anchor-making checkpoint (the 4th is one too)
                engine.ingest(root / f"checkpoint-{STEPS[2]}", STEPS[2])
            killer.join()
            assert killed, f"no worker stopped at {point!r}"
            assert engine.steps == list(STEPS[:2])
            assert [p.name for p in (state / "generations").iterdir()] == [read_snapshot(state).name]
            for step in STEPS[2:]:  # Ray restarted the worker; the retry and the rest go through
                engine.ingest(root / f"checkpoint-{step}", step)
            assert all(w.up for w in engine.backend.status)
            assert killed[0] not in {w.pid for w in engine.backend.status}
    finally:
        ray.shutdown()
    assert_same_state(reference, state)


def _publish(run_dir: Path, source: Path, step: int) -> None:
    """The trainer saving a checkpoint: complete aside, then renamed in (trainer_state.json inside)."""
    aside = run_dir / f".tmp-checkpoint-{step}"
    shutil.copytree(source, aside)
    aside.rename(run_dir / f"checkpoint-{step}")


def test_the_daemon_killed_9_mid_ingest_restarts_into_the_same_state_with_no_orphans(
    cluster: str, run: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    """``relexd watch --ray``: the coordinator is killed -9 while its workers write their parts
    (its actors die with it); the restarted daemon places new workers, drops the half-written
    generation and ends in the single-host state, its preview equal to the single-host one.

    A worker is held at "writing" (tests/cluster/pause_hook.py): an ingest here takes ~60 ms, less
    than a poll of the state directory could be sure to catch."""
    root, base = run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    options = ["--ray", cluster, "--ray-workers", "2", "--ray-cpus-per-worker", "0.5", "--preview-at", "140"]
    options.append("--per-worker-metrics")
    for step in STEPS[:2]:
        _publish(run_dir, root / f"checkpoint-{step}", step)
    marks = tmp_path / "marks"
    marks.mkdir()
    pause = {"RAY_RUNTIME_ENV_HOOK": "tests.cluster.pause_hook.runtime_env"}
    pause["RELEXD_TEST_PAUSE"] = f"writing:{marks}"
    daemon = Daemon(tmp_path, run_dir, base, *options, env=pause)
    try:
        daemon.wait_url()
        daemon.wait_for(lambda: daemon.steps() == list(STEPS[:2]), timeout=180, what="the first two steps")
        assert any(r.get("event") == "ray workers placed" for r in daemon.logs())
        (marks / "armed").touch()
        _publish(run_dir, root / f"checkpoint-{STEPS[2]}", STEPS[2])
        generations = tmp_path / "state" / "generations"
        daemon.wait_for(lambda: (marks / "pid").exists(), timeout=120, what="a worker stopped while writing")
        assert any(generations.glob("*/sketch-*")) and len(list(generations.iterdir())) > 1  # parts begun
        daemon.proc.kill()
        daemon.proc.wait()
    finally:
        daemon.stop()
    assert read_snapshot(tmp_path / "state").meta["steps"] == list(STEPS[:2])  # killed before the commit
    for step in STEPS[3:]:
        _publish(run_dir, root / f"checkpoint-{step}", step)
    again = Daemon(tmp_path, run_dir, base, *options)
    try:
        again.wait_url()
        again.wait_for(lambda: again.steps() == list(STEPS), timeout=300, what="every step")
        preview = tmp_path / "state" / "previews" / "step-140"
        again.wait_for(lambda: _preview_of(preview) == STEPS[-1], timeout=120, what="the last preview")
        status = json.loads((tmp_path / "state" / "cluster.json").read_text())
        metrics = {n: again.metric(n) for n in ("relexd_cluster_workers", "relexd_cluster_workers_up")}
        parts_timed = again.metric("relexd_cluster_worker_part_seconds_count")
        each = [again.metric("relexd_cluster_worker_up", worker=str(i)) for i in range(3)]
    finally:
        assert again.stop(timeout=60) == 0
    assert status["up"] == 2 and len(status["workers"]) == 2
    assert metrics == {"relexd_cluster_workers": 2, "relexd_cluster_workers_up": 2}
    assert parts_timed and parts_timed >= 2 * len(STEPS[2:])  # each worker's part of each checkpoint
    assert each == [1.0, 1.0, None]  # opt-in: one series per worker
    shown = subprocess.run(
        [sys.executable, "-m", "relexd", "status", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert shown.returncode == 0 and "2 of 2 up" in shown.stdout and "state in 2 parts" in shown.stdout
    state = tmp_path / "state"
    assert_same_state(reference, state, sources=False)  # read from another directory, else equal
    snap = read_snapshot(state)
    assert [p.name for p in (state / "generations").iterdir()] == [snap.name]
    assert set(snap.path.iterdir()) == snap.files()  # no orphan part of the killed try
    anchors = {f"a{a['step']:012d}" for a in snap.meta["anchors"]}
    assert {p.name for p in (state / "anchors").iterdir()} == anchors
    with Engine(reference, base, EngineConfig()) as engine:
        single = engine.write_preview(140, tmp_path / "single")
    for f in sorted(single.glob("*.safetensors")):
        a, b = load_file(f), load_file(preview / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _preview_of(preview: Path) -> int | None:
    try:
        return json.loads((preview / "relexd-preview.json").read_text())["newest_observed_step"]
    except (OSError, ValueError):
        return None
