"""Settings of ``relexd watch`` and the optional TOML config file.

The TOML file's keys are the command-line option names (``preview-ahead`` or ``preview_ahead``);
the CLI feeds them to click as its ``default_map``, so command line and environment variables
(``RELEXD_…``) override the file, which overrides the built-in defaults.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relexd.engine.config import EngineConfig
from relexd.errors import ConfigError

DEFAULT_STATE_DIR = "relexd-state"


def default_state_dir() -> Path:
    """``$RELEXD_STATE_DIR`` or ``./relexd-state``."""
    return Path(os.environ.get("RELEXD_STATE_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class WatchSettings:
    """Everything the daemon needs; built by the CLI, or directly by tests."""

    run_dir: Path
    base: Path
    state_dir: Path = field(default_factory=default_state_dir)
    preview_dir: Path | None = None  # None: <state_dir>/previews
    preview_ahead: tuple[float, ...] = ()
    preview_at: tuple[int, ...] = ()
    preview_every: int = 1
    preview_keep: int = 0
    poll: bool = False
    poll_interval: float = 2.0
    #: the evaluation command (``--eval``; ``--on-preview`` is its deprecated name)
    eval_command: str | None = None
    #: evaluate every N-th preview refresh (previews, their checkpoints, the checkpoints reaching them)
    eval_every: int = 1
    hook_timeout: float = 3600.0
    reconcile_interval: float = 30.0
    debounce: float = 2.0  # marker-less layouts: per checkpoint, files unchanged this long
    #: Complete checkpoints held open until ingested (relexd.daemon.pins): each one that the trainer
    #: deletes meanwhile keeps its disk space until relexd has read it.
    max_pinned: int = 4
    #: waiting checkpoints above which relexd says it is falling behind (log, and the
    #: ``RelexFallingBehind`` alert through ``relexd_ingest_backlog_limit_checkpoints``)
    backlog_alert: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    listen: str | None = None  # None: no HTTP endpoint
    per_tensor_metrics: bool = False
    per_worker_metrics: bool = False  # with --ray: one series per worker
    once: bool = False  # ingest what is complete, refresh previews, exit
    #: ingest worker threads, each computing one tensor at a time (None: two per core this process
    #: may use, at most 8, one per core computing while the state fits the page cache, fewer
    #: while other processes keep cores busy: engine.config.default_workers, cached_in_flight and
    #: engine.cores); the results do not depend on it
    threads: int | None = None
    #: bytes the tensors in flight may hold (None: bounded by the worker count only); with --ray,
    #: per cluster worker
    memory_budget: int | None = None
    #: seconds without an ingest after which the buffers kept for the next one are freed
    #: (relexd.engine.memory.TaskBuffers): while checkpoints come more often, keeping them saves
    #: each ingest their first touch (0.1-0.3 s of a 0.5B rank-1 ingest on the AMD VM of 7 Dec,
    #: bench/results/full/task-buffers-7dec-amd.md); rarer, that saving is under 0.1 %
    buffer_idle_s: float = 300.0
    #: overwrite the replaced generation's sketch file in place (relexd.state.store: "The spare
    #: sketch"); False gives its disk space back after every commit
    spare_sketch: bool = True
    #: a Ray cluster to compute on ("auto": this node's; None: this host only) — relexd.cluster
    ray: str | None = None
    ray_workers: int = 2
    ray_cpus_per_worker: float = 1.0
    #: a cluster worker that sends no result for this long counts as hung (restarted, retried)
    ray_timeout: float = 900.0

    def __post_init__(self) -> None:
        if self.preview_every < 1:
            raise ConfigError(f"--preview-every must be ≥ 1, not {self.preview_every}")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be ≥ 1, not {self.eval_every}")
        if self.preview_keep < 0:
            raise ConfigError(f"--preview-keep must be ≥ 0, not {self.preview_keep}")
        if any(r <= 1.0 for r in self.preview_ahead):
            raise ConfigError(f"--preview-ahead ratios must be > 1, not {list(self.preview_ahead)}")
        if any(s <= 0 for s in self.preview_at):
            raise ConfigError(f"--preview-at steps must be positive, not {list(self.preview_at)}")
        for name in ("hook_timeout", "reconcile_interval", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.debounce < 0:
            raise ConfigError("--debounce must be ≥ 0")
        if self.buffer_idle_s < 0:
            raise ConfigError("buffer_idle_s must be ≥ 0")
        if self.max_pinned < 0:
            raise ConfigError("--max-pinned must be ≥ 0")
        if self.backlog_alert < 0:
            raise ConfigError("--backlog-alert must be ≥ 0")
        if self.ray_workers < 1 or self.ray_cpus_per_worker <= 0 or self.ray_timeout <= 0:
            raise ConfigError("--ray-workers must be ≥ 1, --ray-cpus-per-worker and --ray-timeout > 0")
        run = self.run_dir.resolve()
        previews = self.previews.resolve()
        if previews == run or run in previews.parents:
            # HF Trainer rotates checkpoints by directory mtime; writing there would disturb it
            raise ConfigError(
                f"preview dir {self.previews} is inside the run directory {self.run_dir}: relexd never "
                "writes into the trainer's directories; choose --preview-dir elsewhere"
            )
        state = self.state_dir.resolve()
        if state == run or run in state.parents:
            raise ConfigError(
                f"state dir {self.state_dir} is inside the run directory {self.run_dir}; "
                "choose another --state-dir"
            )

    @property
    def previews(self) -> Path:
        return self.preview_dir if self.preview_dir is not None else self.state_dir / "previews"


def parse_list(text: str | None, kind: type[float] | type[int], option: str) -> tuple[Any, ...]:
    """``"2,4"`` → ``(2.0, 4.0)``; empty or None → ``()``."""
    if not text:
        return ()
    try:
        return tuple(kind(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--{option}: expected comma-separated numbers, not {text!r}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file into click's ``default_map`` form: keys as parameter names, lists joined.

    Unknown keys are left for the caller to reject (it knows the option names).
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    section = raw.get("watch", raw) if isinstance(raw.get("watch"), dict) else raw
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[name] = value
    return out
