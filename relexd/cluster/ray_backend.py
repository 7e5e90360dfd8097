"""Workers as Ray actors: the :class:`~relexd.cluster.coordinator.Transport` for a Ray cluster.

Facts relied on (Ray 2.x documentation, "Actors", "Actor fault tolerance", "Scheduling"):

* ``ray.init(address="auto")`` joins the running cluster of this node; an address joins that one.
* An actor created with ``max_restarts=-1`` is restarted by Ray whenever its process dies; a call
  in flight on it then raises ``RayActorError``. ``max_task_retries=0``: a call is never re-run
  behind the coordinator's back — the coordinator abandons the whole generation and retries it.
* ``ray.kill(actor, no_restart=False)`` kills a hung actor's process and lets Ray restart it.
* ``scheduling_strategy="SPREAD"`` places the actors over as many nodes as it can.

This is the only relexd module that imports ``ray`` (the ``relexd[ray]`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("relexd --ray needs the ray extra: pip install 'relexd[ray]'") from exc

from relexd.cluster.coordinator import PartitionedTensors
from relexd.cluster.worker import Job, PartResult, PartWorker
from relexd.engine.config import EngineConfig
from relexd.errors import ConfigError, WorkerLost


@dataclass(frozen=True)
class ClusterSettings:
    address: str = "auto"  # "auto": the cluster of this node; else a Ray address
    workers: int = 2
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    memory_budget: int | None = None  # per worker, bytes
    timeout_s: float = 900.0  # one part taking longer than this counts as a hung worker
    start_timeout_s: float = 120.0  # to place every worker at start


class RayTransport:
    """``settings.workers`` :class:`~relexd.cluster.worker.PartWorker` actors, spread over the
    cluster; creating it waits until every one is placed (or says why not)."""

    def __init__(self, settings: ClusterSettings, base_path: Path, config: EngineConfig) -> None:
        if settings.workers < 1:
            raise ConfigError("--ray-workers must be ≥ 1")
        self.settings = settings
        self.workers = settings.workers
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=settings.address, namespace="relexd", log_to_driver=False)
        remote = ray.remote(PartWorker).options(
            num_cpus=settings.cpus_per_worker,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        self.actors = [
            remote.remote(str(base_path), config, settings.threads_per_worker, settings.memory_budget)
            for _ in range(settings.workers)
        ]
        self.placed: list[tuple[str, int]] = self._wait_until_placed()

    def _wait_until_placed(self) -> list[tuple[str, int]]:
        refs = [actor.identity.remote() for actor in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.settings.start_timeout_s)
        if pending:
            self.close()
            raise ConfigError(
                f"only {len(ready)} of {len(refs)} relexd workers could be placed on the Ray cluster "
                f"within {self.settings.start_timeout_s:.0f} s ({self.settings.cpus_per_worker} CPUs "
                "each); lower --ray-workers or --ray-cpus-per-worker, or add nodes"
            )
        return [ray.get(ref) for ref in refs]

    def submit(self, index: int, job: Job) -> Any:
        return self.actors[index].run.remote(job)

    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        ready, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        return ready

    def result(self, handle: Any, index: int) -> PartResult:
        try:
            return ray.get(handle)
        except RayActorError as exc:
            raise WorkerLost(
                f"relexd worker {index} died ({exc.__class__.__name__}); Ray restarts it, "
                "the checkpoint will be retried"
            ) from exc

    def restart(self, index: int) -> None:
        ray.kill(self.actors[index], no_restart=False)

    def probe(self, index: int, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(
                    self.actors[index].identity.remote(), timeout=max(0.1, deadline - time.monotonic())
                )
            except (RayActorError, GetTimeoutError) as exc:  # ActorUnavailableError: restarting
                if time.monotonic() >= deadline:
                    raise WorkerLost(
                        f"relexd worker {index} is not back after {timeout:.0f} s "
                        f"({exc.__class__.__name__}); the checkpoint will be retried"
                    ) from exc
                time.sleep(0.5)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def ray_tensors(
    settings: ClusterSettings, base_path: Path, config: EngineConfig, state_dir: Path, **kw: Any
) -> PartitionedTensors:
    """The engine backend for ``relexd watch --ray``."""
    transport = RayTransport(settings, base_path, config)
    backend = PartitionedTensors(transport, state_dir, timeout_s=settings.timeout_s, **kw)
    for status, (host, pid) in zip(backend.status, transport.placed, strict=True):
        status.host, status.pid = host, pid
    return backend


__all__ = ["ClusterSettings", "RayTransport", "ray_tensors"]
