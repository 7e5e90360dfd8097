"""The engine facade: a state directory, a base model, and the two verbs ingest and preview.

The CLI's ``extrapolate`` and the daemon both drive this class; neither touches the state files
directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from relexd._closeable import Closeable
from relexd.engine.backend import LocalTensors, TensorBackend
from relexd.engine.base import BaseModel
from relexd.engine.config import EngineConfig, cached_in_flight, default_workers
from relexd.engine.cores import OtherProcesses
from relexd.engine.ingest import IngestReport, ingest
from relexd.engine.memory import pin_mmap_threshold
from relexd.engine.pool import TensorPool
from relexd.engine.preview import write_preview
from relexd.errors import StateError
from relexd.io.names import match_names
from relexd.io.reader import WeightReader, open_weights
from relexd.math import kernels
from relexd.state.store import Snapshot, StateStore


@contextlib.contextmanager
def open_checkpoint(weights: Path, base: BaseModel) -> Iterator[WeightReader]:
    """A checkpoint's weights under the base's tensor names (FSDP/PEFT prefixes mapped)."""
    with open_weights(weights) as stored:
        yield stored.renamed(match_names(stored.names(), base.names, stored.path))


class Engine(Closeable):
    """Owns one state directory (exclusively, by lock) and the base model θ₀."""

    def __init__(
        self,
        state_dir: Path,
        base_path: Path,
        config: EngineConfig,
        *,
        threads: int | None = 1,
        memory_budget: int | None = None,
        backend: TensorBackend | None = None,
        spare_sketch: bool = True,
    ) -> None:
        """``threads``: worker threads, each computing one tensor at a time on one core
        (:mod:`relexd.engine.pool`); None: relexd's default, :func:`default_workers` threads of
        which :func:`cached_in_flight` compute at once where the state fits the page cache, fewer
        while other processes keep the cores busy (:mod:`relexd.engine.cores`);
        ``memory_budget``: bytes the tensors in flight may hold; ``backend``: where tensors are
        computed instead (a cluster's workers, which have their own threads and budget; the engine
        closes it); ``spare_sketch``: overwrite the replaced generation's sketch file in place
        instead of a new one (:mod:`relexd.state.store`; cluster workers write part files, which
        are not recycled). None of them changes the results."""
        pin_mmap_threshold()
        local = backend is None
        if backend is None:
            pool = TensorPool(default_workers() if threads is None else threads, memory_budget)
            if threads is None:
                backend = LocalTensors(pool, cached_in_flight(), OtherProcesses())
            else:
                backend = LocalTensors(pool)
        self.backend = backend
        self._use_threads()
        self.state_dir = Path(state_dir)
        self.config = config
        self.store = StateStore(self.state_dir, spare=spare_sketch and local)
        self.snapshot: Snapshot = self.store.open()
        try:
            self.base = BaseModel.load(Path(base_path))
            self._check_state_matches()
            reader = self.base.reader
            kernels.prepare({reader.info(n).dtype for n in self.base.tracked}, config.anchor_torch_dtype)
        except BaseException:
            self.store.close()
            self.backend.close()
            raise

    def _check_state_matches(self) -> None:
        fingerprint = self.base.fingerprint()
        meta = self.snapshot.meta
        if not meta:  # a fresh state: remember what it is built on
            self.snapshot.meta = {
                "base": {"path": str(self.base.path), "fingerprint": fingerprint},
                "config": self.config.as_dict(),
            }
            return
        stored = meta.get("base", {}).get("fingerprint")
        if stored != fingerprint:
            raise StateError(
                f"{self.state_dir}: this state was built on a different base model "
                f"({meta.get('base', {}).get('path')}) than {self.base.path} "
                "(names, shapes, dtypes or content differ); use a new --state-dir for a new base"
            )
        old = EngineConfig.from_dict(meta["config"])
        if old.structural() != self.config.structural():
            raise StateError(
                f"{self.state_dir}: this state uses estimator {old.estimator} with {old.width} "
                f"column(s) per tensor; cannot continue it as {self.config.estimator} with "
                f"{self.config.width}; use a new --state-dir"
            )

    @staticmethod
    def _use_threads() -> None:
        """One torch thread in the calling thread too (previews, small sums). torch's setting
        reaches the BLAS/OpenMP layer per OS thread: a thread that never set it computes with the
        default (every core) — other speed, and float32 sums in another order (measured: a daemon
        worker thread and the main thread gave results differing in the last bits). So every
        entry point sets it."""
        torch.set_num_threads(1)

    @property
    def steps(self) -> list[int]:
        return list(self.snapshot.meta.get("steps", []))

    def ingest(
        self,
        weights: Path,
        step: int,
        *,
        source: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_tensor: Callable[[str, int], None] | None = None,
    ) -> IngestReport:
        """Validate and fold one checkpoint in; on any error the state is unchanged."""
        self._use_threads()
        with open_checkpoint(weights, self.base) as ckpt:
            report = ingest(
                self.store,
                self.snapshot,
                self.base,
                ckpt,
                step,
                self.config,
                backend=self.backend,
                source=source,
                should_stop=should_stop,
                on_tensor=on_tensor,
            )
        self.snapshot = report.snapshot
        return report

    def write_preview(
        self, target: int, out_dir: Path, *, should_stop: Callable[[], bool] = lambda: False
    ) -> Path:
        self._use_threads()
        return write_preview(
            self.snapshot, self.base, target, Path(out_dir), should_stop=should_stop, backend=self.backend
        )

    def release_buffers(self, idle_for: float = 0.0) -> int:
        """Free the buffers kept for the next ingest (:class:`~relexd.engine.memory.TaskBuffers`:
        at most what one ingest's tasks in flight hold) if no ingest used them in the last
        ``idle_for`` seconds; the bytes freed."""
        return self.backend.release_buffers(idle_for)

    def summary(self) -> dict[str, Any]:
        meta = self.snapshot.meta
        return {
            "steps": meta.get("steps", []),
            "figures": meta.get("figures", {}),
            "forecasts": meta.get("forecasts", []),
            "per_tensor": meta.get("per_tensor", {}),
        }

    def close(self) -> None:
        self.backend.close()
        self.base.close()
        self.store.close()
