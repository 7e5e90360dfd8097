"""Shared helpers of the benchmarks: machine description, plain reads, page-cache residency, tables."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from relexd.engine.page_cache import meminfo_bytes

MB = 1e6
GB = 1e9
READ_BLOCK = 16 << 20

#: torch threads for every benchmark process (relexd's own default is one thread: on a host busy
#: with training, multi-threaded ops stall waiting for cores). RELEXD_BENCH_THREADS overrides it;
#: the batch baseline gets the same setting, so the comparison stays fair.
THREADS = int(os.environ.get("RELEXD_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def machine() -> str:
    """One paragraph naming the machine the numbers were taken on."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?"
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    disk = "?"
    with contextlib.suppress(OSError):
        dev = "vda"
        rot = Path(f"/sys/block/{dev}/queue/rotational").read_text().strip()
        disk = f"/dev/{dev} (virtio block device, rotational={rot}: type of backing store unknown)"
    return (
        f"{os.cpu_count()} vCPU ({model}, KVM guest, shared with other work), {mem:.1f} GiB RAM, "
        f"disk {disk}, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


@contextlib.contextmanager
def scratch_dir(prefix: str, root: str | None = None) -> Iterator[Path]:
    """A temporary directory under /tmp, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=f"relexd-bench-{prefix}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def plain_read(paths: Sequence[Path], *, leave_cache: bool = False) -> tuple[int, float]:
    """Read ``paths`` sequentially in 16 MiB blocks (no parsing); returns (bytes, seconds).

    ``leave_cache``: leave the page cache as the reads found it. A file that was mostly not cached
    is dropped block by block behind the read (``POSIX_FADV_DONTNEED``), so timing a floor does
    not evict the pages an ingest right after it reads (at 1.5B on this 23.5 GiB VM, a floor read
    of the uncached old sketch pushed gigabytes of the base and the anchor out, and the ingest then
    read them from the disk). The drops are inside the timed reads."""
    uncached = {p for p in paths if leave_cache and (cached_fraction([p]) or 0.0) < 0.5}
    buf = bytearray(READ_BLOCK)
    total = 0
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            offset = 0
            while n := f.readinto(buf):
                if p in uncached:
                    os.posix_fadvise(f.fileno(), offset, n, os.POSIX_FADV_DONTNEED)
                offset += n
                total += n
    return total, time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (written back first: dirty pages are not dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(paths: Sequence[Path]) -> float | None:
    """Fraction of the files' bytes resident in the page cache (util-linux ``fincore``), or None."""
    exe = shutil.which("fincore")
    if exe is None or not paths:
        return None
    out = subprocess.run(
        [exe, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    res = size = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return res / size if size else None


#: Above this share of RAM already cached at the start, the benchmark's own files compete with
#: others' for the page cache (bench/README.md, "7 Dec, morning": with ~20 GB of earlier scratch
#: files cached on a 23.5 GiB VM, a 0.5B state that fits the page cache was partly read back from
#: the disk, 1.5-5.6 GB at one checkpoint of each run, and the mean steady ratio came out ~40 % worse
#: than with the cache dropped: 2.86× against 2.0×).
BUSY_PAGE_CACHE = 0.25


def drop_page_cache(what: int = 3) -> None:
    """Write back and drop the clean page cache, as ``sync; echo 3 > /proc/sys/vm/drop_caches``
    (``what`` 1: the page cache only, not dentries and inodes; root only, and not in a container
    whose /proc is read-only: a clear error otherwise)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text(str(what))
    except OSError as exc:
        why = f"cannot write /proc/sys/vm/drop_caches ({exc.strerror})"
        raise SystemExit(f"--drop-caches: {why}: run as root, outside a container") from exc


def page_cache_at_start(*, drop: bool = False) -> str:
    """One sentence for a report: how much of RAM the page cache held when the benchmark started
    (after dropping it, with ``drop``). Above :data:`BUSY_PAGE_CACHE` of RAM it also says why the
    figures may be pessimistic, and warns on stderr, since such a run is not comparable with one
    on a clean page cache."""
    if drop:
        drop_page_cache()
    info = meminfo_bytes()
    total, cached = info.get("MemTotal"), info.get("Cached")
    if not total or cached is None:
        return "page cache at start: unknown (no /proc/meminfo)"
    cached -= info.get("Shmem", 0)  # tmpfs and shared memory: not files the benchmark competes with
    text = f"page cache at start: {cached / 2**30:.1f} GiB of {total / 2**30:.1f} GiB RAM" + (
        " (dropped first)" if drop else ""
    )
    if cached > BUSY_PAGE_CACHE * total:
        warning = (
            f"{text}, more than {BUSY_PAGE_CACHE:.0%} of RAM cached by other files: this benchmark's "
            "files compete with them, so ingests may read back from the disk what would stay cached "
            "on a clean page cache, and the figures are pessimistic by that much (drop the page cache "
            "first: --drop-caches as root, or sync; echo 3 > /proc/sys/vm/drop_caches)"
        )
        print(f"warning: {warning}", file=sys.stderr, flush=True)
        return warning
    return text


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits unless already strings."""

    def cell(v: object) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
