"""What the engine computes: estimator, sketch rank, fit window, forecast horizons."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from relexd.engine.cores import available_cores
from relexd.errors import ConfigError
from relexd.math.sketch import ESTIMATORS, OJA_DEFAULT_ETA

#: Default sketch rank of Brand's estimator; bench/README.md ("Accuracy") has the measurements
#: behind it: every rank keeps the direction within |cos| ≥ 0.9999 of batch SVD at batch energy ≥ 0.9,
#: but with random-walk noise the rank-1 preview is 7.7 % off the batch preview, rank 2 only 1.0 %,
#: for 4 more bytes of state per parameter.
DEFAULT_RANK = 2

ANCHOR_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    estimator: str = "brand"
    rank: int = DEFAULT_RANK
    window: int | None = None
    horizons: tuple[float, ...] = (2.0,)
    anchor_dtype: str = "bfloat16"
    oja_eta: float = OJA_DEFAULT_ETA
    #: Ingest a checkpoint only when its step is at least this far after the last ingested one
    #: (``--every``): a deliberate, recorded thinning for trainers that save faster than relexd reads.
    every: int = 1

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {self.estimator!r}")
        if self.rank < 1:
            raise ConfigError(f"sketch rank must be ≥ 1, not {self.rank}")
        if self.window is not None and self.window < 2:
            raise ConfigError(f"fit window must be ≥ 2 checkpoints, not {self.window}")
        if not self.horizons or any(h <= 1.0 for h in self.horizons):
            raise ConfigError(f"forecast horizons must be > 1 (e.g. 2), not {list(self.horizons)}")
        if self.anchor_dtype not in ANCHOR_DTYPES:
            raise ConfigError(f"anchor dtype must be one of {', '.join(ANCHOR_DTYPES)}")
        if self.every < 1:
            raise ConfigError(f"--every must be ≥ 1 step, not {self.every}")

    def takes(self, step: int, last: int | None) -> bool:
        """Whether a checkpoint at ``step`` is ingested after one at ``last`` (``--every``)."""
        return last is None or step - last >= self.every

    @property
    def width(self) -> int:
        """Columns of the per-tensor state array: k for Brand's sketch, one vector for Oja."""
        return self.rank if self.estimator == "brand" else 1

    @property
    def anchor_torch_dtype(self) -> torch.dtype:
        return ANCHOR_DTYPES[self.anchor_dtype]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["horizons"] = list(self.horizons)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        d = dict(d)
        d["horizons"] = tuple(d.get("horizons", (2.0,)))
        d.setdefault("every", 1)  # states written before --every existed
        return cls(**d)

    def structural(self) -> tuple[str, int]:
        """What cannot change over a state's life (the stored arrays depend on it)."""
        return (self.estimator, self.width)


#: worker threads per core the default takes: a task waiting for the disk leaves its core idle,
#: and a second task per core fills it. Measured on 2 cores (bench/README.md, "4 Dec"): at 1.5B,
#: whose state outgrows the page cache, 4 workers took 18.4 s against 25.1 s for 2. Where the state
#: fits the page cache nothing waits for the disk, and the default runs one task per core
#: (:func:`cached_in_flight`).
WORKERS_PER_CORE = 2
#: the most worker threads the default takes: measured on a 16-core host (bench/README.md, "16
#: cores"), 0.5B and 1.5B rank-2 ingests were fastest at 4–8 workers and slower at 16 (1.43× and
#: 1.11× the time of 4 and 8 workers) while burning 1.4–1.8× the CPU — the tensors then contend for
#: memory bandwidth, and the largest tensor bounds the speed-up anyway (one task, one core)
MAX_DEFAULT_WORKERS = 8
#: the help of the two engine options that change speed and memory, never results (both CLIs)
THREADS_HELP = (
    f"Ingest worker threads, one tensor each (default: {WORKERS_PER_CORE} per core it may use, at "
    f"most {MAX_DEFAULT_WORKERS}; one per core while the state fits the page cache; fewer while other "
    "processes keep cores busy)."
)
BUDGET_HELP = "Memory the tensors in flight may hold, e.g. 8G (default: no cap beyond --threads)."
SPARE_HELP = (
    "Keep the replaced sketch file and overwrite it with the next one (faster ingest; the state at "
    "rest holds one sketch more). --no-spare-sketch gives that disk back after each ingest."
)


def default_workers() -> int:
    """The default number of ingest worker threads: :data:`WORKERS_PER_CORE` per core this process
    may use, at most :data:`MAX_DEFAULT_WORKERS`. Beside a trainer relexd runs at a lower CPU
    priority, so it takes what the trainer leaves. Beside a process that keeps every core busy, two
    workers were slower than one in two runs of three on 2 cores (bench/README.md, issue 12), so
    there ``--threads 1`` was the advice (README); the default now computes fewer tensors at once
    by itself while other processes keep cores busy (:mod:`relexd.engine.cores`)."""
    return min(WORKERS_PER_CORE * available_cores(), MAX_DEFAULT_WORKERS)


def cached_in_flight() -> int:
    """Tensors the default computes at once where the whole state fits the page cache: one per
    core, at most :data:`MAX_DEFAULT_WORKERS`. The second worker per core is there to fill the
    core a task leaves while it waits for the disk; with everything cached no task waits, and a
    second one only adds switches between threads (~8 % of a cached ingest's CPU went to threads
    waking each other). Measured on 2 cores at 0.5B (bench/results/full/scaling-cached-default-5dec.md):
    4 in flight were the slowest in every round, 1.11× at rank 1 and 1.14× at rank 2."""
    return min(available_cores(), MAX_DEFAULT_WORKERS)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | None) -> int | None:
    """``--memory-budget``: bytes from "8G", "512M", "1.5GiB", "4096"; None, "" or "none": no cap."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (use e.g. 8G, 512M or a number of bytes)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"a memory budget must be positive, not {text!r}")
    return size
