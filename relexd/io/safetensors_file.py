"""The safetensors format, validated strictly and read with plain reads (no mmap).

Why plain reads: the trainer writes and rotates checkpoints while relexd reads them, often on a
network file system. A memory-mapped file that is truncated or deleted under us, or an NFS/Lustre
page that cannot be fetched, kills the whole process with SIGBUS instead of raising. ``os.pread``
on a descriptor opened once returns short or raises instead, and that we turn into a
:class:`~relexd.errors.CheckpointError` naming the file. Reads are tensor by tensor or element
range by element range, so memory stays bounded by what the caller asks for.

The one exception is relexd's own state files, which no trainer truncates or rotates
(``SafetensorsFile(path, mapped=True)``, :meth:`SafetensorsFile.view_range`): a chunk is mapped in
place instead of copied out of the page cache, each chunk's pages populated first with
``MADV_POPULATE_READ``, which returns an error where a touch would raise SIGBUS, and unmapped after
use so that the process's RSS holds no more than the chunks in use.

Layout of a file: 8-byte little-endian header length N, N bytes of JSON header (an object mapping
tensor names to ``{"dtype", "shape", "data_offsets"}`` plus an optional ``__metadata__`` object of
strings), then the tensor bytes. Offsets are relative to the end of the header. Tensor bytes are
little-endian, which is also the byte order of every host relexd supports (x86-64, aarch64).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from relexd._closeable import Closeable
from relexd.errors import CheckpointError

#: safetensors dtype codes and the torch dtypes they denote (only those this torch build has).
DTYPES: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}
_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

#: Larger headers are refused: real ones are kilobytes to a few megabytes, and a garbage length
#: must not make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"
#: Upper bound of one pread; Linux caps a single read at about 2 GiB anyway.
_READ_CHUNK = 1 << 30
#: ``madvise`` advice that faults a mapped range in now, and fails with EFAULT where touching it
#: would raise SIGBUS (Linux 5.14; Python's mmap module names it only from 3.13 on).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_PAGE = mmap.PAGESIZE


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of ``dtype`` (ValueError when the format cannot store it)."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store dtype {dtype}") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int  # absolute byte offset (exclusive)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one file; ``tensors`` is in data-offset order."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    file_size: int


def os_error(path: Path, exc: OSError, doing: str) -> CheckpointError:
    """Map an OS error to a reason code: a vanished file is trainer rotation, not corruption."""
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ESTALE:
        return CheckpointError(path, "rotated", f"file disappeared while {doing} (rotated away?)")
    if isinstance(exc, PermissionError):
        return CheckpointError(path, "permission", f"permission denied while {doing}{_owner_only_hint(path)}")
    return CheckpointError(path, "io", f"I/O error while {doing}: {exc.strerror or exc}")


def _owner_only_hint(path: Path) -> str:
    """Why a checkpoint file is unreadable, when it is the common case: safetensors 0.8 writes
    every file with mode 0600 whatever the umask (it renames a tempfile into place;
    safetensors/safetensors#782), so only the trainer's own user can read what it saved."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if st.st_uid != os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0:
        return (
            f" (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}: only the trainer's user can read"
            " it; safetensors >= 0.8 saves files that way. Run relexd as that user, README 'Running under"
            " systemd')"
        )
    return ""


def _corrupt(path: Path, message: str) -> CheckpointError:
    return CheckpointError(path, "corrupt_header", message)


def _pread_exact(fd: int, path: Path, size: int, offset: int, into: memoryview | None = None) -> memoryview:
    """Read exactly ``size`` bytes at ``offset``; a short read means the file shrank under us.

    The buffer is ``into`` (the caller's, reused: a fresh buffer of a few MB page-faults on every
    first touch, which measured slower than the read itself) or an uninitialised torch byte tensor,
    not a ``bytearray``: zero-filling a buffer that the read overwrites anyway cost as much as the
    read itself.
    """
    view = (
        into[:size]
        if into is not None
        else memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B")
    )
    done = 0
    try:
        while done < size:
            got = os.preadv(fd, [view[done : done + _READ_CHUNK]], offset + done)
            if got == 0:
                break
            done += got
    except OSError as exc:
        raise os_error(path, exc, "reading") from exc
    if done < size:
        if not path.exists():
            raise CheckpointError(path, "rotated", "file disappeared while reading (rotated away?)")
        raise CheckpointError(
            path,
            "truncated",
            f"file ended at byte {offset + done}, expected data up to byte {offset + size} "
            "(truncated while reading?)",
        )
    return view


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"header entry of tensor {name!r} is not an object")
    code = entry.get("dtype")
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    expected = info.numel * dtype.itemsize
    if info.end - info.start != expected:
        raise _corrupt(
            path,
            f"tensor {name!r} spans {info.end - info.start} bytes but shape {info.shape} of "
            f"{entry['dtype']} needs {expected}",
        )
    return info


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ is not an object of strings")
    return metadata


def _read_header_fd(fd: int, path: Path) -> SafetensorsHeader:
    try:
        file_size = os.fstat(fd).st_size
    except OSError as exc:
        raise os_error(path, exc, "reading the header") from exc
    if file_size < 8:
        raise CheckpointError(
            path, "truncated", f"file is {file_size} bytes, too short for a safetensors header"
        )
    header_len = int.from_bytes(bytes(_pread_exact(fd, path, 8, 0)), "little")
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(path, f"header length {header_len} is absurd (limit {MAX_HEADER_BYTES})")
    if header_len > file_size - 8:
        raise CheckpointError(
            path,
            "truncated",
            f"file is {file_size} bytes but its header alone needs {8 + header_len} (truncated?)",
        )
    raw = bytes(_pread_exact(fd, path, header_len, 8))
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None:
        metadata = _parse_metadata(path, metadata)
    data_start = 8 + header_len
    infos = sorted(
        (_parse_entry(path, name, entry, data_start) for name, entry in header.items()),
        key=lambda info: (info.start, info.end),
    )
    position = data_start
    for info in infos:
        if info.start != position:
            problem = "overlaps the previous tensor" if info.start < position else "leaves a gap"
            raise _corrupt(path, f"tensor {info.name!r} at byte {info.start} {problem}")
        position = info.end
    if position > file_size:
        raise CheckpointError(
            path,
            "truncated",
            f"file is {file_size} bytes but its header describes {position} (truncated?)",
        )
    if position < file_size:
        raise _corrupt(path, f"file is {file_size} bytes but its header describes only {position}")
    return SafetensorsHeader(path, {info.name: info for info in infos}, metadata, file_size)


def _row_bytes(info: TensorInfo, start: int, stop: int, rows: int, row_stride: int) -> list[tuple[int, int]]:
    """(file offset, byte length) of elements ``[start + r·row_stride, stop + r·row_stride)`` of
    ``info``'s tensor for each ``r < rows``: the ranges a view maps and later unmaps."""
    size = info.dtype.itemsize
    return [(info.start + (start + r * row_stride) * size, (stop - start) * size) for r in range(rows)]


def _open_fd(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(path, exc, "opening") from exc


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of ``path`` against the file's actual size.

    This is the completeness check of marker-less checkpoints: a file still being written, cut
    short, or not safetensors at all fails here with a :class:`CheckpointError`.
    """
    path = Path(path)
    fd = _open_fd(path)
    try:
        return _read_header_fd(fd, path)
    finally:
        os.close(fd)


class SafetensorsFile(Closeable):
    """Plain-read access to one validated file; reads tensor by tensor or element range by range.

    The descriptor is opened once, so every read sees the inode that was validated even if the
    trainer renames another file over the path meanwhile.
    """

    thread_safe = True  # positional reads on one descriptor

    def __init__(self, path: Path, header: SafetensorsHeader | None = None, *, mapped: bool = False) -> None:
        """``mapped``: allow :meth:`view_range` — only for files no other program truncates or
        replaces while they are open (relexd's own state), see the module's docstring."""
        self.path = Path(path)
        self._fd: int | None = _open_fd(self.path)
        self._direct_fd: int | None = None  # opened by the first direct read (:meth:`read_range`)
        self._direct_refused = False
        self._direct_lock = threading.Lock()
        self._map: mmap.mmap | None = None  # made by the first view_range
        self._map_refused = not mapped
        try:
            if header is None:
                header = _read_header_fd(self._fd, self.path)
            else:
                self._check_size(header)
        except BaseException:
            self.close()
            raise
        self.header = header

    def _check_size(self, header: SafetensorsHeader) -> None:
        try:
            size = os.fstat(self._descriptor()).st_size
        except OSError as exc:
            raise os_error(self.path, exc, "opening") from exc
        if size < header.file_size:
            raise CheckpointError(
                self.path,
                "truncated",
                f"file is {size} bytes but its header describes {header.file_size} (truncated?)",
            )

    def _descriptor(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def names(self) -> list[str]:
        """Tensor names in data-offset order."""
        return list(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, owned by the caller, in its stored dtype and shape."""
        info = self.info(name)
        return self._tensor(info, info.start, info.end).reshape(info.shape)

    def read_range(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None, *, direct: bool = False
    ) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, 1-D, in the stored dtype.

        ``out``: a contiguous buffer of at least that many bytes to read into; the result is then
        a view of it, valid until the buffer is reused. ``direct``: read around the page cache
        (``O_DIRECT``) where the file offset, the length and ``out``'s address are multiples of
        :data:`DIRECT_ALIGN` and the file system allows it; a plain read otherwise. Why: a file
        larger than the page cache, read once, costs the kernel a page to find (by evicting
        another) and a copy for every page read through it — 5-17 s of system CPU per 12 GiB read
        on this project's VM, 1 s direct (bench/README.md) — for pages that nothing reads again."""
        info = self.info(name)
        if not 0 <= start <= stop <= info.numel:
            raise ValueError(f"range [{start}, {stop}) is outside {name!r} of {info.numel} elements")
        itemsize = info.dtype.itemsize
        begin, end = info.start + start * itemsize, info.start + stop * itemsize
        if out is None or begin == end:
            return self._tensor(info, begin, end)
        if not out.is_contiguous() or out.numel() * out.element_size() < end - begin:
            raise ValueError(f"buffer of {out.numel() * out.element_size()} bytes is too small")
        into = memoryview(out.view(torch.uint8).numpy()).cast("B")
        aligned = not (begin | (end - begin) | out.data_ptr()) % DIRECT_ALIGN
        if direct and aligned and self._pread_direct(into[: end - begin], begin):
            return torch.frombuffer(into[: end - begin], dtype=info.dtype)
        buf = _pread_exact(self._descriptor(), self.path, end - begin, begin, into)
        return torch.frombuffer(buf, dtype=info.dtype)

    def view_range(
        self, name: str, start: int, stop: int, rows: int = 1, row_stride: int = 0
    ) -> torch.Tensor | None:
        """Elements ``[start + r·row_stride, stop + r·row_stride)`` of the flattened tensor for
        ``r < rows``, as a ``rows`` × n view of the file mapped in place (copy-on-write, never
        written back; row r is the r-th range), or None where the file is not mapped (not
        ``mapped``, or mapping refused): read it with :meth:`read_range` then. Call :meth:`unmap`
        with the same arguments once done.

        Why: :meth:`read_range` copies every byte out of the page cache (``preadv``), a fifth of the
        CPU of a cached 0.5B rank-1 ingest; a mapped chunk costs no copy (a cached 2 GiB file
        consumed in 4 MiB chunks: 0.27 s mapped, 0.51 s read, bench/results/full/profile-0.5b-r1-5dec.md).
        The pages are populated up front (``MADV_POPULATE_READ``), so a range that cannot be read —
        an I/O error, a file cut short under us — raises :class:`CheckpointError` here instead of
        killing the process with SIGBUS when touched."""
        info = self.info(name)
        last = stop + (rows - 1) * row_stride
        if not (0 <= start <= stop and last <= info.numel and rows >= 1):
            raise ValueError(f"range [{start}, {stop}) × {rows} is outside {name!r} of {info.numel} elements")
        m = self._mapping()
        if m is None or start == stop:
            return None
        itemsize = info.dtype.itemsize
        for first, length in _row_bytes(info, start, stop, rows, row_stride):
            if not self._madvise(m, _MADV_POPULATE_READ, first, length):
                return None
        whole = torch.frombuffer(
            m, dtype=info.dtype, count=last - start, offset=info.start + start * itemsize
        )
        return whole.as_strided((rows, stop - start), (row_stride, 1))

    def unmap(self, name: str, start: int, stop: int, rows: int = 1, row_stride: int = 0) -> None:
        """Take the pages of a :meth:`view_range` out of this process's page tables
        (``MADV_DONTNEED``; the page cache keeps them), so that RSS counts only chunks in use and
        :meth:`release` can drop them. A page shared with a neighbouring range is unmapped too; its
        next touch maps it again from the page cache."""
        if self._map is None or start == stop:
            return
        for first, length in _row_bytes(self.info(name), start, stop, rows, row_stride):
            self._madvise(self._map, mmap.MADV_DONTNEED, first, length)

    def _mapping(self) -> mmap.mmap | None:
        with self._direct_lock:
            if self._map is None and not self._map_refused:
                try:
                    # copy-on-write, never written: read-only pages would make torch.frombuffer
                    # warn at every view, and a stray write cannot reach the file
                    self._map = mmap.mmap(self._descriptor(), self.header.file_size, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):
                    self._map_refused = True  # e.g. a file system without mmap: plain reads
            return None if self._map_refused else self._map

    def _madvise(self, m: mmap.mmap, advice: int, offset: int, length: int) -> bool:
        """``madvise`` over the pages holding bytes ``[offset, offset + length)``. False where
        the kernel does not know ``advice`` (before Linux 5.14): the file is then read, not mapped."""
        first = offset - offset % _PAGE
        try:
            m.madvise(advice, first, offset + length - first)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                self._map_refused = True
                return False
            if exc.errno == errno.EFAULT:
                raise CheckpointError(
                    self.path, "truncated", f"bytes {offset}-{offset + length} cannot be read (cut short?)"
                ) from exc
            raise os_error(self.path, exc, "reading") from exc
        return True

    def _pread_direct(self, into: memoryview, offset: int) -> bool:
        """Fill ``into`` from ``offset`` with ``O_DIRECT`` reads; False where that could not be
        done (refused, or a short read: the plain read that follows reports a truncated file)."""
        fd = self._direct_descriptor()
        if fd is None:
            return False
        done = 0
        try:
            while done < into.nbytes:
                got = os.preadv(fd, [into[done:]], offset + done)
                if got == 0 or got % DIRECT_ALIGN:
                    return False  # the end of the file, or a read the rest of cannot be aligned
                done += got
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise os_error(self.path, exc, "reading") from exc
            self._direct_refused = True  # the device wants a larger alignment: plain reads
            return False
        return True

    def _direct_descriptor(self) -> int | None:
        """A second descriptor of the same inode, opened with ``O_DIRECT``; None where that is
        refused (tmpfs, some FUSE file systems, platforms without it)."""
        with self._direct_lock:
            if self._direct_fd is None and not self._direct_refused:
                try:
                    # the validated inode, not whatever the path names now
                    self._direct_fd = os.open(
                        f"/proc/self/fd/{self._descriptor()}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC
                    )
                except (OSError, AttributeError):
                    self._direct_refused = True
            return None if self._direct_refused else self._direct_fd

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading elements ``[start, stop)`` of ``name`` into the page
        cache now (``POSIX_FADV_WILLNEED``), so that the read of them, a chunk later, does not
        wait for the disk. A hint only: nothing happens where the pages are cached already or the
        platform has no ``posix_fadvise``, and an error is ignored (the read itself reports it).

        Why by hand: the kernel's own readahead follows one sequential stream per descriptor, and
        the engine's workers read several tensors' columns through one descriptor at once, which
        it takes for random reads (measured on a sketch evicted from the page cache: bench/README.md).

        Where the range's first and last pages are cached already (:meth:`_cached`), no advice is
        given: the kernel looks up every page of the range to find it has nothing to read, 5.5 % of
        the workers' samples over five cached 0.5B rank-1 ingests (py-spy; bench/README.md, 7 Dec,
        afternoon).
        """
        span = self._bytes_of(name, start, stop)
        if span is not None and not self._cached(*span):
            self._advise_bytes(*span, "POSIX_FADV_WILLNEED")

    def _cached(self, offset: int, length: int) -> bool:
        """Whether the first and the last byte of ``[offset, offset + length)`` are in the page
        cache: one-byte reads that fail rather than wait for the disk (``RWF_NOWAIT``). A chunk is
        written and read whole, so its ends stand for it; where they do not (a chunk partly
        evicted), its missing pages are read when it is, as without advice. False where the
        platform cannot tell."""
        flag = getattr(os, "RWF_NOWAIT", None)
        if self._fd is None or flag is None or length <= 0:
            return False
        probe = bytearray(1)
        try:
            return all(os.preadv(self._fd, [probe], at, flag) == 1 for at in (offset, offset + length - 1))
        except OSError:  # EAGAIN: not cached (or a file system that cannot say)
            return False

    def release(self, name: str | None = None, start: int = 0, stop: int | None = None) -> None:
        """Tell the kernel that elements ``[start, stop)`` of ``name`` (default: all of it; no
        name: the whole file, header included) will not be read again (``POSIX_FADV_DONTNEED``):
        their clean pages leave the page cache now, instead of evicting, later, pages that will be
        read. A page (or a larger folio) only partly inside the range stays. A hint like
        :meth:`prefetch`: the data and later reads of it are unaffected.

        Why by hand: the kernel cannot know which of our reads were the last ones (see
        :meth:`relexd.state.store.SketchFile.release` for the place that matters).
        """
        if name is None:
            if self._map is not None:  # a mapped page stays cached: unmap them all first, those
                # the kernel mapped around a view's range too (fault-around)
                self._madvise(self._map, mmap.MADV_DONTNEED, 0, self.header.file_size)
            self._advise_bytes(0, 0, "POSIX_FADV_DONTNEED")  # length 0: to the end of the file
        else:
            self.unmap(name, start, stop if stop is not None else self.info(name).numel)
            self._advise(name, start, stop, "POSIX_FADV_DONTNEED")

    def _advise(self, name: str, start: int, stop: int | None, advice: str) -> None:
        """``advice`` for elements ``[start, stop)`` of ``name`` (stop None: to its end), clipped."""
        span = self._bytes_of(name, start, stop)
        if span is not None:
            self._advise_bytes(*span, advice)

    def _bytes_of(self, name: str, start: int, stop: int | None) -> tuple[int, int] | None:
        """File offset and length of elements ``[start, stop)`` of ``name`` (stop None: to its
        end), clipped to the tensor; None where that leaves nothing."""
        info = self.info(name)
        start, stop = max(0, start), info.numel if stop is None else min(stop, info.numel)
        if start >= stop:
            return None
        itemsize = info.dtype.itemsize
        return info.start + start * itemsize, (stop - start) * itemsize

    def _advise_bytes(self, offset: int, length: int, advice: str) -> None:
        if self._fd is None or not hasattr(os, "posix_fadvise"):
            return
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, getattr(os, advice))

    def _tensor(self, info: TensorInfo, begin: int, end: int) -> torch.Tensor:
        if begin == end:  # torch.frombuffer refuses empty buffers
            return torch.empty(0, dtype=info.dtype)
        buf = _pread_exact(self._descriptor(), self.path, end - begin, begin)
        return torch.frombuffer(buf, dtype=info.dtype)

    def close(self) -> None:
        if self._map is not None:
            # a view still held elsewhere keeps the mapping until it is freed
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _encode_header(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None,
    align: int = 8,
) -> tuple[bytes, dict[str, tuple[torch.dtype, int, int]]]:
    """The header bytes of a file holding ``specs`` in that order, and per tensor (dtype, absolute
    byte offset, byte length). The header is padded with spaces so that the data starts at a
    multiple of ``align`` bytes (the reference writer pads to 8)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map strings to strings")
        header[_METADATA_KEY] = dict(metadata)
    layout: dict[str, tuple[torch.dtype, int, int]] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if name == _METADATA_KEY:
            raise ValueError(f"{_METADATA_KEY!r} cannot be a tensor name")
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} has invalid shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        layout[name] = (dtype, offset, nbytes)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % align)
    data_start = 8 + len(encoded)
    layout = {name: (dtype, data_start + off, nbytes) for name, (dtype, off, nbytes) in layout.items()}
    return len(encoded).to_bytes(8, "little") + encoded, layout


#: Alignment of O_DIRECT transfers (file offset, length, buffer address): 4 KiB serves every
#: common device (logical blocks of 512 B or 4 KiB) and is the page size.
DIRECT_ALIGN = 4096


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, align: int = DIRECT_ALIGN) -> torch.Tensor:
    """An uninitialised contiguous tensor whose data starts at a multiple of ``align`` bytes (torch's
    allocator aligns to 64 only), so that rows of ``align``-multiple sizes can go to ``O_DIRECT``."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = -raw.data_ptr() % align
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _flat(chunk: torch.Tensor) -> torch.Tensor:
    """``chunk`` as one contiguous run of elements in CPU memory (itself, when it is one)."""
    return chunk.detach().to("cpu").contiguous().reshape(-1)


def _as_bytes(flat: torch.Tensor) -> memoryview:
    return memoryview(flat.view(torch.uint8).numpy())


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so that no more than one tensor (or one chunk)
    is in memory.

    Why not ``safetensors.torch.save_file``: it needs every tensor in memory at once, and a
    preview of a 70B model does not fit. The header is computed up front from ``specs`` (tensors
    stored in the given order), then data is appended in that order. A file that did not receive
    every byte is deleted, never left looking like a checkpoint.
    """

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header, layout = _encode_header(specs, metadata)
        # name, dtype, bytes left
        self._pending = [(name, dtype, nbytes) for name, (dtype, _, nbytes) in layout.items()]
        self._finished = False
        self._file = open(self.path, "wb")  # noqa: SIM115 - owned until close()/abort()
        try:
            self._file.write(header)
            self._skip_complete()
        except BaseException:
            self.abort()
            raise

    def _skip_complete(self) -> None:
        while self._pending and self._pending[0][2] == 0:
            self._pending.pop(0)

    def append(self, name: str, chunk: torch.Tensor) -> None:
        """Write the next elements of tensor ``name`` (flattened; any chunk size).

        Tensors must be completed in spec order and ``chunk.dtype`` must equal the spec.
        """
        if self._file.closed:
            raise ValueError(f"{self.path}: writer is closed")
        if not self._pending:
            raise ValueError(f"{self.path}: every tensor is complete, got more data for {name!r}")
        expected, dtype, left = self._pending[0]
        if name != expected:
            raise ValueError(f"{self.path}: expected data of {expected!r}, got {name!r}")
        if chunk.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {name!r} is {dtype}, got a {chunk.dtype} chunk")
        data = _as_bytes(_flat(chunk))
        nbytes = data.nbytes
        if nbytes > left:
            raise ValueError(
                f"{self.path}: chunk of {nbytes} bytes overruns tensor {name!r} ({left} bytes left)"
            )
        if nbytes:
            self._file.write(data)
        self._pending[0] = (expected, dtype, left - nbytes)
        self._skip_complete()

    def close(self) -> None:
        """Check that every tensor is complete, then flush and fsync.

        An incomplete file is deleted and ValueError raised: it would only fail validation later.
        """
        if self._file.closed:
            return
        if self._pending:
            missing = [name for name, _, _ in self._pending]
            self.abort()
            raise ValueError(f"{self.path}: closed before tensors {missing} were complete")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._finished = True

    def abort(self) -> None:
        """Close and delete the partial file (a no-op once :meth:`close` succeeded)."""
        if self._finished:
            return
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class PositionalSafetensorsWriter:
    """Writes a safetensors file whose tensors arrive in any order, from any thread.

    The header (so every tensor's place) is fixed up front from ``specs``; :meth:`write` puts a chunk
    at its element offset with ``pwrite``, so worker threads can fill different tensors at once
    while the file's bytes stay exactly those of a sequential write. The file is preallocated
    (a full disk fails at the start, not after minutes of work, where the file system supports it).

    Every ``flush_bytes`` written, a background ``fdatasync`` starts: it overlaps the disk writes
    with the computation that follows instead of leaving them all to the final fsync, and it keeps
    relexd's dirty page cache bounded — a trainer beside us that saves a checkpoint must not be
    throttled by gigabytes of our dirty pages (the kernel blocks every writer past ``dirty_ratio``).

    ``in_place``: ``path`` is an existing file whose disk blocks (and cached pages) are reused
    instead of freed and allocated again — every byte of it is rewritten, so nothing of its old
    content survives a successful close; it is cut to the new size if it was longer.

    ``align``: the data starts at a multiple of that many bytes (header padding), so that tensors
    stored first whose sizes are multiples of it are aligned too. ``direct``: write every chunk whose
    file offset, length and buffer address are multiples of :data:`DIRECT_ALIGN` with ``O_DIRECT``,
    around the page cache; the rest (small tensors, unaligned buffers) through it. Why: for a file
    larger than the page cache, every page written is a page allocated and later evicted or freed,
    which measured 4-90× the system CPU of a direct write (bench/README.md, "most of that system time
    is this VM's"). Where the file system refuses ``O_DIRECT`` the writer falls back to plain writes.

    As with the streaming writer, a file that did not receive every byte is deleted at close.
    """

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        *,
        flush_bytes: int | None = 256 << 20,
        in_place: bool = False,
        align: int = 8,
        direct: bool = False,
    ) -> None:
        self.path = Path(path)
        self._direct_fd: int | None = None
        self._direct_refused = False
        #: some chunk went around the page cache (a flag, not a byte count: set from many threads)
        self.wrote_direct = False
        header, self._layout = _encode_header(specs, metadata, align)
        self._left = {name: nbytes for name, (_, _, nbytes) in self._layout.items()}
        self._lock = threading.Lock()
        self._flush_bytes = flush_bytes
        self._unflushed = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: OSError | None = None
        self._finished = False
        self._closed = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if in_place else os.O_TRUNC)
        self._fd = os.open(self.path, flags, 0o644)
        try:
            size = len(header) + sum(self._left.values())
            if in_place and os.fstat(self._fd).st_size > size:
                os.ftruncate(self._fd, size)
            try:  # on a reused file this allocates only what it lacks
                os.posix_fallocate(self._fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.ftruncate(self._fd, size)  # a file system without fallocate (some NFS)
            self._pwrite(memoryview(header), 0)
            if direct and hasattr(os, "O_DIRECT"):
                with contextlib.suppress(OSError):  # refused (tmpfs, some FUSE): plain writes
                    self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except BaseException:
            self.abort(remove=not in_place)  # a reused file is its owner's to keep or delete
            raise

    @property
    def direct(self) -> bool:
        """Whether aligned chunks go around the page cache."""
        return self._direct_fd is not None and not self._direct_refused

    def _pwrite(self, data: memoryview, offset: int, address: int | None = None) -> None:
        fd = self._fd
        if self.direct and address is not None and not (offset | data.nbytes | address) % DIRECT_ALIGN:
            fd = self._direct_fd
        done = 0
        while done < data.nbytes:
            try:
                done += os.pwrite(fd, data[done:], offset + done)
                if fd != self._fd:
                    self.wrote_direct = True
            except OSError as exc:
                if fd == self._fd or exc.errno != errno.EINVAL:
                    raise
                # the device wants a larger alignment: plain writes from here on (the descriptor
                # is closed with the writer: another thread may be writing through it)
                self._direct_refused = True
            fd = self._fd  # the rest of a short or refused direct write: through the page cache

    def write(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Put ``chunk`` (flattened) at element ``start`` of tensor ``name``. Thread-safe; each
        element must be written exactly once."""
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        try:
            dtype, offset, nbytes = self._layout[name]
        except KeyError:
            raise ValueError(f"{self.path}: no tensor {name!r} in this file") from None
        if chunk.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {name!r} is {dtype}, got a {chunk.dtype} chunk")
        flat = _flat(chunk)
        data = _as_bytes(flat)
        begin = start * dtype.itemsize
        if start < 0 or begin + data.nbytes > nbytes:
            raise ValueError(f"{self.path}: chunk at element {start} overruns tensor {name!r}")
        if data.nbytes:
            self._pwrite(data, offset + begin, flat.data_ptr())
        with self._lock:
            self._left[name] -= data.nbytes
            self._unflushed += data.nbytes
            if self._flush_error is not None:
                raise self._flush_error
            if self._flush_bytes and self._unflushed >= self._flush_bytes and not self._flushing():
                self._unflushed = 0
                self._flusher = threading.Thread(target=self._flush, name="relexd-fdatasync", daemon=True)
                self._flusher.start()

    def _flushing(self) -> bool:
        return self._flusher is not None and self._flusher.is_alive()

    def _flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:  # raised to the writers at their next write, or at close
            self._flush_error = exc

    def close(self) -> None:
        """Check that every tensor is complete, then fsync (an incomplete file is deleted)."""
        if self._closed:
            return
        if self._flusher is not None:
            self._flusher.join()
        missing = [name for name, left in self._left.items() if left]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: closed before tensors {missing[:5]} were complete")
        try:
            if self._flush_error is not None:
                raise self._flush_error
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        self._close_direct()
        os.close(self._fd)
        self._closed = self._finished = True

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def abort(self, *, remove: bool = True) -> None:
        """Close and delete the partial file (a no-op once :meth:`close` succeeded);
        ``remove=False`` keeps it, for a caller that recycles its blocks."""
        if self._finished:
            return
        if self._flusher is not None:
            self._flusher.join()
        if not self._closed:
            self._closed = True
            self._close_direct()
            os.close(self._fd)
        if remove:
            self.path.unlink(missing_ok=True)
