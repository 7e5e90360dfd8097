"""The limits of this process's control group (cgroup v2), which bound what relexd may use whatever
the host has: the memory its page cache is charged to (``memory.max``) and the CPU time it may take
(``cpu.max``).

Facts relied on (the kernel's Documentation/admin-guide/cgroup-v2.rst, and cgroups(7)):

- ``/proc/self/cgroup`` holds a line ``0::/path`` for the v2 hierarchy, the path relative to its
  mount point, ``/sys/fs/cgroup``; a host with only v1 hierarchies has no such line.
- A limit set on any ancestor applies to every cgroup below it, so a unit inside a slice (systemd)
  or a process in a container's nested cgroup is bound by the smallest limit on its way to the root.
- An interface file a cgroup's controllers do not provide is absent.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def interface_values(name: str, cgroup: Path = CGROUP, root: Path = CGROUP_ROOT) -> list[str]:
    """The stripped contents of interface file ``name`` in this process's v2 cgroup and in each of
    its ancestors below the root, innermost first; empty where unknown (v1 only, not Linux)."""
    try:
        path = next(line[3:] for line in cgroup.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return []
    values = []
    directory = root / path.strip().lstrip("/")
    while directory != root and root in directory.parents:
        with contextlib.suppress(OSError):  # absent: this cgroup's controllers do not provide it
            values.append((directory / name).read_text().strip())
        directory = directory.parent
    return values
