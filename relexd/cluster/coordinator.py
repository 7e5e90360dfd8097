"""The coordinator's side of a partitioned ingest, independent of how workers are reached.

:class:`PartitionedTensors` is the engine's :class:`~relexd.engine.ingest.TensorBackend` for a
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

from relexd.cluster.partition import next_parts
from relexd.cluster.worker import PartJob, PartResult
from relexd.engine.ingest import CheckpointPass, Interrupted, TensorBackend, TensorResult, task_bytes
from relexd.errors import WorkerLost
from relexd.state.store import Partition, Transaction

#: How often the coordinator looks up from waiting (stop requests, liveness, the deadline).
POLL_S = 0.5


class Transport(Protocol):
    """How the coordinator reaches its workers; handles are the transport's own."""

    workers: int

    def submit(self, index: int, job: PartJob) -> Any:
        """Start ``job`` on worker ``index``; returns a handle."""

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

    def compute(
        self,
        work: CheckpointPass,
        txn: Transaction,
        should_stop: Callable[[], bool],
        on_tensor: Callable[[str, int], None] | None,
    ) -> tuple[dict[str, TensorResult], Partition | None]:
        self._wait_for_restarted()
        base = work.base
        sizes = {n: task_bytes(base.reader.info(n).numel, work.config.width) for n in base.tracked}
        previous = work.snapshot.meta.get("partition")
        parts, rebalanced = next_parts(previous, sizes, self.transport.workers)
        if rebalanced and previous:
            self.rebalanced_from = len(previous["parts"])
        attempt = secrets.token_hex(4)  # a new token per try: a late worker of an old try cannot clash
        anchor_dir = str(txn.anchor_dir(work.step)) if work.make_anchor else None
        pending: dict[Any, int] = {}
        for i, names in enumerate(parts):
            job = PartJob(
                str(self.state_dir), work.snapshot.name, txn.name, attempt, i, tuple(names),
                str(work.ckpt.path), work.step, anchor_dir,
            )  # fmt: skip
            pending[self.transport.submit(i, job)] = i
        results: dict[str, TensorResult] = {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready = self.transport.wait(list(pending), POLL_S)
            if should_stop():
                raise Interrupted(f"stopped while the workers computed step {work.step}")
            for handle in ready:
                part = self._collect(handle, pending.pop(handle))
                if part.failure is not None:
                    part.failure.reraise()
                results.update(part.results)
                if on_tensor is not None:
                    for name in part.results:
                        on_tensor(name, base.reader.info(name).numel)
            if not ready and time.monotonic() > deadline:
                hung = sorted(pending.values())
                for i in hung:
                    self.transport.restart(i)
                    self.status[i].up = False
                raise WorkerLost(
                    f"relexd worker(s) {hung} sent no result within {self.timeout_s:.0f} s for step "
                    f"{work.step}; restarted them, the checkpoint will be retried"
                )
        return results, {"attempt": attempt, "parts": parts}

    def _wait_for_restarted(self) -> None:
        """A worker that died or hung is being restarted: send it nothing before it answers."""
        for status in self.status:
            if not status.up:
                status.host, status.pid = self.transport.probe(status.index, self.restart_timeout_s)
                status.up = True
                if self.on_part is not None:
                    self.on_part(status)

    def _collect(self, handle: Any, index: int) -> PartResult:
        status = self.status[index]
        try:
            part = self.transport.result(handle, index)
        except WorkerLost:
            status.up = False
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
