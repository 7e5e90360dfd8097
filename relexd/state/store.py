"""The state directory and its crash-safe commit protocol (DESIGN.md §6).

Layout::

    STATE_DIR/
      CURRENT                  {"format": 1, "generation": "g00000042"}  — the one published pointer
      LOCK                     flock'd by the one process that writes
      generations/g00000042/
        sketch.safetensors     per tensor the basis Q, column-major: width × numel float32 (each
                               basis vector contiguous; metadata {"layout": "columns"})
        small.safetensors      per tensor z (T × rank), ‖x_s‖² (T), σ (rank), float64
        meta.json              steps, fits, figures, anchors, aux files, base fingerprint, config
      anchors/a000000000064/
        v.safetensors          per tensor v_a ("v/<name>", anchor dtype) — immutable once written
        x.safetensors          per tensor x_a ("x/<name>")
      aux/<sha256>             non-weight files of the newest checkpoint (config, tokenizer), by content
      spare/sketch.safetensors the previous generation's sketch file, kept to be overwritten by the
                               next generation's (see "The spare sketch" below); referenced by nothing

A generation written by cluster workers (:mod:`relexd.cluster`) holds its sketch in parts, one file
per worker (``sketch-<attempt>-<part>.safetensors``, and likewise ``v-…``/``x-…`` in a new anchor),
named in ``meta.json``'s ``partition`` ({"attempt": hex, "parts": [[tensor, …], …]}). The attempt
token is new for every try at a generation, so a worker of an abandoned try that is still writing
can only ever add files nobody references; :meth:`StateStore.cleanup` removes those too.

A commit writes a complete new generation (and any new anchor) aside, fsyncs it, and then publishes it
by atomically replacing CURRENT. A ``kill -9`` before that rename leaves the previous generation
published; the unreferenced files are removed by :meth:`StateStore.cleanup` on the next start.
Generations are rewritten whole (not patched in place) because that is what makes every instant
recoverable without a journal; the cost is one write of the sketch per checkpoint.

**The spare sketch.** Writing a generation into a new file and deleting the old one costs the
kernel a page allocation for every page written, and freeing the old file's pages and extents when
its last descriptor closes (~1.2 s for a 4 GB sketch, measured on a 0.5B state at rank 2). So the
store keeps the sketch file of the generation it replaced as the *spare*, and the next transaction
renames it into its own directory and overwrites every byte of it: 1.24× faster ingests while the
spare is in the page cache, 1.14× when it is not (``python -m bench.spare``, bench/README.md). The
disk needed at peak does not change — two sketches exist during every ingest either way — but
relexd keeps holding it between ingests: the state at rest is one sketch larger (``spare=False``,
``--no-spare-sketch``, gives it back after each commit, at the price above). The spare is safe to
overwrite because nothing reads it: it belongs to no published generation, and a sketch is only
ever read by the process holding LOCK, whose readers of the old generation are closed before its
next ingest begins (other processes read a snapshot's meta and small files; cluster workers read
sketches only within the ingest that drives them, and with a cluster no spare is kept: part files
``sketch-<attempt>-<part>`` are written by other processes on other hosts).

States written before the column-major layout hold numel × width sketches without the metadata; they
are read as such and the next generation is written column-major (same FORMAT_VERSION: the layout
is self-describing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from relexd._closeable import Closeable
from relexd.errors import StateError
from relexd.io.atomic import fsync_dir, remove_tree, write_json_atomic
from relexd.io.filesystems import mapping_is_safe
from relexd.io.safetensors_file import DIRECT_ALIGN, PositionalSafetensorsWriter, SafetensorsFile
from relexd.math.sketch import SmallState

FORMAT_VERSION = 1
CURRENT = "CURRENT"
SKETCH_FILE = "sketch.safetensors"
SPARE_DIR = "spare"
SMALL_FILE = "small.safetensors"
META_FILE = "meta.json"
ANCHOR_KINDS = ("v", "x")  # v_a: the direction, x_a: the delta at the anchor step
#: ``__metadata__`` of a column-major sketch file
SKETCH_COLUMNS = {"layout": "columns"}

#: A generation's (or anchor's) ``partition``: {"attempt": hex token, "parts": [[tensor, …], …]}.
Partition = dict[str, Any]


def part_file(stem: str, attempt: str, index: int) -> str:
    """The file of part ``index`` of a partitioned ``stem`` ("sketch", "v", "x")."""
    return f"{stem}-{attempt}-{index:03d}.safetensors"


def sketch_files(directory: Path, partition: Partition | None, stem: str = "sketch") -> list[Path]:
    """The files holding ``stem`` in ``directory``: one, or one per part."""
    if not partition:
        return [directory / f"{stem}.safetensors"]
    return [directory / part_file(stem, partition["attempt"], i) for i in range(len(partition["parts"]))]


TensorSpecs = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


class StateWriteError(StateError):
    """Writing the next generation failed (disk full, permissions); the previous one stays valid."""


def generation_name(number: int) -> str:
    return f"g{number:08d}"


def anchor_name(step: int) -> str:
    return f"a{step:012d}"


@dataclass
class Snapshot:
    """One published generation, opened for reading."""

    root: Path
    name: str | None  # None: nothing committed yet
    meta: dict[str, Any]
    _small: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return self.root / "generations" / self.name if self.name else None

    def small(self, tensor: str) -> SmallState:
        if f"z/{tensor}" not in self._small:
            return SmallState.empty()
        return SmallState(
            z=self._small[f"z/{tensor}"],
            sqnorms=self._small[f"sq/{tensor}"],
            sigma=self._small[f"sigma/{tensor}"],
        )

    def sketch(self) -> SketchFile | None:
        if self.path is None:
            return None
        files = sketch_files(self.path, self.meta.get("partition"))
        if not all(f.exists() for f in files):
            return None
        return SketchFile(files)

    def anchor(self, step: int) -> AnchorFiles:
        record = next((a for a in self.meta.get("anchors", []) if a["step"] == step), {})
        return AnchorFiles(self.root / "anchors" / anchor_name(step), record.get("partition"))

    def files(self) -> set[Path]:
        """Every file this generation references in its own directory."""
        if self.path is None:
            return set()
        sketch = sketch_files(self.path, self.meta.get("partition"))
        return {self.path / META_FILE, self.path / SMALL_FILE, *sketch}

    def aux_path(self, digest: str) -> Path:
        return self.root / "aux" / digest


class _Files(Closeable):
    """Several safetensors files read as one: each key lives in exactly one of them."""

    def __init__(self, paths: list[Path]) -> None:
        self.parts: list[SafetensorsFile] = []
        try:
            for path in paths:  # our own files, never truncated; mapped where a page cannot be lost
                self.parts.append(SafetensorsFile(path, mapped=mapping_is_safe(path)))
        except BaseException:
            self.close()
            raise
        self._by_key = {key: f for f in self.parts for key in f.header.tensors}

    def file(self, key: str) -> SafetensorsFile:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"{key!r} is in none of {[str(f.path) for f in self.parts]}") from None

    def close(self) -> None:
        for f in self.parts:
            f.close()


class SketchFile(Closeable):
    """One generation's sketch (one file, or one per part), read as column chunks.

    Plain reads into the caller's reused buffer by default. Mapped chunks (``columns(mapped=True)``)
    where the engine asks for them (the whole state fits the page cache) and the file system is
    local (:func:`relexd.io.filesystems.mapping_is_safe`), each chunk's pages populated at once
    (:meth:`SafetensorsFile.view_range`): a mapping faulted in a few pages at a time, on a sketch
    not in the page cache (from 1.5B parameters on here), measured slower than the whole old engine.
    """

    def __init__(self, paths: Path | list[Path]) -> None:
        self._files = _Files([paths] if isinstance(paths, Path) else list(paths))
        self.column_major = all(
            (f.header.metadata or {}).get("layout") == SKETCH_COLUMNS["layout"] for f in self._files.parts
        )

    def columns(
        self,
        name: str,
        start: int,
        stop: int,
        out: torch.Tensor | None = None,
        count: int | None = None,
        *,
        direct: bool = False,
        mapped: bool = False,
    ) -> torch.Tensor:
        """Elements ``[start, stop)`` of the first ``count`` basis vectors (default: all, width) of
        tensor ``name``: count × n float32, read into ``out`` (rows contiguous) when given;
        ``direct``: around the page cache where the rows allow it
        (:meth:`SafetensorsFile.read_range`); ``mapped``: a view of the mapped file where it can
        be mapped (rows ``numel`` apart; :meth:`unmap` it once used), read into ``out`` otherwise."""
        file = self._files.file(name)
        shape = file.info(name).shape
        n = stop - start
        if not self.column_major:
            width = shape[1]  # the earlier row-major layout: numel × width, read once per old state
            rows = file.read_range(name, start * width, stop * width).reshape(n, width)
            return rows.T.contiguous()  # products on strided rows measured 50× less accurate
        width = shape[0] if count is None else min(count, shape[0])
        if mapped and not direct:
            view = file.view_range(name, start, stop, rows=width, row_stride=shape[1])
            if view is not None:
                return view
        if out is None:
            out = torch.empty(width, n, dtype=torch.float32)
        for c, (first, last) in enumerate(self._ranges(file, name, start, stop)[:width]):
            file.read_range(name, first, last, out[c, :n], direct=direct)  # in place
        return out[:width, :n]

    def unmap(self, name: str, start: int, stop: int) -> None:
        """Unmap what ``columns(name, start, stop, mapped=True)`` mapped
        (:meth:`SafetensorsFile.unmap`); nothing where it was read instead."""
        if self.column_major:
            file = self._files.file(name)
            width, numel = file.info(name).shape
            file.unmap(name, start, stop, rows=width, row_stride=numel)

    def direct_readable(self, name: str, width: int) -> bool:
        """Whether every chunk of ``name``'s ``width`` basis vectors can be read around the page
        cache into an aligned buffer of the same layout: column-major, stored at an aligned
        offset, each vector a whole number of :data:`DIRECT_ALIGN` bytes (the large matrices:
        :func:`relexd.engine.ingest.sketch_order` stores them first, aligned)."""
        if not self.column_major:
            return False
        info = self._files.file(name).info(name)
        return (
            info.shape[0] == width
            and info.dtype == torch.float32
            and not info.start % DIRECT_ALIGN
            and not (4 * info.shape[1]) % DIRECT_ALIGN
        )

    def _ranges(
        self, file: SafetensorsFile, name: str, start: int, stop: int | None
    ) -> list[tuple[int, int]]:
        """Where elements ``[start, stop)`` (stop None: to the end) of tensor ``name``'s basis
        vectors lie in its flattened tensor: one range per vector, or one range in the earlier
        row-major layout (numel × width)."""
        shape = file.info(name).shape
        if not self.column_major:
            numel, width = shape
            return [(start * width, (numel if stop is None else stop) * width)]
        width, numel = shape
        stop = numel if stop is None else stop
        return [(c * numel + start, c * numel + stop) for c in range(width)]

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Start reading elements ``[start, stop)`` of every basis vector of ``name`` into the
        page cache (:meth:`SafetensorsFile.prefetch`), to be read a chunk later."""
        if not self.column_major:
            return  # the old row-major layout is read once per state and rewritten
        file = self._files.file(name)
        for first, last in self._ranges(file, name, start, stop):
            file.prefetch(name, first, last)

    def release(self, name: str | None = None, start: int = 0, stop: int | None = None) -> None:
        """Drop elements ``[start, stop)`` of every basis vector of tensor ``name`` (default: all of
        them; no name: every file in full) from the page cache once an ingest has read them for the
        last time (:meth:`SafetensorsFile.release`).

        Why: after the commit this file is the spare, which the next generation overwrites without
        reading it, so its cached pages are dead. On a state larger than the page cache they take
        room from what the next ingest does read (the new sketch, the base, the anchors) and made
        nearly every one of those pages a miss (1.5B, bench/README.md); on a state that fits they
        are better kept (:mod:`relexd.engine.page_cache` decides). Chunk by chunk, as pass 2 reads
        each for the last time, so that the room is there while the ingest runs and the pages freed
        are the ones its next reads take at once (memory left free is not free everywhere: a VM that
        hands it back to its host faults it in again, bench/README.md "most of that system time is
        this VM's"); in full at the end for the pages (large folios) that straddle two chunks.
        """
        if name is None:
            for file in self._files.parts:
                file.release()
            return
        file = self._files.file(name)
        for first, last in self._ranges(file, name, start, stop):
            file.release(name, first, last)

    def vectors(self, name: str) -> torch.Tensor:
        """The whole basis of tensor ``name`` (width × numel), owned by the caller."""
        shape = self._files.file(name).info(name).shape
        numel = shape[1] if self.column_major else shape[0]
        return self.columns(name, 0, numel).clone()

    def close(self) -> None:
        self._files.close()


class AnchorFiles(Closeable):
    """The files of one anchor, read as one: keys are "v/<tensor>" and "x/<tensor>"."""

    def __init__(self, directory: Path, partition: Partition | None = None) -> None:
        self.directory = directory
        self.paths = [p for kind in ANCHOR_KINDS for p in sketch_files(directory, partition, kind)]
        self._files = _Files(self.paths)

    def read_range(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements of "v/<tensor>" or "x/<tensor>", into the byte buffer ``out`` when given."""
        return self._files.file(key).read_range(key, start, stop, out)

    def view_range(self, key: str, start: int, stop: int) -> torch.Tensor | None:
        """Elements of "v/<tensor>" or "x/<tensor>" as a view of the mapped file (:meth:`unmap` it
        once used), or None where it is not mapped (:meth:`SafetensorsFile.view_range`)."""
        view = self._files.file(key).view_range(key, start, stop)
        return None if view is None else view[0]

    def unmap(self, key: str, start: int, stop: int) -> None:
        """Unmap what :meth:`view_range` mapped."""
        self._files.file(key).unmap(key, start, stop)

    def prefetch(self, key: str, start: int, stop: int) -> None:
        """Start reading elements ``[start, stop)`` of ``key`` (:meth:`SafetensorsFile.prefetch`)."""
        self._files.file(key).prefetch(key, start, stop)

    def close(self) -> None:
        self._files.close()


def read_snapshot(root: Path, *, load_small: bool = True) -> Snapshot:
    """Read the published generation. Safe while a writer runs: if a commit replaces the generation
    between reading CURRENT and its files, read again (the writer deletes the old one only after
    publishing the new)."""
    for _ in range(20):
        pointer = root / CURRENT
        try:
            current = json.loads(pointer.read_text())
        except FileNotFoundError:
            return Snapshot(root, None, {})
        except (OSError, ValueError) as exc:
            raise StateError(f"{pointer}: unreadable state pointer: {exc}") from exc
        fmt = current.get("format")
        if fmt != FORMAT_VERSION:
            raise StateError(
                f"{pointer}: state format {fmt!r} is not the one this relexd understands "
                f"({FORMAT_VERSION}); use a matching relexd version or a new --state-dir"
            )
        name = current.get("generation")
        if name is None:
            return Snapshot(root, None, {})
        gen = root / "generations" / name
        try:
            meta = json.loads((gen / META_FILE).read_text())
            small = load_file(str(gen / SMALL_FILE)) if load_small else {}
        except FileNotFoundError:
            continue  # replaced under us: read the new pointer
        except (OSError, ValueError) as exc:
            raise StateError(f"{gen}: unreadable generation: {exc}") from exc
        return Snapshot(root, name, meta, small)
    raise StateError(f"{root}: state keeps changing while being read")


class StateStore:
    """Exclusive writer of one state directory."""

    def __init__(self, root: Path, *, spare: bool = True) -> None:
        """``spare``: keep the replaced generation's sketch file to overwrite with the next one
        (see the module's docstring); False gives its disk space back at every commit."""
        self.root = root
        self.spare = spare
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> Snapshot:
        """Lock the directory, remove what an interrupted commit left, return the published state."""
        for sub in ("generations", "anchors", "aux", SPARE_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"{self.root}: another relexd process is writing this state directory") from None
        self._lock_fd = fd
        snapshot = read_snapshot(self.root)
        self.cleanup(snapshot, temporaries=True)
        return snapshot

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def cleanup(self, snapshot: Snapshot, *, temporaries: bool = False) -> None:
        """Delete every file the published generation does not reference (orphans of a crash).

        ``temporaries``: also the ``.tmp-*`` files of atomic writes in the root — only on open,
        when no other thread of this process can be half-way through one (the daemon writes its
        small files there while the worker commits).
        """
        anchors = {anchor_name(a["step"]): a.get("partition") for a in snapshot.meta.get("anchors", [])}
        keep_aux = set(snapshot.meta.get("aux", {}).values())
        for entry in (self.root / "generations").iterdir():
            if entry.name != snapshot.name:
                self.keep_spare(entry / SKETCH_FILE)
                remove_tree(entry)
            else:
                _remove_others(entry, snapshot.files())
        if not self.spare:
            remove_tree(self.root / SPARE_DIR / SKETCH_FILE)
        for entry in (self.root / "anchors").iterdir():
            if entry.name not in anchors:
                remove_tree(entry)
            else:
                kept = [p for kind in ANCHOR_KINDS for p in sketch_files(entry, anchors[entry.name], kind)]
                _remove_others(entry, set(kept))
        for entry in (self.root / "aux").iterdir():
            if entry.name not in keep_aux:
                remove_tree(entry)
        if not temporaries:
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                remove_tree(entry)

    # -- writing -----------------------------------------------------------------------------------

    def keep_spare(self, sketch: Path) -> None:
        """Keep the unreferenced ``sketch`` file as the spare, if there is none yet. Its content
        does not matter (every byte is rewritten before it is published again), so a crash's
        half-written file serves as well as a committed one; a failed rename only costs speed."""
        spare = self.root / SPARE_DIR / SKETCH_FILE
        if not self.spare or spare.exists() or not sketch.is_file() or sketch.is_symlink():
            return
        with contextlib.suppress(OSError):
            os.replace(sketch, spare)

    def take_spare(self, target: Path) -> bool:
        """Move the spare sketch file to ``target``; False when there is none."""
        if not self.spare:
            return False
        try:
            os.replace(self.root / SPARE_DIR / SKETCH_FILE, target)
        except FileNotFoundError:
            return False
        return True

    def begin(self, snapshot: Snapshot) -> Transaction:
        number = int(snapshot.name[1:]) + 1 if snapshot.name else 1
        return Transaction(self, generation_name(number), snapshot)

    def put_aux(self, source: Path) -> str:
        """Store a small non-weight file by content; returns its digest (idempotent)."""
        data = source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        target = self.root / "aux" / digest
        if not target.exists():
            tmp = self.root / f".tmp-aux-{digest}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        return digest


class Transaction:
    """One new generation being written aside; nothing is visible until :meth:`commit`."""

    def __init__(self, store: StateStore, name: str, parent: Snapshot) -> None:
        self.store = store
        self.name = name
        self.parent = parent
        self.path = store.root / "generations" / name
        self.new_anchor_dirs: list[Path] = []
        self._writers: list[PositionalSafetensorsWriter] = []
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def sketch_writer(self, specs: TensorSpecs, *, direct: bool = False) -> PositionalSafetensorsWriter:
        """Writer of the column-major sketch; ``specs`` give each tensor's (width, numel) shape.
        It overwrites the spare sketch file in place when there is one; ``direct``: around the
        page cache (:class:`PositionalSafetensorsWriter`)."""
        path = self.path / SKETCH_FILE
        reused = self.store.take_spare(path)
        try:
            writer = PositionalSafetensorsWriter(
                path, specs, SKETCH_COLUMNS, in_place=reused, align=DIRECT_ALIGN, direct=direct
            )
        except OSError as exc:
            raise _write_error(path, exc) from exc
        self._writers.append(writer)
        return writer

    def anchor_writer(self, step: int, specs: TensorSpecs, kind: str) -> PositionalSafetensorsWriter:
        """Writer of one of the anchor's files (``kind`` "v" or "x"); keys must be "<kind>/<tensor>"."""
        return self._open_writer(self.anchor_dir(step) / f"{kind}.safetensors", specs)

    def anchor_dir(self, step: int) -> Path:
        """The new anchor's directory, emptied of what an interrupted commit of the same step left
        (once per transaction); cluster workers write their parts into it."""
        directory = self.store.root / "anchors" / anchor_name(step)
        if directory not in self.new_anchor_dirs:
            remove_tree(directory)
            try:
                directory.mkdir(parents=True)
            except OSError as exc:
                raise _write_error(directory, exc) from exc
            self.new_anchor_dirs.append(directory)
        return directory

    def _open_writer(
        self, path: Path, specs: TensorSpecs, metadata: Mapping[str, str] | None = None
    ) -> PositionalSafetensorsWriter:
        writer = _new_writer(path, specs, metadata)
        self._writers.append(writer)
        return writer

    def commit(self, small: Mapping[str, SmallState], meta: dict[str, Any]) -> Snapshot:
        """Write the small arrays and meta, make everything durable, publish, drop the old."""
        tensors: dict[str, torch.Tensor] = {}
        for name, state in small.items():
            tensors[f"z/{name}"] = state.z.contiguous()
            tensors[f"sq/{name}"] = state.sqnorms.contiguous()
            tensors[f"sigma/{name}"] = state.sigma.contiguous()
        try:
            for writer in self._writers:
                writer.close()
            # Both are written after the last tensor, while no worker runs, so their time adds to
            # every ingest whole. safetensors.numpy writes the same bytes as safetensors.torch in
            # less than half the time, and meta.json unindented takes less than half too: the
            # commit of a 290-tensor state took 29-32 ms instead of 57 (python -m
            # bench.state_commit, bench/results/full/state-commit.md).
            save_file({k: t.numpy() for k, t in tensors.items()}, str(self.path / SMALL_FILE))
            _fsync_file(self.path / SMALL_FILE)
            (self.path / META_FILE).write_text(json.dumps(meta, sort_keys=True))
            _fsync_file(self.path / META_FILE)
            for directory in [self.path, *self.new_anchor_dirs]:
                fsync_dir(directory)
            for sub in ("generations", "anchors", "aux"):
                fsync_dir(self.store.root / sub)
            write_json_atomic(self.store.root / CURRENT, {"format": FORMAT_VERSION, "generation": self.name})
        except OSError as exc:
            self.abort()
            raise _write_error(self.path, exc) from exc
        except BaseException:
            self.abort()
            raise
        snapshot = Snapshot(self.store.root, self.name, meta, tensors)
        self.store.cleanup(snapshot)
        return snapshot

    def abort(self) -> None:
        """Forget this generation; the published one is untouched (its sketch file is kept as
        the spare: relexd does not give up the disk it needs for the next try)."""
        sketch = self.path / SKETCH_FILE
        for writer in self._writers:
            writer.abort(remove=writer.path != sketch)
        self.store.keep_spare(sketch)
        remove_tree(self.path)
        for directory in self.new_anchor_dirs:
            remove_tree(directory)


class PartWriters(Closeable):
    """The writers of one part of a partitioned generation (a cluster worker's share): the same
    ``sketch_writer``/``anchor_writer`` calls as a :class:`Transaction`, writing part files into
    directories the coordinator's transaction made. :meth:`close` makes them durable; publishing
    stays the coordinator's."""

    def __init__(self, generation: Path, anchors: Path | None, attempt: str, index: int) -> None:
        self.generation, self.anchors = generation, anchors
        self.attempt, self.index = attempt, index
        self._writers: list[PositionalSafetensorsWriter] = []

    def sketch_writer(self, specs: TensorSpecs) -> PositionalSafetensorsWriter:
        path = self.generation / part_file("sketch", self.attempt, self.index)
        self._writers.append(_new_writer(path, specs, SKETCH_COLUMNS, align=DIRECT_ALIGN))
        return self._writers[-1]

    def anchor_writer(self, step: int, specs: TensorSpecs, kind: str) -> PositionalSafetensorsWriter:
        if self.anchors is None:
            raise StateError(f"{self.generation}: the coordinator made no directory for anchor {step}")
        self._writers.append(_new_writer(self.anchors / part_file(kind, self.attempt, self.index), specs))
        return self._writers[-1]

    def close(self) -> None:
        try:
            for writer in self._writers:
                writer.close()
        except OSError as exc:
            self.abort()
            raise _write_error(self.generation, exc) from exc
        self._writers.clear()

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()
        self._writers.clear()


def _new_writer(
    path: Path, specs: TensorSpecs, metadata: Mapping[str, str] | None = None, *, align: int = 8
) -> PositionalSafetensorsWriter:
    try:
        return PositionalSafetensorsWriter(path, specs, metadata, align=align)
    except OSError as exc:
        raise _write_error(path, exc) from exc


def _remove_others(directory: Path, keep: set[Path]) -> None:
    """Remove what ``directory`` holds besides ``keep`` (a late worker's orphan part files)."""
    for entry in directory.iterdir():
        if entry not in keep:
            remove_tree(entry)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, exc: OSError) -> StateWriteError:
    if exc.errno == errno.ENOSPC:
        why = "disk full"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return StateWriteError(f"{path}: cannot write state ({why}); the previous state stays valid")


def disk_usage(root: Path) -> int:
    """Bytes the state directory uses on disk."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


__all__ = [
    "FORMAT_VERSION",
    "PartWriters",
    "SketchFile",
    "Snapshot",
    "StateStore",
    "StateWriteError",
    "Transaction",
    "disk_usage",
    "read_snapshot",
]
