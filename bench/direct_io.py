"""What moving a sketch-sized file costs the CPU, through the page cache and around it (O_DIRECT).

Why: at 1.5B a steady ingest spends 13-20 s of *system* CPU on 2 cores (bench/README.md, "at 1.5B
the page cache held the wrong pages"), more than its disk time. This benchmark isolates the
platform's share of that: the engine's own access pattern (4 MiB requests into one reused buffer;
writes in place with an ``fdatasync`` every 256 MiB, as ``PositionalSafetensorsWriter`` does) on one
file, with nothing else running, in three ways each for reading and for writing:

* ``buffered``: plain ``pread``/``pwrite`` through the page cache (relexd today);
* ``buffered+drop``: the same, dropping each range from the page cache once done with it
  (``POSIX_FADV_DONTNEED``: after each read, after each ``fdatasync`` for writes);
* ``direct``: ``O_DIRECT``, no page cache (the buffer and offsets are 4 KiB-aligned here).

Every trial starts (``--start full``, the default) from the state of a host whose relexd state
outgrows RAM: the page cache full of other, clean pages (a filler file as large as RAM is read
first) and none of the trial file's. ``--start freed`` starts each trial from free memory instead
(the page cache dropped, as root, then 5 s for the kernel to report the free memory to a VM's host
where it does so), the state after something freed a lot of memory (``POSIX_FADV_DONTNEED``, a
deleted file, an exited process). Modes alternate, ``--rounds`` times. Not part of
``bench.run_all``: it measures the host, not relexd's engine.

Run alone (as root or as the file's owner; needs --size-gb plus RAM of free disk):
``python -m bench.direct_io [--size-gb 12.4] [--rounds 2] [--start full|freed] [--dir /var/tmp]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import time
from pathlib import Path

from bench.common import GB, drop_page_cache, machine, markdown_table
from bench.common import scratch_dir as scratch

CHUNK = 4 << 20  # the engine's chunk: 1 Mi float32 elements
FLUSH = 256 << 20  # PositionalSafetensorsWriter's fdatasync cadence
MODES = ("buffered", "buffered+drop", "direct")


def _fill(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as fh:
        for _ in range(size // CHUNK):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())


def _fill_page_cache(filler: Path) -> None:
    """Read ``filler`` through the page cache: it then holds (mostly) its clean pages."""
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(filler, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def _free_memory() -> None:
    """Drop the clean page cache (root only) and give the kernel time to report it to a host."""
    drop_page_cache(1)
    time.sleep(5)


def trial(path: Path, size: int, op: str, mode: str) -> dict[str, float]:
    """One pass of ``op`` ("read" or "write") over ``path`` in ``mode``; seconds and CPU time."""
    flags = (os.O_RDONLY if op == "read" else os.O_WRONLY) | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # none of the file cached at the start
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
    drop = mode == "buffered+drop"
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        unflushed = 0
        for offset in range(0, size, CHUNK):
            if op == "read":
                os.preadv(fd, [buf], offset)
                if drop:
                    os.posix_fadvise(fd, offset, CHUNK, os.POSIX_FADV_DONTNEED)
                continue
            os.pwritev(fd, [buf], offset)
            unflushed += CHUNK
            if unflushed >= FLUSH:
                os.fdatasync(fd)
                unflushed = 0
                if drop:
                    os.posix_fadvise(fd, 0, offset + CHUNK, os.POSIX_FADV_DONTNEED)
        if op == "write":
            os.fdatasync(fd)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
    return {
        "s": seconds,
        "gb_s": size / GB / seconds,
        "sys": after.ru_stime - before.ru_stime,
        "user": after.ru_utime - before.ru_utime,
    }


def page_reporting() -> str:
    """The kernel's free page reporting setting, where the command line sets it (a VM whose host
    takes freed guest memory back makes every later first touch of it a host page fault)."""
    try:
        cmdline = Path("/proc/cmdline").read_text().split()
    except OSError:
        return "unknown"
    found = [arg for arg in cmdline if arg.startswith("page_reporting.")]
    return ", ".join(found) or "not set on the kernel command line"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=12.4, help="file size (1.5B rank-2 sketch: 12.4)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--start", choices=("full", "freed"), default="full", help="before each trial")
    parser.add_argument("--dir", default=None, help="scratch directory (default: the system's temp)")
    args = parser.parse_args(argv)
    size = int(args.size_gb * GB) // CHUNK * CHUNK
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows, results = [], {}
    with scratch("direct-io", args.dir) as tmp:
        target, filler = tmp / "sketch.bin", tmp / "filler.bin"
        _fill(target, size)
        if args.start == "full":
            _fill(filler, ram // CHUNK * CHUNK)
        for rnd in range(args.rounds):
            for op in ("read", "write"):
                for mode in MODES:
                    if args.start == "full":
                        _fill_page_cache(filler)
                    else:
                        _free_memory()
                    r = trial(target, size, op, mode)
                    results.setdefault((op, mode), []).append(r)
                    print(f"round {rnd + 1} {op} {mode}: {r['s']:.1f} s, {r['gb_s']:.2f} GB/s, "
                          f"system CPU {r['sys']:.1f} s", flush=True)  # fmt: skip
    for (op, mode), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append([op, mode, len(runs), f"{med['s']:.1f}", f"{med['gb_s']:.2f}", f"{med['sys']:.1f}",
                     f"{med['user']:.2f}", " / ".join(f"{r['s']:.1f}" for r in runs)])  # fmt: skip
    print(f"\n{machine()}\nFree page reporting: {page_reporting()}\n"
          f"File {size / GB:.1f} GB, {CHUNK >> 20} MiB requests; before each trial: "
          + (f"page cache filled with {ram / GB:.0f} GB of other pages" if args.start == "full"
             else "page cache dropped, 5 s wait (memory free)")
          + "; medians over rounds.\n")  # fmt: skip
    headers = ["op", "mode", "rounds", "s", "GB/s", "system CPU s", "user CPU s", "each round s"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
