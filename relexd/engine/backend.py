"""Where the per-tensor work runs: the one seam between the engine's bookkeeping — validation,
forecasts, meta, commit, the preview's index and manifest, always in the coordinating process —
and the tensors themselves.

:class:`LocalTensors` runs them on this host's :class:`~relexd.engine.pool.TensorPool`; the
cluster backend (:class:`relexd.cluster.coordinator.PartitionedTensors`) on the workers of a Ray
cluster, each writing its part of the new generation or its share of a preview's shard files.
Results do not depend on the backend: each tensor is computed by the same code, and everything
computed across tensors is combined by the engine in tensor order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from relexd._closeable import Closeable
from relexd.engine import cores
from relexd.engine.base import BaseModel
from relexd.engine.config import WORKERS_PER_CORE
from relexd.engine.ingest import CheckpointPass, TensorResult, run_tensors
from relexd.engine.pool import TensorPool
from relexd.engine.preview import write_preview_files
from relexd.state.store import Partition, Snapshot, Transaction

#: a preview's shard files: source file name → the tensors it holds (``meta["layout"]["files"]``)
ShardFiles = Mapping[str, Sequence[str]]


class TensorBackend(Closeable):
    """Computes a checkpoint's tensors, and writes a preview's shard files."""

    def compute(
        self,
        work: CheckpointPass,
        txn: Transaction,
        should_stop: Callable[[], bool],
        on_tensor: Callable[[str, int], None] | None,
    ) -> tuple[dict[str, TensorResult], Partition | None]:
        """Every tracked tensor's result, its sketch (and new anchor) rows written into ``txn``'s
        generation; plus the partition of the files written (None: one file, by ``txn``)."""
        raise NotImplementedError

    def write_preview_files(
        self,
        snapshot: Snapshot,
        base: BaseModel,
        target: int,
        staging: Path,
        files: ShardFiles,
        should_stop: Callable[[], bool],
    ) -> tuple[dict[str, str], int]:
        """Write the preview's shard ``files`` into ``staging``; returns (tensor → file, bytes)."""
        raise NotImplementedError

    def release_buffers(self, idle_for: float = 0.0) -> int:
        """Free the tasks' buffers kept for the next ingest, if none was used in the last
        ``idle_for`` seconds (:class:`~relexd.engine.memory.TaskBuffers`); the bytes freed, here
        or on cluster workers."""
        return 0

    def close(self) -> None:
        pass


class LocalTensors(TensorBackend):
    """This host's worker threads: one sketch file, written by the transaction. ``cached_in_flight``:
    tensors computed at once where the state fits the page cache (None: every worker).
    ``others``: where given (relexd's default worker count), each ingest computes fewer tensors at
    once while other processes keep this process's cores busy (:mod:`relexd.engine.cores`)."""

    def __init__(
        self,
        pool: TensorPool,
        cached_in_flight: int | None = None,
        others: cores.OtherProcesses | None = None,
    ) -> None:
        self.pool = pool
        self.cached_in_flight = cached_in_flight
        self.others = others

    def compute(
        self,
        work: CheckpointPass,
        txn: Transaction,
        should_stop: Callable[[], bool],
        on_tensor: Callable[[str, int], None] | None,
    ) -> tuple[dict[str, TensorResult], Partition | None]:
        work.open_writers(txn, work.base.tracked)
        cap = self.cached_in_flight if work.fits_page_cache and self.cached_in_flight else self.pool.workers
        if self.others is None:
            work.in_flight = cap
            return run_tensors(work, self.pool, work.base.tracked, should_stop, on_tensor, cap), None
        work.others_busy = self.others.busy_cores()
        per_core = 1 if work.fits_page_cache else WORKERS_PER_CORE  # as the default's cap
        work.in_flight = cores.tensors_in_flight(cap, per_core, cores.available_cores(), work.others_busy)
        with self.others.during():
            results = run_tensors(work, self.pool, work.base.tracked, should_stop, on_tensor, work.in_flight)
        return results, None

    def write_preview_files(
        self,
        snapshot: Snapshot,
        base: BaseModel,
        target: int,
        staging: Path,
        files: ShardFiles,
        should_stop: Callable[[], bool],
    ) -> tuple[dict[str, str], int]:
        return write_preview_files(snapshot, base, target, staging, files, should_stop)

    def release_buffers(self, idle_for: float = 0.0) -> int:
        return self.pool.buffers.release(idle_for)

    def close(self) -> None:
        self.pool.close()
