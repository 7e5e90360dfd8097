"""relexd on a real (local) Ray cluster: two workers follow a planted run and commit what one host
commits; a worker SIGKILLed mid-ingest at several points, and the coordinator killed -9, end in
the uninterrupted state with nothing left behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.ray_cluster import AUTH, ROOT, local_cluster

os.environ.update(AUTH)  # read when ray is imported (tests/cluster/ray_cluster.py)
ray = pytest.importorskip("ray")  # the relexd[ray] extra; the test dependencies include it

from relexd.cluster.ray_backend import ClusterSettings, ray_tensors  # noqa: E402
from relexd.engine import Engine, EngineConfig  # noqa: E402
from relexd.errors import WorkerLost  # noqa: E402
from relexd.state.store import read_snapshot  # noqa: E402
from tests.cluster.state_view import assert_same_state  # noqa: E402
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
