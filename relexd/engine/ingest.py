"""Ingest one checkpoint: stream its tensors through the estimators and commit a new generation.

Tensors are independent: each is one task of a :class:`~relexd.engine.pool.TensorPool`, computed by
one worker thread on one core, which writes its results into their fixed places in the new files
(on this host, or on cluster workers: :mod:`relexd.engine.backend`).

Memory: a task holds its tensor's delta x (float32) while its sketch is updated; the sketch, the
base, the anchors and the checkpoint are read in chunks of :data:`CHUNK_ELEMS` elements. Peak RSS is
therefore about the largest tensors in flight in float32 (one per worker, capped by the memory
budget) plus a fixed overhead, whatever the model size.

Nothing is visible until the commit: an error at any tensor (NaN, truncated file, rotation, disk
full) aborts the new generation and leaves the published state exactly as it was.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from relexd.engine.base import BaseModel
from relexd.engine.config import EngineConfig
from relexd.engine.memory import TaskBuffers
from relexd.engine.page_cache import page_cache_room, state_outgrows_page_cache
from relexd.engine.pool import Cancelled, Cutoff, TensorPool
from relexd.errors import CheckpointError, RelexdError
from relexd.io.reader import WeightReader
from relexd.io.safetensors_file import DIRECT_ALIGN, PositionalSafetensorsWriter, aligned_empty, dtype_code
from relexd.math import kernels
from relexd.math.confidence import (
    ForecastSums,
    TensorFigures,
    anchors_to_keep,
    choose_anchor,
    horizon_label,
    is_anchor_count,
    model_figures,
)
from relexd.math.fit import fit_line
from relexd.math.sketch import SmallState, make_update
from relexd.state.store import (
    AnchorFiles,
    Partition,
    PartWriters,
    Snapshot,
    StateStore,
    StateWriteError,
    Transaction,
)

if TYPE_CHECKING:
    from relexd.engine.backend import TensorBackend

#: Elements per chunk: 4 MiB of float32 — big enough for fast BLAS, small against any real tensor,
#: and small enough that the float64 temporaries of a chunk stay a few tens of MB.
CHUNK_ELEMS = 1 << 20

#: Tensors of at most this many elements are the pool's fillers (:mod:`relexd.engine.pool`): a task
#: costs 1–2 ms of Python (GIL-bound) whatever its size, as much as ~0.5 M elements of the
#: kernels' work at rank 1 (0.5B's 290 tensors shrunk to at most 16 K elements each: 0.4–0.9 s per
#: ingest, ``python -m bench.per_tensor``), so up to one chunk the fixed part is most of a task.
FILLER_ELEMS = CHUNK_ELEMS

#: Fillers of at most this many elements run one at a time (the pool's ``serial`` tasks): nearly
#: all of such a task holds the GIL, so two at once only pass it back and forth. Measured on models
#: of only such tensors (Qwen2.5-0.5B's 290 tensor names shrunk to ≤16 K elements, and to ≤80 K:
#: LoRA-adapter sizes): 1.6–2.1× faster per ingest with half the CPU or less (``python -m
#: bench.per_tensor``); tensors of 0.26–0.46 M elements were no faster either way, so larger ones
#: keep running beside each other.
#: Neutral at 0.5B, where they run beside the large tensors anyway (bench/README.md, 7 Dec, night).
SERIAL_ELEMS = 1 << 17

#: Non-weight files copied from the newest checkpoint into previews (what a loader needs; never
#: trainer internals such as optimizer or RNG state).
#: Formats whose files are Hugging Face weight files (the preview can mirror their shards).
HF_FORMATS = ("safetensors", "bin", "peft")
AUX_FILES = (
    "config.json",
    "adapter_config.json",  # a PEFT adapter's: its preview is an adapter PeftModel loads
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
AUX_MAX_BYTES = 64 << 20

#: Per-checkpoint history entries kept in the state (figures, forecasts, timings). Bounded so that a
#: run of many thousand checkpoints keeps a constant-size meta.json and constant daemon memory; the
#: full series lives in Prometheus.
HISTORY_LIMIT = 1000


class Interrupted(RelexdError):
    """The caller asked to stop; the half-done generation was abandoned."""


@dataclass
class IngestReport:
    step: int
    seconds: float
    bytes_read: int
    snapshot: Snapshot
    figures: dict[str, float | None] = field(default_factory=dict)
    forecasts: list[dict[str, Any]] = field(default_factory=list)
    #: what became of the replaced sketch's pages (:mod:`relexd.engine.page_cache`): "dropped" (the
    #: state outgrows the page cache), "kept", or None (no sketch replaced, or cluster workers decided)
    replaced_sketch: str | None = None
    #: how the new sketch reached the disk: "direct" (its aligned chunks around the page cache: even
    #: the state without the replaced sketch outgrows it), "cached" (through the page cache), or
    #: None (cluster workers wrote it)
    new_sketch: str | None = None
    #: tensors computed at once (None: cluster workers decided), and the cores' worth of CPU other
    #: processes used during relexd's last ingests, which made relexd's default take fewer
    #: (:mod:`relexd.engine.cores`; None: not watched, or unknown)
    tensors_in_flight: int | None = None
    others_busy_cores: float | None = None


Span = tuple[int, int]


def spans(numel: int, chunk: int) -> Iterator[Span]:
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def with_next(chunks: Sequence[Span]) -> Iterator[tuple[Span, Span | None]]:
    """Each chunk with the one after it (None after the last): what to prefetch while it computes."""
    for n, span in enumerate(chunks):
        yield span, chunks[n + 1] if n + 1 < len(chunks) else None


def check_compatible(base: BaseModel, ckpt: WeightReader, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the base before anything is read."""
    names = set(ckpt.names())
    expected = set(base.tracked) | set(base.frozen)
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(
            ckpt.path,
            "missing_tensor",
            f"tensor {missing[0]!r} of the base is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
        )
    extra = sorted(names - expected - set(base.aliases))
    if extra:
        raise CheckpointError(ckpt.path, "unexpected_tensor", f"tensor {extra[0]!r} is not in the base")
    known = meta.get("tensors", {})
    for name in sorted(names):
        info = ckpt.info(name)
        base_name = base.aliases.get(name, name)
        base_shape = tuple(base.reader.info(base_name).shape)
        if tuple(info.shape) != base_shape:
            raise CheckpointError(
                info.file,
                "shape_mismatch",
                f"tensor {name!r} has shape {list(info.shape)}, the base has {list(base_shape)}",
            )
        seen = known.get(name, {}).get("dtype")
        if seen is not None and seen != dtype_code(info.dtype):
            raise CheckpointError(
                info.file,
                "dtype_mismatch",
                f"tensor {name!r} is {dtype_code(info.dtype)}, earlier checkpoints stored {seen}",
            )


def read_delta(
    base: BaseModel,
    ckpt: WeightReader,
    name: str,
    stop: Callable[[], None],
    x: torch.Tensor,
    scratch: torch.Tensor,
    raw: torch.Tensor,
) -> None:
    """x = θ_s − θ₀ for one whole tensor into ``x`` (float32, flattened), chunk by chunk
    (:func:`read_delta_range`, whose buffers ``scratch`` and ``raw`` are).

    Finiteness is checked by the caller on ‖x‖², which pass 1 computes anyway (:func:`check_finite`).
    """
    for i, j in spans(x.numel(), CHUNK_ELEMS):
        stop()
        read_delta_range(base, ckpt, name, i, j, x[i:j], scratch, raw)


def read_delta_range(
    base: BaseModel,
    ckpt: WeightReader,
    name: str,
    i: int,
    j: int,
    out: torch.Tensor,
    scratch: torch.Tensor,
    raw: torch.Tensor,
) -> None:
    """Elements ``[i, j)`` of x = θ_s − θ₀ into ``out`` (float32).

    Both files' bytes go through one reused byte buffer ``raw``, so a bf16 tensor never exists
    twice in memory; the base's chunk is converted in ``scratch`` (float32, at least a chunk long;
    measured faster than subtracting bf16 from float32 directly).
    """
    out.copy_(ckpt.read_range(name, i, j, raw))
    out.sub_(scratch[: j - i].copy_(base.reader.read_range(name, i, j, raw)))


def check_finite(base: BaseModel, ckpt: WeightReader, name: str, x: torch.Tensor, xsq: float) -> None:
    """Refuse a delta holding NaN or Inf: ‖x‖² is then not finite (only then look closer, since a
    sum of huge finite values may overflow too), naming the file that holds it."""
    if math.isfinite(xsq) or torch.isfinite(x).all():
        return
    bad = int((~torch.isfinite(x)).nonzero()[0])
    value = float(ckpt.read_range(name, bad, bad + 1)[0])
    info, base_info = ckpt.info(name), base.reader.info(name)
    whose, file = ("checkpoint", info.file) if not math.isfinite(value) else ("base", base_info.file)
    raise CheckpointError(
        file, "non_finite", f"tensor {name!r} of the {whose} holds NaN or Inf (first at element {bad})"
    )


def check_tie(base: BaseModel, ckpt: WeightReader, alias: str) -> None:
    """A tied tensor saved alongside its source must equal it, else it is no tie."""
    source = base.aliases[alias]
    info = ckpt.info(alias)
    for i, j in spans(info.numel, CHUNK_ELEMS):
        if not torch.equal(ckpt.read_range(alias, i, j), ckpt.read_range(source, i, j)):
            raise CheckpointError(
                info.file,
                "tie_broken",
                f"tensor {alias!r} is tied to {source!r} in the base but differs here",
            )


def task_bytes(numel: int, width: int) -> int:
    """Memory one tensor task holds: its float32 delta, plus one chunk's buffers (the old and new
    columns, the stored-dtype reads; each worker keeps its own set, reused from task to task) —
    what :class:`~relexd.engine.pool.TensorPool` budgets."""
    return 4 * numel + 4 * (2 * width + 4) * min(numel, CHUNK_ELEMS)


def sketch_order(numels: dict[str, int]) -> dict[str, int]:
    """The tensors in the order their bases are stored in the sketch file: those whose basis
    vectors are whole multiples of :data:`DIRECT_ALIGN` bytes first (every large matrix of real
    models), the rest after (biases, norms). The data starts aligned, so every basis vector of the
    first group, and every chunk of one, starts and ends aligned: what ``O_DIRECT`` needs."""
    aligned = {n: k for n, k in numels.items() if (4 * k) % DIRECT_ALIGN == 0}
    return aligned | {n: k for n, k in numels.items() if n not in aligned}


def run_tensors(
    work: CheckpointPass,
    pool: TensorPool,
    names: Sequence[str],
    should_stop: Callable[[], bool],
    on_tensor: Callable[[str, int], None] | None = None,
    in_flight: int | None = None,
) -> dict[str, TensorResult]:
    """Compute the tensors ``names`` of ``work`` on ``pool``, largest first within the memory
    budget and at most ``in_flight`` at once (None: every worker); the first error in ``names``
    order is the one raised.

    Tensors of equal size are taken in ``names`` order at one checkpoint and in reverse at the next.
    Why: a state larger than the page cache, read in the same order every time, is the case LRU
    eviction serves worst: each tensor's new basis, written early, is evicted just before the next
    ingest reads it, early. Reversed, the tensors written last, still cached, are read first. At 1.5B
    this read 11 GB from the disk per ingest instead of 13 (with :meth:`SketchFile.release`; 21-23
    GB without either; bench/README.md). The results do not depend on the order.
    """

    def task(name: str, abort: Cutoff) -> TensorResult:
        def stop() -> None:
            if abort.is_set():
                raise Cancelled
            if should_stop():
                raise Interrupted(f"stopped in tensor {name!r} of step {work.step}")

        return work.run_tensor(name, stop, pool.buffers)

    def done(name: str, _result: TensorResult) -> None:
        if on_tensor is not None:
            on_tensor(name, work.base.reader.info(name).numel)

    costs = {n: work.task_bytes(n) for n in names}
    pool.buffers.limit = work.buffer_limit(in_flight or pool.workers, pool.memory_budget)
    numels = {n: work.base.reader.info(n).numel for n in names}
    fillers = {n for n, k in numels.items() if k <= FILLER_ELEMS}
    serial = {n for n, k in numels.items() if k <= SERIAL_ELEMS}
    return pool.run(
        costs, task, done, reverse_ties=work.observed % 2 == 1, in_flight=in_flight, fillers=fillers,
        serial=serial,
    )  # fmt: skip


def ingest(
    store: StateStore,
    snapshot: Snapshot,
    base: BaseModel,
    ckpt: WeightReader,
    step: int,
    config: EngineConfig,
    *,
    backend: TensorBackend,
    source: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_tensor: Callable[[str, int], None] | None = None,
) -> IngestReport:
    """Fold checkpoint ``ckpt`` (at ``step``) into the state; returns the committed snapshot.

    The tensors are computed by ``backend`` (:mod:`relexd.engine.backend`); the state written is
    the same for any number of workers, local or not.
    """
    started = time.monotonic()
    meta = snapshot.meta
    steps: list[int] = list(meta.get("steps", []))
    if steps and step <= steps[-1]:
        raise CheckpointError(
            source or ckpt.path,
            "out_of_order",
            f"step {step} is not newer than the last ingested step {steps[-1]}",
        )
    check_compatible(base, ckpt, meta)
    for alias in base.aliases:
        if alias in ckpt.names():
            check_tie(base, ckpt, alias)

    txn = store.begin(snapshot)
    work = CheckpointPass(snapshot, base, ckpt, step, config)
    try:
        results, partition = backend.compute(work, txn, should_stop, on_tensor)
        work.combine(results)
        new_meta = _next_meta(
            meta, store, base, ckpt, step, source, work.per_tensor, work.figures(), work.forecasts(),
            work.next_anchors(partition), config, time.monotonic() - started, work.bytes_read,
        )  # fmt: skip
        if partition is not None:
            new_meta["partition"] = partition
        committed = txn.commit(work.smalls, new_meta)
    except OSError as exc:
        txn.abort()
        raise StateWriteError(
            f"{txn.path}: cannot write state ({exc.strerror or exc}); the previous state stays valid"
        ) from exc
    except BaseException:
        txn.abort()
        raise
    else:
        work.release_old_sketch()
    finally:
        work.close()
    seconds = time.monotonic() - started
    replaced = None if work.drop_replaced is None else ("dropped" if work.drop_replaced else "kept")
    return IngestReport(
        step, seconds, work.bytes_read, committed, new_meta["figures"], new_meta["forecasts"], replaced,
        work.new_sketch_path(), work.in_flight, work.others_busy,
    )  # fmt: skip


@dataclass
class _ChunkBuffers:
    """One worker's chunk-sized buffers: ``raw`` receives stored bytes (checkpoint, base,
    anchors; up to 8 bytes per element: the fused kernel reads the checkpoint into one half and
    the base into the other; in pass 2, the new anchor's two vectors as stored), ``pair`` two
    float32 conversions (a scored anchor's two vectors, so that both dot products with the delta
    are one matrix-vector product: one read of the delta's chunk instead of two; for the fused
    kernel, its bytes hold the anchor's stored vectors),
    ``scratch`` its first row, ``old`` and ``out`` the old and new sketch columns (width × chunk)."""

    raw: torch.Tensor
    pair: torch.Tensor
    old: torch.Tensor
    out: torch.Tensor

    @property
    def scratch(self) -> torch.Tensor:
        return self.pair[0]

    @classmethod
    def make(cls, width: int, chunk: int) -> _ChunkBuffers:
        f32 = torch.float32
        return cls(
            raw=torch.empty(8 * chunk, dtype=torch.uint8),
            pair=torch.empty(2, chunk, dtype=f32),
            old=aligned_empty((width, chunk), f32),
            out=aligned_empty((width, chunk), f32),  # its rows may be written with O_DIRECT
        )


@dataclass
class TensorResult:
    """What one tensor task hands back; combined over tensors in tensor order."""

    small: SmallState
    record: dict[str, Any]  # the tensor's entry of meta["per_tensor"]
    xsq: float
    dots: dict[int, tuple[float, float]]  # anchor step → (x·v_a, x·x_a)
    anchor: list[float] | None  # the new anchor's record of this tensor
    bytes_read: int


class CheckpointPass:
    """What the tensors of one checkpoint share while they stream through the estimator: the old
    sketch, the new generation's writers, the anchors being scored, and the combined results.

    :meth:`run_tensor` is called from worker threads, one tensor each: it only reads shared
    inputs and writes its own tensor's places in the new files; :meth:`combine` then folds the
    results in together, in tensor order.
    """

    def __init__(
        self, snapshot: Snapshot, base: BaseModel, ckpt: WeightReader, step: int, config: EngineConfig
    ) -> None:
        self.snapshot = snapshot
        self.base = base
        self.ckpt = ckpt
        self.step = step
        self.config = config
        steps = [*snapshot.meta.get("steps", []), step]
        self.observed = len(steps)
        self.step_tensor = torch.tensor(steps, dtype=torch.float64)
        self.anchor_recs: list[dict[str, Any]] = list(snapshot.meta.get("anchors", []))
        anchor_steps = [a["step"] for a in self.anchor_recs]
        #: horizon → the anchor step scored against this checkpoint (None: no anchor far enough back)
        self.used = {h: choose_anchor(anchor_steps, step, h) for h in config.horizons}
        self.anchor_files = {a: snapshot.anchor(a) for a in set(self.used.values()) if a is not None}
        self.make_anchor = is_anchor_count(self.observed)
        self.old_sketch = snapshot.sketch()
        # checkpoints whose reader caches assembled tensors are read by one task at a time
        self._read_lock = threading.Lock()
        self._worker = threading.local()  # per worker thread: its chunk buffers
        self.sketch: PositionalSafetensorsWriter | None = None
        self.anchor_v: PositionalSafetensorsWriter | None = None
        self.anchor_x: PositionalSafetensorsWriter | None = None
        self.sums = {h: ForecastSums() for h, a in self.used.items() if a is not None}
        self.smalls: dict[str, SmallState] = {}
        self.per_tensor: dict[str, dict[str, Any]] = {}
        self.new_anchor_tensors: dict[str, list[float]] = {}
        self.bytes_read = 0
        #: the state outgrows the page cache: drop the replaced sketch's pages once read (decided
        #: by :meth:`open_writers`, where this process writes the sketch; None: not decided here)
        self.drop_replaced: bool | None = None
        #: write the new sketch around the page cache: even with the replaced one dropped, what the
        #: next ingest reads (the new sketch, the scored anchors, the base, a checkpoint) does not
        #: fit, so cached pages of it would be evicted unread. Where it fits, the new sketch is
        #: better cached: at 1.5B rank 1 direct writes made the next ingest read it from the disk
        #: (6.3 GB) and took 6.96 s against 6.51 (bench/results/full/page-cache-1.5b-r1-direct.md)
        self.write_direct = False
        #: read the old sketch around the page cache too, where :attr:`write_direct` wrote it so
        #: (decided with it), into columns a task keeps from pass 1 to pass 2 (:meth:`keeps_columns`)
        self.read_direct = False
        #: all this ingest reads or writes and the next one reads again fits the page cache (set by
        #: :meth:`open_writers`): then no task waits for the disk, and one per core is enough
        self.fits_page_cache = False
        #: tensors the local backend computes at once, and the others' load that decided it
        #: (:class:`IngestReport`)
        self.in_flight: int | None = None
        self.others_busy: float | None = None
        self.largest = max((base.reader.info(n).numel for n in base.tracked), default=0)

    def open_writers(self, txn: Transaction | PartWriters, names: Sequence[str]) -> None:
        """Writers of the sketch (and new anchor) rows of ``names``: all tracked tensors into one
        file of the transaction, or one cluster worker's share into its part files."""
        numels = {n: self.base.reader.info(n).numel for n in names}
        width = self.config.width
        room = page_cache_room()
        sketches = 1 if self.old_sketch is None else 2
        self.fits_page_cache = not state_outgrows_page_cache(self._working_set(numels, sketches), room)
        if self.old_sketch is not None:
            self.drop_replaced = not self.fits_page_cache
            self.write_direct = self.drop_replaced and state_outgrows_page_cache(
                self._working_set(numels, sketches=1), room
            )
        specs = {n: (torch.float32, (width, k)) for n, k in sketch_order(numels).items()}
        if isinstance(txn, Transaction):
            self.sketch = txn.sketch_writer(specs, direct=self.write_direct)
            self.read_direct = self.write_direct
        else:  # a cluster worker's part: direct writes are not measured there, so plain writes
            self.sketch = txn.sketch_writer(specs)
        if self.make_anchor:
            adt = self.config.anchor_torch_dtype
            self.anchor_v = txn.anchor_writer(
                self.step, {f"v/{n}": (adt, (k,)) for n, k in numels.items()}, "v"
            )
            self.anchor_x = txn.anchor_writer(
                self.step, {f"x/{n}": (adt, (k,)) for n, k in numels.items()}, "x"
            )

    def _working_set(self, numels: dict[str, int], sketches: int = 2) -> int:
        """Bytes of these tensors that this ingest reads or writes and the next one reads again
        (two sketches, the base, the scored anchors), plus the checkpoint's; with ``sketches=1``,
        what is left once the replaced sketch is dropped (what the next ingest reads)."""
        count = sum(numels.values())
        sketch_bytes = sketches * 4 * self.config.width * count
        anchors = len(self.anchor_files) * 2 * count * self.config.anchor_torch_dtype.itemsize
        stored = sum(
            k * (self.base.reader.info(n).dtype.itemsize + self.ckpt.info(n).dtype.itemsize)
            for n, k in numels.items()
        )
        return sketch_bytes + anchors + stored

    def new_sketch_path(self) -> str | None:
        """ "direct" if chunks of the new sketch went around the page cache, "cached" if it was all
        written through it, None where cluster workers wrote it (:class:`IngestReport`)."""
        if self.sketch is None:
            return None
        return "direct" if self.sketch.wrote_direct else "cached"

    def release_old_sketch(self) -> None:
        """Drop what is left of the replaced sketch from the page cache once the new generation is
        committed, where it is to be dropped at all (each tensor's basis already went after its
        pass 2: :meth:`run_tensor`; :mod:`relexd.engine.page_cache` says when)."""
        if self.drop_replaced and self.old_sketch is not None:
            self.old_sketch.release()

    def close(self) -> None:
        if self.old_sketch is not None:
            self.old_sketch.close()
        for f in self.anchor_files.values():
            f.close()

    @property
    def maps_state(self) -> bool:
        """Whether the old sketch and the anchors are mapped rather than read
        (:meth:`SafetensorsFile.view_range`): only where the whole state fits the page cache.
        Where it does not, mapping made a 1.5B rank-1 ingest slower, not faster: 1-14 s more user
        CPU per steady ingest than the reading engine's 12-23 s in the blocks around it, more than
        the system CPU it saved (paired: bench/results/full/page-cache-1.5b-r1-mapped.md). Not
        decided (a cluster worker's part): read, as before."""
        return self.drop_replaced is False

    def _old_columns(self, name: str, i: int, j: int, out: torch.Tensor) -> torch.Tensor:
        if self.old_sketch is None:  # nothing yet: a zero basis, as a view of one zero
            return torch.zeros(1).expand(self.config.width, j - i)
        return self.old_sketch.columns(name, i, j, out, mapped=self.maps_state)

    def _done_with_columns(self, name: str, i: int, j: int) -> None:
        """Unmap what :meth:`_old_columns` mapped (:meth:`SketchFile.unmap`)."""
        if self.old_sketch is not None:
            self.old_sketch.unmap(name, i, j)

    def buffer_limit(self, in_flight: int, memory_budget: int | None) -> int:
        """Bytes the tasks' large buffers (:class:`~relexd.engine.memory.TaskBuffers`) may hold,
        taken and kept together: ``in_flight`` tasks' worth of the largest task's, the delta of
        the largest tensor (a task that keeps its basis holds no more: :meth:`keeps_columns`),
        within ``memory_budget`` where one is set (but at least that one task's)."""
        largest = 4 * self.largest
        limit = in_flight * largest
        return limit if memory_budget is None else min(limit, max(memory_budget, largest))

    def keeps_columns(self, name: str) -> bool:
        """Whether tensor ``name``'s task reads its old basis once, in pass 1, and keeps it for
        pass 2 instead of reading it twice.

        Where: the state outgrows the page cache (:attr:`drop_replaced`), so the old basis is read,
        not mapped, and each read copies every byte out of the page cache, for pages that are
        dropped right after. Where the old sketch was written around the page cache
        (:attr:`read_direct`) it is read around it too, which costs the kernel neither a page found
        nor a copy per page: 1.15× faster at 1.5B rank 2 (bench/README.md, 4 Dec, evening); where it
        was written through it (1.5B rank 1 here), it is read through it once instead of twice
        (bench/README.md, 7 Dec, late night). Only for tensors whose task, with the kept basis (1 +
        width floats per element), holds no more than the largest tensor's task without (1 float
        per element): the peak memory per worker stays what it was. At 1.5B that is every tensor
        but the embedding (85 % of the sketch). Not for a sketch in the earlier row-major layout,
        which is read whole per chunk and transposed, not into a kept buffer
        (:meth:`SketchFile.columns`)."""
        old = self.old_sketch
        if not self.drop_replaced or old is None or not old.column_major or not self._basis_fits(name):
            return False
        return not self.read_direct or old.direct_readable(name, self.config.width)

    def _basis_fits(self, name: str) -> bool:
        """Whether tensor ``name``'s task, holding its whole old basis besides its delta (1 + width
        floats per element), holds no more than the largest tensor's task without (1 float per
        element): the rule of :meth:`keeps_columns` and :meth:`holds_mapped`."""
        return (1 + self.config.width) * self.base.reader.info(name).numel <= self.largest

    def holds_mapped(self, name: str) -> bool:
        """Whether tensor ``name``'s task keeps each chunk of its old basis mapped from pass 1 to
        pass 2, instead of unmapping it after pass 1 and mapping it again for pass 2.

        Where: the state is mapped (:attr:`maps_state`), and only for tensors whose task, with its
        whole basis mapped (resident: it counts in RSS), holds no more than the largest tensor's
        task without (the rule of :meth:`keeps_columns`): the peak memory per worker stays what it
        was. At 0.5B that is every tensor but the embedding (72 % of the sketch). Why: mapping a
        page-cache page (``MADV_POPULATE_READ``) and unmapping it (``MADV_DONTNEED``, a TLB flush
        on every core the process runs on) cost the kernel per page, once more per pass; held,
        steady cached 0.5B rank-1 ingests made 20 % fewer ``madvise`` calls (bench/README.md, 7 Dec,
        afternoon)."""
        return self.maps_state and self.old_sketch is not None and self._basis_fits(name)

    def task_bytes(self, name: str) -> int:
        """Memory the task of tensor ``name`` holds (:func:`task_bytes`, plus its kept or held
        columns)."""
        numel, width = self.base.reader.info(name).numel, self.config.width
        basis = self.keeps_columns(name) or self.holds_mapped(name)
        return task_bytes(numel, width) + (4 * width * numel if basis else 0)

    def _chunk_buffers(self) -> _ChunkBuffers:
        """This worker's chunk buffers, made once per checkpoint and reused for every tensor it
        computes (fresh multi-MB buffers per tensor page-faulted on first touch: ~5 % of an ingest's
        samples in perf, 2 Dec)."""
        buffers: _ChunkBuffers | None = getattr(self._worker, "chunk", None)
        if buffers is None:
            self._worker.chunk = buffers = _ChunkBuffers.make(self.config.width, CHUNK_ELEMS)
        return buffers

    def _stored_pair(self, name: str, i: int, j: int, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements [i, j) of the checkpoint's and the base's tensor ``name`` as stored, read into
        the two halves of the byte buffer ``raw`` (8 bytes per element: room for two float32s)."""
        half = raw.numel() // 2
        ckpt = self.ckpt.read_range(name, i, j, raw[:half])
        return ckpt, self.base.reader.read_range(name, i, j, raw[half:])

    def _anchor_stored(
        self, f: AnchorFiles, name: str, i: int, j: int, into: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements [i, j) of an anchor's vectors (v, x) as stored: views of the mapped file where
        the state is mapped (:meth:`_unmap_anchor` them once used), else read into the two byte
        buffers ``into`` (at least 4 bytes per element each: anchors are bfloat16 or float32)."""
        out = []
        for key, buf in zip((f"v/{name}", f"x/{name}"), into, strict=True):
            view = f.view_range(key, i, j) if self.maps_state else None
            out.append(f.read_range(key, i, j, buf) if view is None else view)
        return out[0], out[1]

    def _unmap_anchor(self, f: AnchorFiles, name: str, i: int, j: int) -> None:
        """Unmap what :meth:`_anchor_stored` mapped."""
        if self.maps_state:
            for key in (f"v/{name}", f"x/{name}"):
                f.unmap(key, i, j)

    def _prefetch(self, name: str, span: Span | None, *, anchors: bool = True, sketch: bool = True) -> None:
        """Start reading the state's bytes of ``span`` (the next chunk) while this one computes:
        the old sketch's unless ``sketch`` is False, and the scored anchors' unless ``anchors`` is."""
        if span is None:
            return
        if sketch and self.old_sketch is not None:
            self.old_sketch.prefetch(name, *span)
        for f in self.anchor_files.values() if anchors else ():
            f.prefetch(f"v/{name}", *span)
            f.prefetch(f"x/{name}", *span)

    def run_tensor(self, name: str, stop: Callable[[], None], buffers: TaskBuffers) -> TensorResult:
        """Update one tensor's sketch (:meth:`_update`), in a delta buffer (and a kept basis:
        :meth:`keeps_columns`) taken from ``buffers`` and given back to them once done."""
        numel, width = self.ckpt.info(name).numel, self.config.width
        x = buffers.take(numel)
        kept = buffers.take(width * numel) if self.keeps_columns(name) else None
        try:
            columns = None if kept is None else kept[: width * numel].view(width, numel)
            return self._update(name, stop, x[:numel], columns)
        finally:
            buffers.give(x)
            if kept is not None:
                buffers.give(kept)

    def _update(
        self, name: str, stop: Callable[[], None], x: torch.Tensor, kept: torch.Tensor | None
    ) -> TensorResult:
        """Update one tensor's sketch (see :mod:`relexd.math.sketch`): pass 1 forms the delta chunk
        by chunk and takes the products and the anchors' dot products while the chunk is in the
        CPU's cache, an exact residual pass runs only if the products cancel, then pass 2 writes the
        new columns (and the new anchor's vectors) into their places. The next chunk of the state's
        files is requested from the disk while the current one computes (:meth:`_prefetch`); where
        the state fits the page cache, the old basis and the anchors are mapped chunk by chunk
        rather than copied out of it (:attr:`maps_state`: a fifth of a cached ingest's CPU went to
        those copies) and unmapped after use. Where
        the state outgrows the page cache (:mod:`relexd.engine.page_cache`), each chunk of the old
        basis leaves it once read for the last time (:meth:`SketchFile.release`): the old basis of
        every tensor but the largest is read once, by pass 1, and kept for pass 2
        (:meth:`keeps_columns`), in ``kept`` (width × numel), and where even the rest outgrows the
        page cache the new columns are written around it (``O_DIRECT``: :attr:`write_direct`) and
        the kept bases are read around it too. Where it is mapped, the same tensors' old basis
        stays mapped from pass 1 to pass 2 (:meth:`holds_mapped`). ``x`` receives the delta (numel)."""
        config = self.config
        width = config.width
        stored = self.ckpt.info(name)
        numel = stored.numel
        buf = self._chunk_buffers()
        chunks = list(spans(numel, CHUNK_ELEMS))
        first = chunks[0] if chunks else None  # none for a tensor without elements
        # a checkpoint whose reader caches assembled tensors is read whole, by one task at a time,
        # before the pass; any other is read chunk by chunk inside it
        fused = self.ckpt.concurrent_reads
        # the page cache cannot bring forward a basis read around it
        prefetch_basis = kept is None or not self.read_direct
        self._prefetch(name, first, sketch=prefetch_basis)
        if not fused:
            with self._read_lock:
                read_delta(self.base, self.ckpt, name, stop, x, buf.scratch, buf.raw)
        sketch_bytes = width * numel * 4 if self.old_sketch is not None else 0  # one pass over it
        bytes_read = numel * (stored.dtype.itemsize + self.base.reader.info(name).dtype.itemsize)
        bytes_read += sketch_bytes

        upd = make_update(config.estimator, self.snapshot.small(name), width, config.oja_eta)

        def anchor_pair(f: AnchorFiles, i: int, j: int) -> torch.Tensor:
            """Elements [i, j) of an anchor's two vectors (v, x) in float32, rows of one buffer,
            converted from the mapped file (no copy out of the page cache first) or read."""
            for row, value in enumerate(self._anchor_stored(f, name, i, j, buf.raw.chunk(2))):
                buf.pair[row, : j - i].copy_(value)
            self._unmap_anchor(f, name, i, j)
            return buf.pair[:, : j - i]

        hold = self.holds_mapped(name)
        held: dict[int, torch.Tensor] = {}  # chunk start → its old basis, mapped, held for pass 2

        def old_columns(i: int, j: int) -> torch.Tensor:
            """The old basis of elements [i, j): kept (read by pass 1), held mapped, or read."""
            if kept is not None:
                return kept[:, i:j]
            q = held.get(i)
            if q is None:
                q = self._old_columns(name, i, j, buf.old)
                # a view of the mapped file is held; one read into the chunk buffer (the file
                # could not be mapped) is overwritten by the next chunk's, so it is read again
                if hold and q.untyped_storage().data_ptr() != buf.old.untyped_storage().data_ptr():
                    held[i] = q
            return q

        def done_with_columns(i: int, j: int, *, last: bool) -> None:
            """Unmap the old basis of elements [i, j) after its ``last`` use, or after any use
            where it is not held."""
            if kept is None and (last or i not in held):
                held.pop(i, None)
                self._done_with_columns(name, i, j)

        # pass 1 in one fused loop per chunk (relexd.math.kernels) where the estimator's rows
        # allow it, forming the delta in it too where the stored dtypes do, with the first anchor
        kernel = upd.rows_used <= kernels.MAX_ROWS
        forms_delta = (
            kernel
            and fused
            and all(kernels.widens(d) for d in (stored.dtype, self.base.reader.info(name).dtype))
        )
        kernel_anchor = next(iter(self.anchor_files), None) if kernel else None
        dots = {a: [0.0, 0.0] for a in self.anchor_files}  # x·v_a, x·x_a
        for (i, j), nxt in with_next(chunks):
            stop()
            self._prefetch(name, nxt, sketch=prefetch_basis)
            if fused and not forms_delta:
                read_delta_range(self.base, self.ckpt, name, i, j, x[i:j], buf.scratch, buf.raw)
            if kept is not None and self.old_sketch is not None:
                self.old_sketch.columns(name, i, j, kept[:, i:j], direct=self.read_direct)
                if not self.read_direct:
                    self.old_sketch.release(name, i, j)  # read for the last time
            q = old_columns(i, j)
            if kernel:
                delta_of = self._stored_pair(name, i, j, buf.raw) if forms_delta else None
                anchor = None
                if kernel_anchor is not None:
                    halves = buf.pair.view(-1).view(torch.uint8).chunk(2)  # raw holds ckpt and base
                    anchor = self._anchor_stored(self.anchor_files[kernel_anchor], name, i, j, halves)
                products = kernels.pass1(x[i:j], [q[r] for r in range(upd.rows_used)], anchor, delta_of)
                if kernel_anchor is not None and products.anchor is not None:
                    self._unmap_anchor(self.anchor_files[kernel_anchor], name, i, j)
                    for n, dot in enumerate(products.anchor):
                        dots[kernel_anchor][n] += dot
                upd.add_products(products)
            else:
                upd.accumulate(q, x[i:j])
            done_with_columns(i, j, last=False)
            for a, f in self.anchor_files.items():
                if a == kernel_anchor:
                    continue
                x_dot_v, x_dot_xa = torch.mv(anchor_pair(f, i, j), x[i:j]).tolist()
                dots[a][0] += x_dot_v
                dots[a][1] += x_dot_xa
        check_finite(self.base, self.ckpt, name, x, upd.xsq)
        reread = kept is None and not held  # later passes read the old basis from its file again
        if upd.exact_residual_needed():
            bytes_read += sketch_bytes if reread else 0
            for i, j in chunks:
                stop()
                upd.accumulate_residual(old_columns(i, j), x[i:j])
                done_with_columns(i, j, last=False)
        new_small = upd.plan()
        fit = fit_line(self.step_tensor, new_small.coefficients, config.window)

        assert self.sketch is not None, "open_writers() first"
        a_vsq = a_xsq = 0.0
        adt = config.anchor_torch_dtype
        bytes_read += sketch_bytes if reread else 0
        self._prefetch(name, first, anchors=False, sketch=reread)
        for (i, j), nxt in with_next(chunks):
            stop()
            self._prefetch(name, nxt, anchors=False, sketch=reread)
            q_new = upd.new_columns(old_columns(i, j), x[i:j], buf.out)
            if kept is None:
                done_with_columns(i, j, last=True)
                if self.drop_replaced and self.old_sketch is not None:
                    self.old_sketch.release(name, i, j)  # read for the last time
            for c in range(width):
                self.sketch.write(name, c * numel + i, q_new[c])
            if self.anchor_v is not None and self.anchor_x is not None:
                # the anchor's vectors as stored, in the halves of the read buffer (pass 2 reads
                # nothing into it), and the norms of those values: the forecast uses exactly them
                va, xa = (half[: (j - i) * adt.itemsize].view(adt) for half in buf.raw.chunk(2))
                v_sq, x_sq = kernels.anchor_vectors(q_new[0], x[i:j], va, xa)
                a_vsq += v_sq
                a_xsq += x_sq
                self.anchor_v.write(f"v/{name}", i, va)
                self.anchor_x.write(f"x/{name}", i, xa)

        drift = None
        vv_old, vv_new, v_cross = upd.direction_change()
        if vv_old > 0.0 and vv_new > 0.0:
            drift = max(0.0, 1.0 - abs(v_cross) / math.sqrt(vv_old * vv_new))
        record = {
            "rank": new_small.rank,
            "energy": new_small.energy,
            "sigma1_sq": new_small.sigma1_sq,
            "alpha": fit.alpha,
            "beta": fit.beta,
            "r2": fit.r2,
            "drift": drift,
            "last_coef": float(new_small.coefficients[-1]) if new_small.rank else 0.0,
        }
        anchor = [fit.alpha, fit.beta, a_vsq, a_xsq] if self.anchor_v is not None else None
        return TensorResult(
            new_small, record, upd.xsq, {a: (d[0], d[1]) for a, d in dots.items()}, anchor, bytes_read
        )

    def combine(self, results: dict[str, TensorResult]) -> None:
        """Fold the tensors' results in, in tensor order (float sums then do not depend on which
        worker finished first)."""
        for name in self.base.tracked:
            r = results[name]
            self.smalls[name] = r.small
            self.per_tensor[name] = r.record
            self.bytes_read += r.bytes_read
            if r.anchor is not None:
                self.new_anchor_tensors[name] = r.anchor
            self._score_forecasts(name, r.xsq, r.dots)

    def _score_forecasts(self, name: str, xsq: float, dots: dict[int, tuple[float, float]]) -> None:
        for h, a in self.used.items():
            if a is None:
                continue
            rec = next(r for r in self.anchor_recs if r["step"] == a)["tensors"].get(name)
            # a tensor without a record was frozen at the anchor: its prediction there was θ₀
            alpha, beta, v_sq, xa_sq = rec if rec is not None else (0.0, 0.0, 0.0, 0.0)
            self.sums[h].add_tensor(
                xsq=xsq, x_dot_v=dots[a][0], v_sq=v_sq, x_dot_xa=dots[a][1], xa_sq=xa_sq,
                coef=alpha + beta * self.step,
            )  # fmt: skip

    def figures(self) -> dict[str, float | None]:
        return model_figures(
            TensorFigures(r["energy"], r["sigma1_sq"], r["r2"], r["drift"]) for r in self.per_tensor.values()
        ).as_dict()

    def forecasts(self) -> list[dict[str, Any]]:
        out = []
        for h, a in sorted(self.used.items()):
            if a is None:
                continue
            s = self.sums[h]
            out.append(
                {
                    "horizon": horizon_label(h),
                    "horizon_factor": h,
                    "anchor_step": a,
                    "step": self.step,
                    "ratio": self.step / a,
                    "error_ratio": s.error_ratio,
                    "skill": s.skill,
                    "e_relex": s.e_relex,
                    "e_hold": s.e_hold,
                    "e_norm": s.e_norm,
                }
            )
        return out

    def next_anchors(self, partition: Partition | None = None) -> list[dict[str, Any]]:
        """The anchor records of the next generation: plus the new one (written in ``partition``'s
        parts when given), minus those no future checkpoint can use."""
        recs = list(self.anchor_recs)
        if self.make_anchor:
            rec = {"step": self.step, "observed": self.observed, "tensors": self.new_anchor_tensors}
            recs.append(rec | ({"partition": partition} if partition is not None else {}))
        keep = anchors_to_keep([a["step"] for a in recs], self.step, self.config.horizons)
        return [a for a in recs if a["step"] in keep]


def _next_meta(
    meta: dict[str, Any],
    store: StateStore,
    base: BaseModel,
    ckpt: WeightReader,
    step: int,
    source: Path | None,
    per_tensor: dict[str, dict[str, Any]],
    figures: dict[str, float | None],
    forecasts: list[dict[str, Any]],
    anchors: list[dict[str, Any]],
    config: EngineConfig,
    seconds: float,
    bytes_read: int,
) -> dict[str, Any]:
    """The meta.json of the next generation: everything but the big arrays."""
    from relexd import __version__

    aux = dict(meta.get("aux", {}))
    # config and tokenizer: the checkpoint's own where it has them (verl: huggingface/), else the
    # base's — once: the base does not change — so that a preview of a native checkpoint is a
    # loadable HF model too
    base_dir = base.path if base.path.is_dir() else None
    for fname in AUX_FILES:
        places = (ckpt.aux_dir,) if fname in aux else (ckpt.aux_dir, base_dir)
        for where in places:
            path = where / fname if where is not None else None
            try:
                if path is not None and path.is_file() and path.stat().st_size <= AUX_MAX_BYTES:
                    aux[fname] = store.put_aux(path)
                    break
            except FileNotFoundError:
                continue  # rotated between listing and copying: keep the previous copy
    tensors = {
        name: {"dtype": dtype_code(ckpt.info(name).dtype), "shape": list(ckpt.info(name).shape)}
        for name in ckpt.names()
    }
    now = time.time()
    history = list(meta.get("history", []))[-(HISTORY_LIMIT - 1) :]
    history.append(
        {
            "step": step,
            "time": now,
            "seconds": seconds,
            "bytes": bytes_read,
            "figures": figures,
            "forecasts": forecasts,
            "source": str(source or ckpt.path),
        }
    )
    return {
        "relexd_version": __version__,
        "config": config.as_dict(),
        "base": {"path": str(base.path), "fingerprint": meta.get("base", {}).get("fingerprint")},
        "steps": [*meta.get("steps", []), step],
        "last_source": str(source or ckpt.path),
        "last_time": now,
        "tensors": tensors,
        # previews mirror the checkpoint's shard files; a native checkpoint's are not HF files,
        # so then the base's layout is mirrored
        "layout": {
            "format": ckpt.format,
            "files": (ckpt if ckpt.format in HF_FORMATS else base.reader).shard_files(),
        },
        "per_tensor": per_tensor,
        "figures": figures,
        "forecasts": forecasts,
        "anchors": anchors,
        "aux": aux,
        "history": history,
        "created": meta.get("created", now),
    }
