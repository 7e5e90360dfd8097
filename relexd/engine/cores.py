"""How many cores an ingest may use: those this process may run on, as many as its cgroup's CPU
quota pays for, and of those, what other processes leave idle.

Why watch the others: "use the cores it can get" (issue 12) means the idle ones. Beside a trainer
that keeps every core busy, each further tensor in flight is one more thread asking for a share of
the trainer's cores: under ``nice`` alone every thread weighs the same, so relexd's share, and the
trainer's loss, grows with them (under the systemd unit, CPUWeight= weighs relexd's cgroup as a
whole). The README had advised ``--threads 1`` there (4 Dec: the trainer ran 1.29× slower beside
the default of four tensors in flight, 1.12× at ``--threads 1``: bench/results/full/
beside-trainer-4dec.md); the default now follows that advice by itself. So relexd's default takes,
per ingest, ``per_core`` tensors per core the others left idle during its last ingests
(:class:`OtherProcesses`), within its usual cap and never fewer than one; a ``--threads`` the user
chose is taken as given.

Measured on the 2-core VM (6 Dec), neither side changed beyond the noise: relexd's own steady
ingest beside a busy core took 10.7 s at one tensor in flight against 10.0 s at two
(bench/results/full/busy-host-6dec.md), and the trainer ran 1.08× slower beside the default against
1.25× at ``--threads 1`` (beside-trainer-6dec.md; its alone medians moved by 40 % from round to
round). The gain is meant for hosts where a trainer's data loaders hold many cores; none was lent.

Facts relied on:

- ``/proc/stat`` (proc(5)): a line per CPU, ``cpuN user nice system idle iowait irq softirq steal
  guest guest_nice``, in ticks of ``sysconf(_SC_CLK_TCK)``; guest time is already counted in user.
  Steal (the hypervisor ran another guest) is counted as busy: that core was not ours to use.
- ``CLOCK_PROCESS_CPUTIME_ID`` (:func:`time.process_time`) is the CPU time of every thread of
  this process: what relexd itself used, subtracted from the busy time of its CPUs. The kernel's
  threads that write relexd's new sketch back to the disk are not in it and count as the others':
  0.03-0.18 cores' worth during 0.5B ingests on an otherwise idle host (busy-host-6dec.md), under
  the half core that would take a tensor away on 2 cores.
- cgroup v2 ``cpu.max`` is ``$MAX $PERIOD`` (``max``: no limit): at most MAX µs of CPU per PERIOD
  µs, i.e. MAX / PERIOD cores' worth (:mod:`relexd.engine.cgroup`; systemd's ``CPUQuota=`` sets it).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from relexd.engine.cgroup import CGROUP, CGROUP_ROOT, interface_values

PROC_STAT = Path("/proc/stat")

#: fields of a /proc/stat CPU line that count as idle (idle, iowait); the others are busy
_IDLE_FIELDS = (3, 4)
#: guest and guest_nice: already inside user and nice
_COUNTED_FIELDS = 8


def available_cores(cgroup: Path = CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (its affinity mask: a cpuset, ``taskset``, systemd's
    ``AllowedCPUs=``), at most the cores' worth its cgroup's CPU quota allows, rounded up."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota(cgroup, cgroup_root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota - 1e-9)))


def cpu_quota(cgroup: Path = CGROUP, cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """Cores' worth of CPU time the cgroup (or an ancestor) allows, the smallest; None: no limit."""
    quotas = []
    for value in interface_values("cpu.max", cgroup, cgroup_root):
        fields = value.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quotas.append(int(fields[0]) / int(fields[1]))
            except (ValueError, ZeroDivisionError):
                continue
    return min(quotas) if quotas else None


@dataclass(frozen=True)
class _Sample:
    wall: float  # seconds, monotonic
    busy: float  # CPU seconds the CPUs of the mask spent not idle, every process's
    own: float  # CPU seconds of this process

    def __add__(self, other: _Sample) -> _Sample:
        return _Sample(self.wall + other.wall, self.busy + other.busy, self.own + other.own)

    def __sub__(self, other: _Sample) -> _Sample:
        return _Sample(self.wall - other.wall, self.busy - other.busy, self.own - other.own)


class OtherProcesses:
    """How many cores' worth of CPU other processes used on this process's CPUs *while relexd
    ingested* (:meth:`during` each ingest; :meth:`busy_cores` the figure). Where the host does not
    say (no ``/proc/stat``), None.

    Why during the ingests and not the time between them: what competes with an ingest is what runs
    beside it. Between ingests there is the trainer's save (a burst right before every ingest) and,
    on a host that follows several runs, the other relexds' ingests; neither takes a core from the
    next ingest. A trainer's steady load is there during the ingest too. It is a feedback loop
    that settles: fewer tensors in flight leave the others more of the CPU, and so they measure
    at least as busy next time; once they stop, the next ingest sees idle cores again."""

    #: shorter windows say little (ticks are 10 ms): the figure waits until the ingests since the
    #: last one add up to this much
    MIN_WINDOW_S = 0.5

    def __init__(
        self,
        stat: Path = PROC_STAT,
        cpus: Callable[[], set[int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        own_cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self._stat, self._clock, self._own_cpu = stat, clock, own_cpu
        self._cpus = cpus if cpus is not None else _affinity
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._window = _Sample(0.0, 0.0, 0.0)  # summed over the ingests since the last figure
        self._busy: float | None = None

    def busy_cores(self) -> float | None:
        """Cores' worth of CPU the others used during the last ingests that added up to
        :data:`MIN_WINDOW_S`; None before that, or where unknown."""
        return self._busy

    @contextlib.contextmanager
    def during(self) -> Iterator[None]:
        """Count the others' CPU time while the block (an ingest's tensors) runs."""
        start = self._sample()
        try:
            yield
        finally:
            end = self._sample()
            if start is not None and end is not None:
                self._window = w = self._window + (end - start)
                if w.wall >= self.MIN_WINDOW_S:
                    self._busy = max(0.0, w.busy - w.own) / w.wall
                    self._window = _Sample(0.0, 0.0, 0.0)

    def _sample(self) -> _Sample | None:
        wall, own = self._clock(), self._own_cpu()
        try:
            lines = self._stat.read_text().splitlines()
        except OSError:
            return None
        cpus = self._cpus()
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
                continue
            ticks = [int(t) for t in rest.split()[:_COUNTED_FIELDS]]
            busy += sum(t for i, t in enumerate(ticks) if i not in _IDLE_FIELDS)
        return _Sample(wall, busy * self._tick, own)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def tensors_in_flight(cap: int, per_core: int, cores: int, others_busy: float | None) -> int:
    """At most ``cap`` tensors at once, ``per_core`` per core that the others left idle of this
    process's ``cores`` (``others_busy``: cores' worth they used; None: unknown, all idle), and at
    least one, however busy the host. On a large host the cap binds long before the idle cores do:
    8 tensors where 64 of 96 cores are idle."""
    if others_busy is None:
        return cap
    idle = max(0.0, cores - others_busy)
    return max(1, min(cap, math.floor(per_core * idle + 0.5)))
