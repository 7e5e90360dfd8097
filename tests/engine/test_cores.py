"""How many cores an ingest may use: the affinity mask, the cgroup's CPU quota, and what other
processes leave idle (read from the real /proc/stat against a real busy process too)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relexd.engine.cores import OtherProcesses, available_cores, cpu_quota, tensors_in_flight

HZ = os.sysconf("SC_CLK_TCK")


def _cgroup(
    tmp_path: Path, limits: dict[str, str], path: str = "system.slice/relexd.service"
) -> tuple[Path, Path]:
    """A fake /proc/self/cgroup naming ``path`` and a v2 tree with ``cpu.max`` files: relative
    directory → its content."""
    root = tmp_path / "sys"
    (root / path).mkdir(parents=True)
    (tmp_path / "cgroup").write_text(f"0::/{path}\n")
    for directory, value in limits.items():
        (root / directory / "cpu.max").write_text(value + "\n")
    return tmp_path / "cgroup", root


def test_a_cpu_quota_is_read_as_cores_and_the_smallest_up_the_tree_wins(tmp_path: Path) -> None:
    assert cpu_quota(*_cgroup(tmp_path / "a", {"system.slice/relexd.service": "150000 100000"})) == 1.5
    assert cpu_quota(*_cgroup(tmp_path / "b", {"system.slice/relexd.service": "max 100000"})) is None
    assert cpu_quota(*_cgroup(tmp_path / "c", {})) is None
    nested = {"system.slice": "50000 100000", "system.slice/relexd.service": "300000 100000"}
    assert cpu_quota(*_cgroup(tmp_path / "d", nested)) == 0.5
    assert cpu_quota(tmp_path / "absent", tmp_path) is None  # no cgroup v2: no limit known


@pytest.mark.parametrize(
    ("quota", "cores_left"), [("max 100000", 4), ("150000 100000", 2), ("20000 100000", 1)]
)
def test_available_cores_are_the_affinity_mask_capped_by_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quota: str, cores_left: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert available_cores(*_cgroup(tmp_path, {"system.slice/relexd.service": quota})) == cores_left


class _Host:
    """A fake /proc/stat with CPUs 0-2, a clock and this process's CPU time, all advanced by hand."""

    def __init__(self, tmp_path: Path) -> None:
        self.stat = tmp_path / "stat"
        self.ticks = {cpu: [0] * 10 for cpu in range(3)}
        self.wall = 100.0
        self.own = 5.0
        self.write()

    def write(self) -> None:
        total = [sum(t[i] for t in self.ticks.values()) for i in range(10)]
        lines = ["cpu  " + " ".join(map(str, total))]
        lines += [f"cpu{cpu} " + " ".join(map(str, t)) for cpu, t in self.ticks.items()]
        self.stat.write_text("\n".join([*lines, "intr 1 2 3", "ctxt 99"]) + "\n")

    def run(self, seconds: float, busy: dict[int, float], own: float = 0.0) -> None:
        """``seconds`` pass; CPU n is busy ``busy[n]`` of them (user time; steal on CPU 2), idle
        the rest; this process uses ``own`` CPU seconds of that busy time."""
        for cpu, t in self.ticks.items():
            used = busy.get(cpu, 0.0)
            t[7 if cpu == 2 else 0] += round(used * HZ)
            t[3] += round((seconds - used) * HZ)
        self.wall += seconds
        self.own += own
        self.write()

    def watch(self, cpus: set[int]) -> OtherProcesses:
        return OtherProcesses(self.stat, lambda: cpus, lambda: self.wall, lambda: self.own)


def test_the_others_load_is_the_busy_time_of_our_cpus_during_our_ingests_less_our_own(tmp_path: Path) -> None:
    host = _Host(tmp_path)
    others = host.watch({0, 1})
    assert others.busy_cores() is None  # nothing measured yet
    with others.during():
        host.run(2.0, {0: 2.0, 1: 1.5, 2: 2.0}, own=1.5)  # CPU 2 is not ours: not counted
    assert others.busy_cores() == pytest.approx(1.0)
    host.run(30.0, {0: 30.0, 1: 30.0})  # between ingests (a trainer's save, another relexd): not counted
    with others.during():
        host.run(4.0, {0: 4.0, 1: 4.0}, own=8.0)  # all ours
    assert others.busy_cores() == pytest.approx(0.0)


def test_steal_time_counts_as_busy(tmp_path: Path) -> None:
    host = _Host(tmp_path)
    others = host.watch({2})
    with others.during():
        host.run(2.0, {2: 1.0})
    assert others.busy_cores() == pytest.approx(0.5)


def test_short_ingests_add_up_until_they_say_something(tmp_path: Path) -> None:
    host = _Host(tmp_path)
    others = host.watch({0})
    with others.during():
        host.run(0.2, {0: 0.2})
    assert others.busy_cores() is None
    host.run(5.0, {})
    with others.during():
        host.run(0.3, {})
    assert others.busy_cores() == pytest.approx(0.4)  # 0.2 s busy of the two ingests' 0.5 s


def test_a_host_without_proc_stat_says_nothing(tmp_path: Path) -> None:
    others = OtherProcesses(tmp_path / "absent")
    with others.during():
        time.sleep(0.6)
    assert others.busy_cores() is None


@pytest.mark.parametrize(
    ("cap", "per_core", "cores_", "busy", "expected"),
    [
        (2, 1, 2, None, 2),
        (2, 1, 2, 0.0, 2),
        (2, 1, 2, 0.4, 2),
        (2, 1, 2, 0.6, 1),
        (2, 1, 2, 1.0, 1),
        (2, 1, 2, 7.0, 1),  # however busy: one
        (4, 2, 2, 1.0, 2),  # tasks that wait for the disk: two per idle core
        (4, 2, 2, 0.0, 4),
        (8, 1, 96, 32.0, 8),  # a big host: the cap binds, not the idle cores
        (8, 1, 16, 12.0, 4),
        (1, 1, 1, 1.0, 1),
    ],
)
def test_tensors_in_flight_follow_the_idle_cores(
    cap: int, per_core: int, cores_: int, busy: float | None, expected: int
) -> None:
    assert tensors_in_flight(cap, per_core, cores_, busy) == expected


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux's /proc/stat")
def test_a_real_busy_process_is_seen_on_the_real_host() -> None:
    """A CPU-bound child pinned to one CPU of ours, read from the real /proc/stat: at least half of
    that core's worth (the host may add its own load, never subtract from the child's)."""
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        time.sleep(0.3)  # started and pinned
        others = OtherProcesses(cpus=lambda: {cpu})
        with others.during():
            time.sleep(1.0)
        busy = others.busy_cores()
    finally:
        child.kill()
        child.wait()
    assert busy is not None and 0.5 <= busy <= 1.05
