"""A Transport that runs each worker's part at once, in this process: the coordinator's logic
without Ray (tests/cluster/test_ray.py runs the same through real Ray actors)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from relexd.cluster.worker import Job, PartResult, PartWorker
from relexd.engine.config import EngineConfig
from relexd.errors import WorkerLost


class InProcess:
    def __init__(self, base: Path, config: EngineConfig, workers: int) -> None:
        self.workers = workers
        self.parts = [PartWorker(str(base), config) for _ in range(workers)]
        self._done: dict[int, PartResult | None] = {}
        self._worker: dict[int, int] = {}  # handle → worker
        self._ids = itertools.count()
        #: called with (index, job) before a part runs; may raise WorkerLost, or return True to
        #: have the part "die" after it ran (files written, result lost)
        self.before: Callable[[int, Job], bool] | None = None
        self.restarted: list[int] = []
        self.hung: set[int] = set()  # workers whose parts never come back

    def submit(self, index: int, job: Job) -> int:
        handle = next(self._ids)
        self._worker[handle] = index
        lose = self.before(index, job) if self.before else False
        result = self.parts[index].run(job)
        self._done[handle] = None if lose else result
        return handle

    def wait(self, handles: Sequence[int], timeout: float) -> list[int]:
        ready = [h for h in handles if self._worker[h] not in self.hung]
        if not ready:
            time.sleep(timeout)
        return ready

    def result(self, handle: int, index: int) -> PartResult:
        result = self._done.pop(handle)
        if result is None:
            raise WorkerLost(f"worker {index} lost (test)")
        return result

    def restart(self, index: int) -> None:
        self.restarted.append(index)

    def probe(self, index: int, timeout: float) -> tuple[str, int]:
        return self.parts[index].identity()

    def close(self) -> None:
        for part in self.parts:
            part.close()
