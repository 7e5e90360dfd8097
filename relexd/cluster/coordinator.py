"""The coordinator's side of a partitioned ingest, independent of how workers are reached.

:class:`PartitionedTensors` is the engine's :class:`~relexd.engine.backend.TensorBackend` for a
cluster: it splits the tracked tensors into parts (:mod:`relexd.cluster.partition`), makes the new
anchor's directory, sends each worker its :class:`~relexd.cluster.worker.PartJob` through a
:class:`Transport`, and waits — polling ``should_stop`` (shutdown, liveness beats) — until every
part has come back. The engine then combines the per-tensor results in tensor order and commits:
the figures, forecasts and meta are computed exactly as on one host, from the same numbers.

Transports: :class:`relexd.cluster.ray_backend.RayTransport` (Ray actors); the tests add an
in-process one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from relexd.cluster.partition import balance, next_parts
from relexd.cluster.worker import Job, PartJob, PartResult, PreviewJob, ReleaseJob
from relexd.engine.backend import ShardFiles, TensorBackend
from relexd.engine.base import BaseModel
from relexd.engine.ingest import CheckpointPass, Interrupted, TensorResult
from relexd.engine.preview import shard_bytes
from relexd.errors import WorkerLost
from relexd.state.store import Partition, Snapshot, Transaction

#: How often the coordinator looks up from waiting (stop requests, liveness, the deadline).
POLL_S = 0.5
#: How long the coordinator waits for the workers to free their kept buffers
#: (:meth:`PartitionedTensors.release_buffers`): milliseconds for a worker that is well, and short
#: against any watchdog, since the daemon's work loop beats only between its rounds.
RELEASE_WAIT_S = 10.0


class Transport(Protocol):
    """How the coordinator reaches its workers; handles are the transport's own."""

    workers: int

    def submit(self, index: int, job: Job) -> Any:
        """Start ``job`` on worker ``index`` (:meth:`PartWorker.run`); returns a handle."""

    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        """The handles (some of ``handles``) that have finished, waiting at most ``timeout`` s."""

    def result(self, handle: Any, index: int) -> PartResult:
        """The finished part; raises :class:`~relexd.errors.WorkerLost` if its worker died."""

    def restart(self, index: int) -> None:
        """Kill worker ``index`` (hung) and have it restarted."""

    def probe(self, index: int, timeout: float) -> tuple[str, int]:
        """Worker ``index``'s (host, pid) once it answers; raises
        :class:`~relexd.errors.WorkerLost` if it does not within ``timeout`` s (still restarting)."""

    def close(self) -> None: ...


@dataclass
class WorkerStatus:
    """What the daemon shows of one worker (``relexd status``, the cluster metrics)."""

    index: int
    up: bool = True
    host: str = ""
    pid: int = 0
    last_seconds: float | None = None


class PartitionedTensors(TensorBackend):
    """Computes each checkpoint's tensors in ``transport.workers`` parts, one per worker."""

    def __init__(
        self,
        transport: Transport,
        state_dir: Path,
        *,
        timeout_s: float = 900.0,
        restart_timeout_s: float = 120.0,
        on_part: Callable[[WorkerStatus], None] | None = None,
    ) -> None:
        self.transport = transport
        self.state_dir = Path(state_dir)
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.on_part = on_part
        self.status = [WorkerStatus(i) for i in range(transport.workers)]
        self.rebalanced_from: int | None = None  # the previous worker count, after a rebalance
        #: when the workers last computed an ingest's parts (:func:`time.monotonic`); None once
        #: they were told to free the buffers kept from it (:meth:`release_buffers`)
        self._computed_at: float | None = None

    def compute(
        self,
        work: CheckpointPass,
        txn: Transaction,
        should_stop: Callable[[], bool],
        on_tensor: Callable[[str, int], None] | None,
    ) -> tuple[dict[str, TensorResult], Partition | None]:
        self._wait_for_restarted()
        base = work.base
        sizes = {n: io_bytes(base, n, work.config.width) for n in base.tracked}
        previous = work.snapshot.meta.get("partition")
        parts, rebalanced = next_parts(previous, sizes, self.transport.workers)
        if rebalanced and previous:
            self.rebalanced_from = len(previous["parts"])
        attempt = secrets.token_hex(4)  # a new token per try: a late worker of an old try cannot clash
        anchor_dir = str(txn.anchor_dir(work.step)) if work.make_anchor else None
        state, weights, parent = str(self.state_dir), str(work.ckpt.path), work.snapshot.name
        jobs = [
            PartJob(state, parent, txn.name, attempt, i, tuple(names), weights, work.step, anchor_dir)
            for i, names in enumerate(parts)
        ]
        results: dict[str, TensorResult] = {}

        def collected(part: PartResult) -> None:
            results.update(part.results)
            if on_tensor is not None:
                for name in part.results:
                    on_tensor(name, base.reader.info(name).numel)

        try:
            self._run(jobs, collected, should_stop, f"step {work.step}")
        finally:  # a failed try may have left buffers kept too
            self._computed_at = time.monotonic()
        return results, {"attempt": attempt, "parts": parts}

    def write_preview_files(
        self,
        snapshot: Snapshot,
        base: BaseModel,
        target: int,
        staging: Path,
        files: ShardFiles,
        should_stop: Callable[[], bool],
    ) -> tuple[dict[str, str], int]:
        """Each worker writes whole shard files (balanced by bytes) into the staging directory."""
        self._wait_for_restarted()
        sizes = {f: shard_bytes(snapshot.meta, names) for f, names in files.items()}
        shares = [p for p in balance(sizes, self.transport.workers) if p]
        state = str(self.state_dir)
        jobs = [
            PreviewJob(state, snapshot.name, i, target, str(staging), {f: tuple(files[f]) for f in share})
            for i, share in enumerate(shares)
        ]
        weight_map: dict[str, str] = {}
        total = [0]

        def collected(part: PartResult) -> None:
            weight_map.update(part.written)
            total[0] += part.nbytes

        self._run(jobs, collected, should_stop, f"the preview for step {target}")
        return weight_map, total[0]

    def release_buffers(self, idle_for: float = 0.0) -> int:
        """Have every worker that is up free the buffers it keeps for the next ingest, once the
        workers have computed nothing for ``idle_for`` seconds; the bytes the workers freed.

        Sent once per idle spell, not at every call: the daemon asks each time it finds nothing to
        ingest. Not a part: it changes no worker's part time (the metric of the workers' speed).
        A worker that is down is skipped (its restart freed its memory); one lost now is marked
        down, to be probed before the next ingest, as after a lost part. One that fails, or does
        not answer within :data:`RELEASE_WAIT_S` (its next part waits behind the release; a hung
        one is found then), frees nothing that counts."""
        if self._computed_at is None or time.monotonic() - self._computed_at < idle_for:
            return 0
        self._computed_at = None
        up = [w.index for w in self.status if w.up]
        pending = {self.transport.submit(i, ReleaseJob(i, idle_for)): i for i in up}
        freed = 0
        deadline = time.monotonic() + RELEASE_WAIT_S
        while pending and time.monotonic() < deadline:
            for handle in self.transport.wait(list(pending), POLL_S):
                index = pending.pop(handle)
                try:
                    part = self.transport.result(handle, index)
                except WorkerLost:
                    self._mark_down(self.status[index])
                    continue
                freed += part.nbytes if part.failure is None else 0
        return freed

    def _run(
        self,
        jobs: Sequence[Job],
        collected: Callable[[PartResult], None],
        should_stop: Callable[[], bool],
        what: str,
    ) -> None:
        """Send job i to worker i and hand each part to ``collected`` as it comes back; the first
        failure, a lost worker or the deadline raises (the caller abandons what was written)."""
        pending = {self.transport.submit(job.index, job): job.index for job in jobs}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready = self.transport.wait(list(pending), POLL_S)
            if should_stop():
                raise Interrupted(f"stopped while the workers computed {what}")
            for handle in ready:
                part = self._collect(handle, pending.pop(handle))
                if part.failure is not None:
                    part.failure.reraise()
                collected(part)
            if not ready and time.monotonic() > deadline:
                hung = sorted(pending.values())
                for i in hung:
                    self.transport.restart(i)
                    self._mark_down(self.status[i])
                raise WorkerLost(
                    f"relexd worker(s) {hung} sent no result within {self.timeout_s:.0f} s for {what}; "
                    "restarted them, it will be retried"
                )

    def _wait_for_restarted(self) -> None:
        """A worker that died or hung is being restarted: send it nothing before it answers."""
        for status in self.status:
            if not status.up:
                status.host, status.pid = self.transport.probe(status.index, self.restart_timeout_s)
                status.up = True
                if self.on_part is not None:
                    self.on_part(status)

    def _mark_down(self, status: WorkerStatus) -> None:
        """Lost (dead or hung): down until it answers again; no part time to report."""
        status.up, status.last_seconds = False, None
        if self.on_part is not None:
            self.on_part(status)

    def _collect(self, handle: Any, index: int) -> PartResult:
        status = self.status[index]
        try:
            part = self.transport.result(handle, index)
        except WorkerLost:
            self._mark_down(status)
            raise
        status.up, status.host, status.pid = True, part.host, part.pid
        status.last_seconds = part.seconds if part.failure is None else None
        if self.on_part is not None:
            self.on_part(status)
        return part

    def describe(self) -> dict[str, Any]:
        """The workers as plain data (``cluster.json``, ``relexd status``)."""
        return {
            "workers": [asdict(w) for w in self.status],
            "up": sum(w.up for w in self.status),
            "rebalanced_from": self.rebalanced_from,
            "time": time.time(),
        }

    def close(self) -> None:
        self.transport.close()


def io_bytes(base: BaseModel, name: str, width: int) -> int:
    """What one checkpoint costs a worker for tensor ``name``: the checkpoint's and the base's
    values read (both taken in the base's dtype), the old sketch read and the new one written
    (``width`` float32 columns each) — the bytes the split balances."""
    info = base.reader.info(name)
    return info.numel * (2 * info.dtype.itemsize + 2 * 4 * width)
