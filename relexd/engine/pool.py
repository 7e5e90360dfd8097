"""A pool of worker threads that computes one tensor per task, each task on one core.

Why threads: the work per tensor is torch kernels and ``pread``/``pwrite``, which all release the
GIL, so threads use every core without the copies a process pool would need. Why one torch thread
per worker rather than one task with many torch threads: every tensor's kernels are small
(a few MB per chunk), and a multi-threaded kernel waits for all of its threads to be scheduled —
beside a trainer that keeps the cores busy that made it 10–100× slower (bench/README.md) — while
independent single-threaded tasks each progress whenever they get a core.

Tasks start largest first (longest-processing-time-first scheduling: the big embedding does not
start last and run alone) and only while the tensors in flight fit the memory budget. The one
exception are the caller's ``fillers``: tasks whose time is mostly the fixed Python work of a task
(a model's hundreds of biases and norms), which holds the GIL. Started last, as their size says,
they ran on both cores of a 0.5B ingest at once, contending for the GIL, with half the cores idle
for its last 0.3 s; they start right after the largest task instead, and run while it computes
without the GIL (:func:`fillers_first`). Not spread between the large tasks: a worker alternating
between a large and a small tensor gives its large buffers back and faults them in again each
time (0.47 s more system time per 0.5B rank-1 ingest:
bench/results/full/page-cache-0.5b-r1-fillers-interleaved.md). The caller's ``serial`` tasks
(the smallest fillers, nearly all Python) run one at a time: two of them at once only pass the GIL
back and forth (~120 futex calls per tensor), and a model of such tensors alone (a LoRA adapter, a
model shrunk to its fixed costs) was ingested 1.2–1.5× faster on one worker than on two
(bench/README.md, 7 Dec, night); beside a large task that runs without the GIL, one at a time loses
nothing. Tasks of equal cost (a model's many
same-shaped layers) start in the caller's order, or reversed (``reverse_ties``): the engine
alternates the two from one checkpoint to the next, for the page cache's sake (see
:func:`relexd.engine.ingest.run_tensors`). Results are
handed back by name: the caller combines them in its own fixed order, so nothing it computes
depends on how many workers there were or which finished first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from relexd._closeable import Closeable
from relexd.engine.memory import TaskBuffers

R = TypeVar("R")


class Cancelled(Exception):
    """Raised by a task that saw the pool abort (another task failed); never reported itself."""


class Cutoff:
    """A task's ``abort``: set once a task before this one in order has failed (or the caller
    stopped the run)."""

    def __init__(self, run: _Run, index: int) -> None:
        self._run, self._index = run, index

    def is_set(self) -> bool:
        return self._index > self._run.first_failure


class _Run:
    def __init__(self, count: int) -> None:
        self.first_failure = count  # index of the earliest failed task so far (count: none)


class TensorPool(Closeable):
    """``workers`` threads; ``memory_budget`` bytes caps the summed cost of the tasks in flight
    (a task that alone exceeds it still runs, alone). :attr:`buffers` are the tasks' large buffers,
    kept with the pool from one run to the next (:class:`~relexd.engine.memory.TaskBuffers`)."""

    def __init__(self, workers: int, memory_budget: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, not {workers}")
        self.workers = workers
        self.memory_budget = memory_budget
        self.buffers = TaskBuffers()
        self._executor: ThreadPoolExecutor | None = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.workers,
                thread_name_prefix="relexd-tensor",
                # torch's thread count is per OS thread: set it in each worker
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        return self._executor

    def run(
        self,
        costs: Mapping[str, int],
        task: Callable[[str, Cutoff], R],
        on_done: Callable[[str, R], None] | None = None,
        *,
        reverse_ties: bool = False,
        in_flight: int | None = None,
        fillers: Collection[str] = (),
        serial: Collection[str] = (),
    ) -> dict[str, R]:
        """Run ``task(name, abort)`` for every name of ``costs`` (name → bytes it holds while
        running); returns name → result.

        When a task raises, the tasks after it in ``costs`` order are not started, or see
        ``abort.is_set()`` and stop early by raising :class:`Cancelled`; those before it still run,
        so the error raised in the end is the one of the earliest failing name — the one a
        sequential run would have met, whichever worker failed first. ``on_done`` runs in the
        calling thread as each task completes. ``reverse_ties`` starts tasks of equal cost in
        reverse order (which error is raised does not change). ``in_flight`` runs at most that many
        tasks at once in this run (at most :attr:`workers` in any case). ``fillers`` start right
        after the largest task rather than by their cost (:func:`fillers_first`). A ``serial`` task
        starts only while no other ``serial`` task runs (others start beside it).
        """
        index = {name: i for i, name in enumerate(costs)}
        tie = -1 if reverse_ties else 1
        waiting = fillers_first(sorted(costs, key=lambda n: (-costs[n], tie * index[n])), fillers)
        state = _Run(len(index))
        results: dict[str, R] = {}
        errors: dict[str, BaseException] = {}
        running: dict[Future[R], str] = {}
        held = 0
        limit = self.workers if in_flight is None else max(1, min(in_flight, self.workers))
        try:
            while waiting or running:
                waiting = [n for n in waiting if index[n] < state.first_failure]
                while waiting and len(running) < limit:
                    skip = serial if any(n in serial for n in running.values()) else ()
                    name = self._next_fitting(waiting, costs, held, bool(running), skip)
                    if name is None:
                        break
                    waiting.remove(name)
                    held += costs[name]
                    running[self._pool().submit(task, name, Cutoff(state, index[name]))] = name
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    held -= costs[name]
                    exc = future.exception()
                    if exc is None:
                        results[name] = future.result()
                        if on_done is not None:
                            on_done(name, results[name])
                    elif not isinstance(exc, Cancelled):
                        errors[name] = exc
                        state.first_failure = min(state.first_failure, index[name])
        except BaseException:
            state.first_failure = -1  # e.g. KeyboardInterrupt in the caller: stop every worker
            wait(running)
            raise
        if errors:
            raise errors[min(errors, key=index.__getitem__)]
        return results

    def _next_fitting(
        self, waiting: list[str], costs: Mapping[str, int], held: int, busy: bool, skip: Collection[str] = ()
    ) -> str | None:
        """The first waiting task not in ``skip`` that fits the budget next to those running (any,
        when idle)."""
        for name in waiting:
            if name in skip:
                continue
            if self.memory_budget is None or not busy or held + costs[name] <= self.memory_budget:
                return name
        return None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.buffers.release()


def fillers_first(ordered: Sequence[str], fillers: Collection[str]) -> list[str]:
    """``ordered`` with its ``fillers`` moved to right after the first name that is none, each
    group keeping its own order."""
    heavy = [n for n in ordered if n not in fillers]
    light = [n for n in ordered if n in fillers]
    return heavy[:1] + light + heavy[1:]
