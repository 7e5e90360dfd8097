"""Does the state an ingest reads fit in the page cache? That decides what to do with the replaced
sketch's pages.

An ingest reads the old sketch, the base and the scored anchor, and overwrites the spare sketch
(:mod:`relexd.state.store`) with the new one; the next ingest reads the new one. Both answers were
measured, ingest after ingest on one state with a fresh checkpoint each time (bench/README.md, "at
1.5B the page cache held the wrong pages"; ``python -m bench.page_cache`` repeats it):

- it fits (0.5B rank 2, ~12 GB, on 23.5 GB of RAM): the replaced sketch's pages are best left
  cached. It becomes the spare, and overwriting cached pages needs no new memory; dropping them
  made every steady ingest 2-4× slower (system time 7-9 s instead of 2-3 s: the kernel reclaiming
  4 GB of other pages for the writes) and read nothing less from the disk.
- it does not (1.5B rank 2, ~37 GB): those pages are dead weight — nothing reads the spare — and
  left cached they evicted the new sketch, base and anchor that the next ingest reads, which then
  came from the disk (21-23 GB per ingest). Dropped as soon as read (:meth:`SketchFile.release`),
  7-14 GB. Where even the rest (the new sketch, the anchors, the base, a checkpoint) does not fit
  (1.5B rank 2 here; rank 1 fits), the new sketch is written around the page cache (``O_DIRECT``,
  1.11× faster; where it fits, 0.94×: the next ingest read it from the disk): through it, every
  page written is a page the kernel must first find, by evicting another or, on a VM that hands
  freed memory back to its host, by faulting it in (up to 46 s of system CPU per 12.4 GB written
  there, 0.4 s direct: ``python -m bench.direct_io``), and cached pages of it would be evicted
  before the next ingest read them anyway. The old sketch, written so by the ingest before, is
  then read around the page cache as well, once, by every task that can keep its basis from pass
  1 to pass 2 within the largest task's memory (all but the embedding): 1.15× faster at 1.5B rank
  2, 8.2 s of system CPU per ingest instead of 13.7 (``bench/results/full/page-cache-1.5b-kept-direct.md``).

"Fits" compares the ingest's working set with the memory the kernel could give the page cache now:
``MemAvailable`` (free memory plus reclaimable cache, our own cached state included), capped by
the memory limit of relexd's cgroup and its ancestors (v2 ``memory.max``:
:mod:`relexd.engine.cgroup`), which page cache is charged to.
"""

from __future__ import annotations

from pathlib import Path

from relexd.engine.cgroup import CGROUP, CGROUP_ROOT, interface_values

MEMINFO = Path("/proc/meminfo")


def meminfo_bytes(meminfo: Path = MEMINFO) -> dict[str, int]:
    """``/proc/meminfo``'s fields in bytes ("MemAvailable:  123456 kB"); empty where there is
    none (not Linux), without the lines that hold no number."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[key] = int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
    return fields


def page_cache_room(
    meminfo: Path = MEMINFO, cgroup: Path = CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> int | None:
    """Bytes the page cache could hold for relexd now, or None where the host does not say
    (not Linux): then nothing is dropped."""
    room = meminfo_bytes(meminfo).get("MemAvailable")
    if room is None:
        return None
    limits = [int(v) for v in interface_values("memory.max", cgroup, cgroup_root) if v.isdigit()]
    return min([room, *limits])


def state_outgrows_page_cache(working_set: int, room: int | None) -> bool:
    """True when ``working_set`` bytes (what an ingest reads or writes and the next one reads
    again) are more than the page cache has ``room`` for."""
    return room is not None and working_set > room
