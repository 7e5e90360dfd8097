"""One cluster worker's share of an ingest: plain Python, so it runs (and is tested) without Ray.

A worker holds the base model and a :class:`~relexd.engine.pool.TensorPool` (and the buffers its
tasks keep for the next checkpoint, until a :class:`ReleaseJob` frees them) across checkpoints. For
each checkpoint the coordinator sends a :class:`PartJob`: which published generation to build on,
the new generation's directory and attempt token, and the worker's tensors. The worker reads the
published state itself from the shared state directory (and refuses a job built on another
generation than the one it finds), computes its tensors with the same code as a single host
(:func:`~relexd.engine.ingest.run_tensors`), writes and fsyncs its part files, and hands back the
per-tensor results — small arrays and figures — for the coordinator to combine in tensor order.

Failures come back as a :class:`Failure` value, not as a raised exception, so the coordinator can
raise the very error a single host would have raised (a :class:`~relexd.errors.CheckpointError`
with its reason, an ``OSError`` with its errno and file name), whatever the transport does to
exception types.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from relexd.engine.base import BaseModel
from relexd.engine.config import EngineConfig
from relexd.engine.engine import open_checkpoint
from relexd.engine.ingest import CheckpointPass, Interrupted, TensorResult, run_tensors
from relexd.engine.pool import TensorPool
from relexd.engine.preview import write_preview_files
from relexd.errors import REASONS, CheckpointError, RelexdError, StateError
from relexd.state.store import PartWriters, Snapshot, StateWriteError, read_snapshot


@dataclass(frozen=True)
class PartJob:
    """One worker's share of one checkpoint."""

    state_dir: str
    parent: str | None  # the published generation the coordinator builds on
    generation: str  # the new generation's directory name (made by the coordinator)
    attempt: str
    index: int
    tensors: tuple[str, ...]
    weights: str  # the checkpoint's weights on the shared file system
    step: int
    anchor_dir: str | None  # the new anchor's directory, when this checkpoint makes one


@dataclass(frozen=True)
class PreviewJob:
    """One worker's share of a preview: whole shard files, written into the staging directory."""

    state_dir: str
    generation: str | None  # the published generation the preview is made from
    index: int
    target: int
    staging: str
    files: dict[str, tuple[str, ...]]  # source shard file name → its tensors


@dataclass(frozen=True)
class ReleaseJob:
    """Free the buffers the worker keeps for its next part (its pool's
    :class:`~relexd.engine.memory.TaskBuffers`) if none was used in the last ``idle_for`` seconds:
    the daemon's idle release (``buffer_idle_s``), sent on by the coordinator."""

    index: int
    idle_for: float


#: What the coordinator sends a worker.
Job = PartJob | PreviewJob | ReleaseJob


@dataclass(frozen=True)
class Failure:
    """An error of a worker, as data: enough to raise the same error in the coordinator."""

    kind: str  # "checkpoint", "os", "state_write", "state", "interrupted", "other"
    message: str
    path: str | None = None
    reason: str | None = None
    errno: int | None = None

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, CheckpointError):
            return cls("checkpoint", exc.message, str(exc.path), exc.reason)
        if isinstance(exc, StateWriteError):
            return cls("state_write", str(exc))
        if isinstance(exc, Interrupted):
            return cls("interrupted", str(exc))
        if isinstance(exc, StateError):
            return cls("state", str(exc))
        if isinstance(exc, OSError):
            return cls("os", exc.strerror or str(exc), exc.filename, errno=exc.errno)
        return cls("other", f"{type(exc).__name__}: {exc}")

    def reraise(self) -> NoReturn:
        if self.kind == "checkpoint" and self.reason in REASONS:
            raise CheckpointError(self.path or "?", self.reason, self.message)
        if self.kind == "state_write":
            raise StateWriteError(self.message)
        if self.kind == "interrupted":
            raise Interrupted(self.message)
        if self.kind == "state":
            raise StateError(self.message)
        if self.kind == "os":
            code = self.errno or errno.EIO
            raise OSError(code, self.message, self.path) if self.path else OSError(code, self.message)
        raise RelexdError(f"cluster worker failed: {self.message}")


@dataclass
class PartResult:
    """What a worker hands back: its tensors' results, or the failure that stopped it."""

    index: int
    results: dict[str, TensorResult] = field(default_factory=dict)  # an ingest part's tensors
    written: dict[str, str] = field(default_factory=dict)  # a preview part's tensor → file
    nbytes: int = 0  # a preview part's bytes written; a release's bytes freed
    failure: Failure | None = None
    seconds: float = 0.0
    host: str = ""
    pid: int = 0


class PartWorker:
    """The state a worker keeps between checkpoints: the base model and its thread pool."""

    def __init__(
        self, base_path: str, config: EngineConfig, threads: int = 1, memory_budget: int | None = None
    ) -> None:
        torch.set_num_threads(1)  # as in the engine: per OS thread, results must not depend on it
        self.base_path = Path(base_path)
        self.config = config
        self.pool = TensorPool(threads, memory_budget)
        self._base: BaseModel | None = None

    def base(self) -> BaseModel:
        if self._base is None:
            self._base = BaseModel.load(self.base_path)
        return self._base

    def identity(self) -> tuple[str, int]:
        return socket.gethostname(), os.getpid()

    def run(self, job: Job) -> PartResult:
        """Do one job; every failure comes back as data (see the module docstring)."""
        started = time.monotonic()
        host, pid = self.identity()
        part = PartResult(job.index, host=host, pid=pid)
        try:
            if isinstance(job, PartJob):
                part.results = self._ingest(job)
            elif isinstance(job, ReleaseJob):
                part.nbytes = self.pool.buffers.release(job.idle_for)
            else:
                part.written, part.nbytes = self._preview(job)
        except Exception as exc:
            part.failure = Failure.of(exc)
            return part
        part.seconds = time.monotonic() - started
        return part

    def _preview(self, job: PreviewJob) -> tuple[dict[str, str], int]:
        snapshot = _published(Path(job.state_dir), job.generation)
        return write_preview_files(snapshot, self.base(), job.target, Path(job.staging), job.files)

    def _ingest(self, job: PartJob) -> dict[str, TensorResult]:
        state = Path(job.state_dir)
        snapshot = _published(state, job.parent)
        base = self.base()
        with open_checkpoint(Path(job.weights), base) as ckpt:
            work = CheckpointPass(snapshot, base, ckpt, job.step, self.config)
            writers = PartWriters(
                state / "generations" / job.generation,
                Path(job.anchor_dir) if job.anchor_dir else None,
                job.attempt,
                job.index,
            )
            try:
                work.open_writers(writers, job.tensors)
                results = run_tensors(work, self.pool, job.tensors, lambda: False)
                writers.close()  # fsync'd: the coordinator may publish once every part says so
            except BaseException:
                writers.abort()
                raise
            finally:
                work.close()
        return results

    def close(self) -> None:
        self.pool.close()
        if self._base is not None:
            self._base.close()


def _published(state: Path, expected: str | None) -> Snapshot:
    """The published state, which must be the generation the coordinator works from."""
    snapshot = read_snapshot(state)
    if snapshot.name != expected:
        raise StateError(
            f"{state}: the published generation is {snapshot.name}, the coordinator works from "
            f"{expected}; is another relexd writing this state?"
        )
    return snapshot
