"""The Prometheus metrics of relexd (DESIGN.md §4), in one dedicated registry.

Why a dedicated :class:`~prometheus_client.CollectorRegistry` and not the global one: the daemon,
the tests and any embedding program can each hold their own :class:`RelexdMetrics` without
"Duplicated timeseries" errors, and ``/metrics`` exposes exactly what relexd means to publish.

Conventions (DESIGN.md §4): base units (seconds, bytes), ratios in 0..1, counters end in
``_total``, and low label cardinality — never a step, a path or a tensor name as a label, except for
the opt-in per-tensor series (``per_tensor=True``).

Label values that ARE used:

* ``horizon`` — the forecast horizon of a validation anchor, rendered like ``"2x"``. The daemon
  validates at a handful of fixed horizons, so this is a small, fixed set.
* ``target`` — the preview target *as the operator configured it* (``--preview-at 1000`` gives
  ``"1000"``, an "ahead" target gives e.g. ``"ahead_2x"``). That string may contain a number, but it is
  not a per-checkpoint step: the list of targets is fixed for the process lifetime by the
  operator, so the cardinality is bounded by the command line, not by training progress. The step a
  target currently resolves to is the *value* of ``relexd_preview_step{target}``.
* ``reason`` — one of :data:`relexd.errors.REASONS`; all are pre-initialised to 0 so that
  ``increase()`` sees the first error (a counter that appears at 1 has no increase).

Unknown confidence figures (not enough checkpoints yet, no anchor at ≥2× yet) are left *absent*, not
exported as 0 or NaN: a 0 would look like a real, terrible value and fire alerts; NaN compares false
with every threshold but still draws gaps and confuses ``min()``/``avg()`` aggregations. An absent
series is what PromQL alerting handles best: ``relexd_forecast_skill < 0`` simply has no result.
The HELP/TYPE lines are still exposed, so the name is discoverable from the first scrape.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relexd import __version__
from relexd.errors import MISSED_REASONS, REASONS, CheckpointError

__all__ = [
    "CONFIDENCE_FIGURES",
    "INGEST_DURATION_BUCKETS",
    "PREVIEW_WRITE_DURATION_BUCKETS",
    "ForecastFigures",
    "ForecastLike",
    "RelexdMetrics",
    "horizon_label",
]

#: Seconds to read one checkpoint and update the sketch: small models take well under a second,
#: a 70B model on a network file system takes minutes.
INGEST_DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
#: Seconds to write (and atomically publish) one preview checkpoint, same scale as ingestion.
PREVIEW_WRITE_DURATION_BUCKETS: tuple[float, ...] = INGEST_DURATION_BUCKETS

# Whole-model confidence figures: key accepted by set_confidence() -> (metric name, HELP text).
CONFIDENCE_FIGURES: dict[str, tuple[str, str]] = {
    "rank1_energy_ratio": (
        "relexd_rank1_energy_ratio",
        "Share of the weight trajectory's energy captured by the rank-1 direction, "
        "sum(sigma1^2)/sum(|x_s|^2) weighted over tensors, 0..1. Higher is better; near 1 means the "
        "path is a line, but a high value alone does not prove the forecast holds (see "
        "relexd_forecast_skill). Absent until enough checkpoints are observed.",
    ),
    "tensor_energy_ratio_min": (
        "relexd_tensor_energy_ratio_min",
        "Rank-1 energy ratio of the worst tensor, 0..1. Higher is better; a low value names a "
        "tensor whose trajectory is not rank-1 even if the whole-model ratio looks fine.",
    ),
    "fit_r2": (
        "relexd_fit_r2",
        "R^2 of the straight-line fit c_s = alpha + beta*step of the rank-1 coefficients, "
        "energy-weighted over tensors, <=1. Higher is better; near 1 means the coefficients move "
        "linearly with the step.",
    ),
    "direction_drift": (
        "relexd_direction_drift",
        "Direction drift 1 - |cos(v_prev, v)| between consecutive rank-1 direction estimates, "
        "energy-weighted, 0..1. Lower is better; sustained high drift means the direction has not "
        "settled and previews are unreliable.",
    ),
}

_FORECAST_HELP = {
    "relexd_forecast_error_ratio": (
        "Forward-validated forecast error sqrt(e_relex/e_norm): distance of the checkpoint at step "
        "s from the extrapolation made at an earlier anchor, relative to the size of the delta, "
        ">=0. Lower is better. Labelled by the horizon s/s_anchor."
    ),
    "relexd_forecast_skill": (
        "Forecast skill of the extrapolation vs. holding the anchor checkpoint: "
        "1 - sqrt(e_relex/e_hold). >0: extrapolation beats stopping training at the anchor; "
        "<0: the straight line no longer holds. Higher is better; absent until an anchor at the "
        "horizon exists."
    ),
    "relexd_forecast_horizon_ratio": (
        "Horizon actually used for the forecast validation, s/s_anchor (e.g. 2.1 for the 2x "
        "horizon). Informational: the skill at a longer horizon is a stronger statement."
    ),
}

# Absent (not NaN) when unset: the alert rule's `or` fallback only applies to an absent series.
_STALL_THRESHOLD = "relexd_checkpoint_stall_threshold_seconds"
_STALL_THRESHOLD_HELP = (
    "Operator-configured time without a new checkpoint after which the RelexCheckpointStalled "
    "alert fires. Absent: the alert rule's default (30 min) applies."
)

#: Opt-in per-worker series of ``--ray`` (``--per-worker-metrics``): name → (help, labels).
_WORKER_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "relexd_cluster_worker_up": (
        "With --ray and --per-worker-metrics: 1 while this worker's last call succeeded.",
        ("worker",),
    ),
    "relexd_cluster_worker_last_part_seconds": (
        "With --ray and --per-worker-metrics: wall time of this worker's part of the newest "
        "checkpoint; a worker always slower than the others holds up every commit.",
        ("worker",),
    ),
}

#: Reward-space figures from the evaluation hook (relexd.math.realized); absent until known.
_EVAL_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "relexd_checkpoint_eval_score": (
        "Score the evaluation hook reported for the newest evaluated training checkpoint (scale "
        "defined by the hook, higher is better). Its step is relexd_checkpoint_eval_step.",
        (),
    ),
    "relexd_checkpoint_eval_step": (
        "Training step of the checkpoint behind relexd_checkpoint_eval_score.",
        (),
    ),
    "relexd_preview_realized_gain_share": (
        "Realized validation of the newest preview at this horizon whose target step training has "
        "reached: (score(preview) - score(checkpoint it was made from)) / (score(checkpoint at the "
        "target) - score(checkpoint it was made from)). 1: the preview was as good as training "
        "there; <0: worse than the checkpoint it was made from. Absent when training gained "
        "nothing over that stretch.",
        ("horizon",),
    ),
    "relexd_preview_realized_advantage": (
        "Realized validation: score(preview) - score(checkpoint it was made from), for the newest "
        "preview at this horizon whose target training has reached. >0: taking the preview would "
        "have been better than stopping at that checkpoint.",
        ("horizon",),
    ),
    "relexd_preview_lead": (
        "score(newest evaluated preview of this target) - score(newest evaluated checkpoint). >0: "
        "the preview relexd offers now scores better than anything training has produced so far.",
        ("target",),
    ),
    "relexd_preview_lead_streak": (
        "How many of this target's newest preview evaluations in a row had a positive lead (0 when "
        "the newest lead is not positive); labelled by the horizon of the newest preview, to be "
        "matched with relexd_preview_realized_advantage{horizon}.",
        ("target", "horizon"),
    ),
}

#: How the newest ingest on this host used its cores (:mod:`relexd.engine.cores`); absent until an
#: ingest says: with ``--ray`` the workers decide, and an explicit ``--threads`` watches no one.
_CORES_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "relexd_ingest_tensors_in_flight": (
        "Tensors the newest ingest let run at once, one worker thread each (--memory-budget may "
        "have held fewer). relexd's default is one per core it may use (two while its state "
        "outgrows the page cache; at most 8) less the cores other processes kept busy "
        "(relexd_ingest_others_busy_cores); an explicit --threads is taken as given. Absent "
        "until the first ingest, and with --ray.",
        (),
    ),
    "relexd_ingest_others_busy_cores": (
        "Cores' worth of CPU other processes (a trainer) used on relexd's cores during its "
        "earlier ingests; the default worker count left them to the others for the newest "
        "ingest. Absent with an explicit --threads, with --ray, and until ingests of half a "
        "second in all were measured.",
        (),
    ),
}

EVAL_OUTCOMES = ("ok", "timeout", "exit", "no_score", "cannot_run", "gone", "superseded")
EVAL_FAILURES = ("timeout", "exit", "no_score", "cannot_run")

_TENSOR_ENERGY_HELP = (
    "Rank-1 energy ratio of one tensor, 0..1, higher is better. Opt-in (per_tensor=True) because "
    "it has one series per tensor of the model."
)


@runtime_checkable
class ForecastLike(Protocol):
    """What :meth:`RelexdMetrics.set_confidence` needs from one forward-validation result.

    ``horizon`` is the nominal horizon, either a label like ``"2x"`` or a number (``2`` → ``"2x"``);
    the numeric fields are ``None`` (or non-finite) when not known yet.
    """

    @property
    def horizon(self) -> str | float: ...

    @property
    def error_ratio(self) -> float | None: ...

    @property
    def skill(self) -> float | None: ...

    @property
    def ratio_used(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class ForecastFigures:
    """A plain :class:`ForecastLike` for callers without their own forecast type."""

    horizon: str | float
    error_ratio: float | None
    skill: float | None
    ratio_used: float | None


def horizon_label(horizon: str | float) -> str:
    """Render a horizon as a label value: ``2`` → ``"2x"``, ``2.5`` → ``"2.5x"``, strings kept."""
    if isinstance(horizon, str):
        if not horizon:
            raise ValueError("empty horizon label")
        return horizon
    if not math.isfinite(horizon) or horizon <= 0:
        raise ValueError(f"horizon must be a positive number, got {horizon!r}")
    return f"{horizon:g}x"


def _known(value: float | None) -> float | None:
    """The value as float, or None when unknown; NaN/Inf count as unknown (see module doc)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _SnapshotCollector(Collector):
    """Exposes gauges from an immutable snapshot that is replaced as a whole.

    Why not plain ``Gauge`` objects: an unlabelled Gauge always exports a value (0 before it is set),
    and the confidence figures must be *absent* until known. Replacing the whole snapshot under a
    lock also makes a scrape see all figures of the same checkpoint, never a mix of two.
    """

    def __init__(self, families: Mapping[str, tuple[str, tuple[str, ...]]]) -> None:
        # name -> (help, labelnames)
        self._families = dict(families)
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in self._families}

    def replace(self, name: str, values: Mapping[tuple[str, ...], float]) -> None:
        with self._lock:
            self._values[name] = dict(values)

    def replace_many(self, updates: Mapping[str, Mapping[tuple[str, ...], float]]) -> None:
        with self._lock:
            for name, values in updates.items():
                self._values[name] = dict(values)

    def value(self, name: str, labels: tuple[str, ...] = ()) -> float | None:
        with self._lock:
            return self._values[name].get(labels)

    def _build(self, with_samples: bool) -> Iterator[Metric]:
        with self._lock:
            snapshot = {n: dict(v) for n, v in self._values.items()}
        for name, (doc, labelnames) in self._families.items():
            family = GaugeMetricFamily(name, doc, labels=labelnames)
            if with_samples:
                for labels, value in sorted(snapshot[name].items()):
                    family.add_metric(list(labels), value)
            yield family

    def collect(self) -> Iterable[Metric]:
        return list(self._build(with_samples=True))

    def describe(self) -> Iterable[Metric]:
        return list(self._build(with_samples=False))


class RelexdMetrics:
    """All relexd metrics, owned by one registry, with the methods the daemon calls.

    Every method is thread-safe (prometheus_client metrics are; the snapshot collector locks), so
    the ingest worker, the preview writer and the main loop may call them concurrently.

    Args:
        version: value of ``relexd_build_info{version}``.
        per_tensor: also export ``relexd_tensor_energy_ratio{tensor}`` (one series per tensor —
            thousands for an LLM; off by default, DESIGN.md §4).
        per_worker: with ``--ray``, also export ``relexd_cluster_worker_up{worker}`` and
            ``relexd_cluster_worker_last_part_seconds{worker}`` (one series per worker).
        registry: registry to register into; a fresh one by default.
        process_metrics: add the standard ``process_*``/``python_info`` collectors to the registry
            (memory, CPU, open fds, start time) — they are what you look at when ingestion is slow.
    """

    def __init__(
        self,
        *,
        version: str = __version__,
        per_tensor: bool = False,
        per_worker: bool = False,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_tensor = per_tensor
        self.per_worker = per_worker
        r = self.registry

        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

        # --- confidence (absent until known) ----------------------------------------------------
        families: dict[str, tuple[str, tuple[str, ...]]] = {
            name: (doc, ()) for name, doc in CONFIDENCE_FIGURES.values()
        }
        families.update({name: (doc, ("horizon",)) for name, doc in _FORECAST_HELP.items()})
        families[_STALL_THRESHOLD] = (_STALL_THRESHOLD_HELP, ())
        families.update(_EVAL_HELP)
        families.update(_CORES_HELP)
        if per_tensor:
            families["relexd_tensor_energy_ratio"] = (_TENSOR_ENERGY_HELP, ("tensor",))
        if per_worker:
            families.update(_WORKER_HELP)
        self._optional = _SnapshotCollector(families)
        r.register(self._optional)

        # --- progress -----------------------------------------------------------------------------
        self.last_checkpoint_step = Gauge(
            "relexd_last_checkpoint_step",
            "Training step of the newest checkpoint folded into the model. Should keep rising "
            "while training runs.",
            registry=r,
        )
        self.observed_checkpoints = Gauge(
            "relexd_observed_checkpoints",
            "Number of checkpoints the current rank-1 model is built from (survives restarts, "
            "unlike relexd_checkpoints_ingested_total). More is better; confidence figures need a "
            "few.",
            registry=r,
        )
        self.last_checkpoint_timestamp = Gauge(
            "relexd_last_checkpoint_timestamp_seconds",
            "Unix time at which the newest ingested checkpoint was completed by the trainer "
            "(its completion marker's mtime). time() minus this is how long training has not "
            "produced a checkpoint.",
            registry=r,
        )
        self.checkpoints_ingested = Counter(
            "relexd_checkpoints_ingested_total",
            "Checkpoints successfully read and folded into the model by this process.",
            registry=r,
        )
        self.checkpoint_errors = Counter(
            "relexd_checkpoint_errors_total",
            "Checkpoints that could not be used, by reason (see relexd.errors.REASONS). "
            "'rotated' (trainer deleted it mid-read) and 'incomplete' are normal while watching; "
            "anything else needs a look.",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.checkpoint_errors.labels(reason=reason)

        # --- keeping up ----------------------------------------------------------------------------
        self.checkpoints_missed = Counter(
            "relexd_checkpoints_missed_total",
            "Checkpoints the trainer saved that relexd did not read, by reason: 'rotated' = seen but "
            "deleted by the trainer before relexd read it; 'gap' = never seen, but the trainer's "
            "records (trainer_state.json save_steps) say it was saved. Should stay flat: each miss "
            "is a point of the trajectory the fit does not have.",
            ["reason"],
            registry=r,
        )
        for reason in MISSED_REASONS:
            self.checkpoints_missed.labels(reason=reason)
        self.ingest_backlog = Gauge(
            "relexd_ingest_backlog_checkpoints",
            "Complete checkpoints waiting to be ingested (the one being read not counted). Above 1 "
            "for long means the trainer saves faster than relexd reads: see README 'Keeping up'.",
            registry=r,
        )
        self.ingest_backlog_limit = Gauge(
            "relexd_ingest_backlog_limit_checkpoints",
            "Backlog above which relexd counts as falling behind (--backlog-alert): the "
            "RelexFallingBehind alert compares relexd_ingest_backlog_checkpoints with it, so each "
            "run's threshold is set where the run is configured.",
            registry=r,
        )
        self.ingest_lag = Gauge(
            "relexd_ingest_lag_seconds",
            "From the trainer completing the newest ingested checkpoint to relexd committing it. "
            "Compare with the trainer's save interval.",
            registry=r,
        )
        self.ingest_duration = Histogram(
            "relexd_ingest_duration_seconds",
            "Wall time to read one checkpoint and update the rank-1 sketch. Lower is better; it "
            "must stay well below the trainer's save interval or relexd falls behind.",
            buckets=INGEST_DURATION_BUCKETS,
            registry=r,
        )
        self.ingest_bytes = Counter(
            "relexd_ingest_bytes_total",
            "Bytes of checkpoint weights read. rate() of this is the read throughput.",
            registry=r,
        )

        # --- previews -----------------------------------------------------------------------------
        self.preview_step = Gauge(
            "relexd_preview_step",
            "Training step the newest preview of this configured target predicts. "
            "Absent until the first preview for the target is written.",
            ["target"],
            registry=r,
        )
        self.previews_written = Counter(
            "relexd_previews_written_total",
            "Preview checkpoints written and atomically published.",
            registry=r,
        )
        self.preview_write_duration = Histogram(
            "relexd_preview_write_duration_seconds",
            "Wall time to compute, write, fsync and publish one preview checkpoint.",
            buckets=PREVIEW_WRITE_DURATION_BUCKETS,
            registry=r,
        )
        self.preview_eval_score = Gauge(
            "relexd_preview_eval_score",
            "Score the operator's evaluation hook reported for the newest preview of this target "
            "(scale defined by the hook, usually accuracy 0..1, higher is better). Absent until an "
            "evaluation finished.",
            ["target"],
            registry=r,
        )
        self.preview_hook_failures = Counter(
            "relexd_preview_hook_failures_total",
            "Evaluation/post-write hook runs that failed (non-zero exit, timeout, unparsable "
            "score). Should stay flat.",
            registry=r,
        )
        self.evaluations = Counter(
            "relexd_evaluations_total",
            "Evaluation hook jobs by kind (preview, checkpoint) and outcome: ok, timeout, exit, "
            "no_score, cannot_run, gone (the weights were deleted before the run), superseded (a "
            "newer preview of the target replaced it in the queue).",
            ["kind", "outcome"],
            registry=r,
        )
        for kind in ("preview", "checkpoint"):
            for outcome in EVAL_OUTCOMES:
                self.evaluations.labels(kind=kind, outcome=outcome)

        # --- cluster (--ray) ------------------------------------------------------------------------
        self.cluster_workers = Gauge(
            "relexd_cluster_workers",
            "With --ray: ingest workers configured on the Ray cluster; 0 on a single host.",
            registry=r,
        )
        self.cluster_workers_up = Gauge(
            "relexd_cluster_workers_up",
            "With --ray: workers whose last call succeeded (a dead or hung one counts as down until "
            "it answers again). Below relexd_cluster_workers: checkpoints are being retried.",
            registry=r,
        )
        self.cluster_worker_part_seconds = Histogram(
            "relexd_cluster_worker_part_seconds",
            "With --ray: wall time of one worker's part of one checkpoint (read, update, write, "
            "fsync). Compare its spread with relexd_ingest_duration_seconds: a slow worker "
            "holds up every commit.",
            buckets=INGEST_DURATION_BUCKETS,
            registry=r,
        )
        self.cluster_workers_lost = Counter(
            "relexd_cluster_workers_lost_total",
            "With --ray: parts abandoned because their worker died or hung (the generation was "
            "retried). Should stay flat.",
            registry=r,
        )

        # --- process ------------------------------------------------------------------------------
        self.build_info = Gauge(
            "relexd_build_info",
            "Always 1; the labels carry the relexd version running.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=version).set(1)
        self.watcher_up = Gauge(
            "relexd_watcher_up",
            "1 while the checkpoint watcher (observer and reconcile scans) is running, else 0.",
            registry=r,
        )

    # ------------------------------------------------------------------------------------------
    # cluster
    def set_workers(self, workers: Sequence[Any]) -> None:
        """``workers``: :class:`relexd.cluster.coordinator.WorkerStatus` (``index``, ``up``,
        ``last_seconds``)."""
        self.cluster_workers.set(len(workers))
        self.cluster_workers_up.set(sum(1 for w in workers if w.up))
        if self.per_worker:
            up = {(str(w.index),): float(w.up) for w in workers}
            self._optional.replace("relexd_cluster_worker_up", up)
            self._optional.replace(
                "relexd_cluster_worker_last_part_seconds",
                {(str(w.index),): w.last_seconds for w in workers if w.last_seconds is not None},
            )

    def observe_worker_part(self, seconds: float) -> None:
        self.cluster_worker_part_seconds.observe(seconds)

    def count_worker_lost(self) -> None:
        self.cluster_workers_lost.inc()

    # ------------------------------------------------------------------------------------------
    # progress
    def observe_ingest(
        self,
        step: int,
        seconds: float,
        nbytes: int,
        timestamp: float,
        *,
        observed: int | None = None,
    ) -> None:
        """Record one successfully ingested checkpoint.

        Args:
            step: its training step.
            seconds: wall time of the ingestion.
            nbytes: weight bytes read.
            timestamp: Unix time the trainer completed it (marker mtime); use the ingestion time
                when unknown.
            observed: checkpoints in the model after this one (from the state); by default the
                gauge is incremented, which is right if :meth:`restore_progress` ran at start.
        """
        if seconds < 0 or nbytes < 0:
            raise ValueError("seconds and nbytes must be non-negative")
        self.last_checkpoint_step.set(step)
        self.last_checkpoint_timestamp.set(timestamp)
        self.checkpoints_ingested.inc()
        self.ingest_duration.observe(seconds)
        self.ingest_bytes.inc(nbytes)
        if observed is None:
            self.observed_checkpoints.inc()
        else:
            self.observed_checkpoints.set(observed)

    def restore_progress(self, *, step: int | None, observed: int, timestamp: float | None) -> None:
        """Publish the progress loaded from the state directory on (re)start.

        Without this the stall alert would see no timestamp after a restart until the next
        checkpoint lands — exactly when a stall matters.
        """
        self.observed_checkpoints.set(observed)
        if step is not None:
            self.last_checkpoint_step.set(step)
        if timestamp is not None:
            self.last_checkpoint_timestamp.set(timestamp)

    def count_error(self, reason: str | CheckpointError) -> None:
        """Count one unusable checkpoint under its reason code (or a :class:`CheckpointError`)."""
        code = reason.reason if isinstance(reason, CheckpointError) else reason
        if code not in REASONS:
            raise ValueError(f"unknown reason code {code!r}; add it to relexd.errors.REASONS")
        self.checkpoint_errors.labels(reason=code).inc()

    def count_missed(self, reason: str, count: int = 1) -> None:
        """Count checkpoints relexd did not read (one of :data:`relexd.errors.MISSED_REASONS`)."""
        if reason not in MISSED_REASONS:
            raise ValueError(f"unknown missed reason {reason!r}; add it to relexd.errors.MISSED_REASONS")
        self.checkpoints_missed.labels(reason=reason).inc(count)

    def set_backlog(self, waiting: int, limit: int) -> None:
        self.ingest_backlog.set(waiting)
        self.ingest_backlog_limit.set(limit)

    def set_lag(self, seconds: float) -> None:
        self.ingest_lag.set(seconds)

    def set_ingest_cores(self, tensors_in_flight: int | None, others_busy_cores: float | None) -> None:
        """Publish how the newest ingest used the cores (None: unknown, and the series removed)."""
        if tensors_in_flight is not None and tensors_in_flight < 1:
            raise ValueError(f"tensors in flight must be at least 1: {tensors_in_flight!r}")
        busy = _known(others_busy_cores)
        if busy is not None and busy < 0:
            raise ValueError(f"others' busy cores must not be negative: {others_busy_cores!r}")
        self._optional.replace_many(
            {
                "relexd_ingest_tensors_in_flight": (
                    {} if tensors_in_flight is None else {(): float(tensors_in_flight)}
                ),
                "relexd_ingest_others_busy_cores": {} if busy is None else {(): busy},
            }
        )

    def set_stall_threshold(self, seconds: float | None) -> None:
        """Export the per-run stall threshold used by the RelexCheckpointStalled alert.

        Set it from the daemon's option (roughly 3× the trainer's save interval); ``None`` removes
        the series so the rule's default applies.
        """
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"stall threshold must be a positive number of seconds: {seconds!r}")
        self._optional.replace(_STALL_THRESHOLD, {} if seconds is None else {(): float(seconds)})

    def set_watcher_up(self, up: bool) -> None:
        """Mark the watcher (observer + reconcile loop) running (True) or stopped (False)."""
        self.watcher_up.set(1 if up else 0)

    # ------------------------------------------------------------------------------------------
    # confidence
    def set_confidence(
        self,
        figures: Mapping[str, float | None],
        forecasts: Sequence[ForecastLike] = (),
    ) -> None:
        """Publish the confidence figures of the newest checkpoint, replacing all previous ones.

        Args:
            figures: keys of :data:`CONFIDENCE_FIGURES` (``rank1_energy_ratio``,
                ``tensor_energy_ratio_min``, ``fit_r2``, ``direction_drift``); a missing key,
                ``None`` or a non-finite value leaves the series absent (not enough data).
            forecasts: one entry per horizon; horizons not listed, and fields that are
                ``None``, are absent afterwards.
        """
        unknown = set(figures) - set(CONFIDENCE_FIGURES)
        if unknown:
            raise ValueError(f"unknown confidence figures: {sorted(unknown)}")
        updates: dict[str, dict[tuple[str, ...], float]] = {}
        for key, (name, _doc) in CONFIDENCE_FIGURES.items():
            value = _known(figures.get(key))
            updates[name] = {} if value is None else {(): value}
        error: dict[tuple[str, ...], float] = {}
        skill: dict[tuple[str, ...], float] = {}
        ratio: dict[tuple[str, ...], float] = {}
        for forecast in forecasts:
            label = (horizon_label(forecast.horizon),)
            for target, value in (
                (error, forecast.error_ratio),
                (skill, forecast.skill),
                (ratio, forecast.ratio_used),
            ):
                known = _known(value)
                if known is not None:
                    target[label] = known
        updates["relexd_forecast_error_ratio"] = error
        updates["relexd_forecast_skill"] = skill
        updates["relexd_forecast_horizon_ratio"] = ratio
        self._optional.replace_many(updates)

    def set_tensor_figures(self, energy_ratios: Mapping[str, float | None]) -> None:
        """Publish per-tensor energy ratios; a no-op unless ``per_tensor=True``.

        The daemon may call it unconditionally; the mapping replaces the previous one.
        """
        if not self.per_tensor:
            return
        values = {(name,): v for name, raw in energy_ratios.items() if (v := _known(raw)) is not None}
        self._optional.replace("relexd_tensor_energy_ratio", values)

    def confidence_value(self, name: str, horizon: str | float | None = None) -> float | None:
        """The currently exported value of a confidence metric (None if absent); for tests/logs."""
        labels = () if horizon is None else (horizon_label(horizon),)
        return self._optional.value(name, labels)

    # ------------------------------------------------------------------------------------------
    # previews
    def observe_preview_written(self, target_label: str, step: int, seconds: float) -> None:
        """Record a published preview for the configured target ``target_label`` at ``step``."""
        self.preview_step.labels(target=target_label).set(step)
        self.previews_written.inc()
        self.preview_write_duration.observe(seconds)

    def set_eval_score(self, target_label: str, score: float | None) -> None:
        """Publish the eval hook's score for a target's newest preview; None/NaN removes it.

        Remove it (``None``) when a new preview replaces the evaluated one, so the score on the
        dashboard always belongs to the preview at ``relexd_preview_step{target}``.
        """
        value = _known(score)
        if value is None:
            self._remove_child(self.preview_eval_score, target_label)
        else:
            self.preview_eval_score.labels(target=target_label).set(value)

    def forget_target(self, target_label: str) -> None:
        """Drop every series of a preview target that is no longer configured."""
        self._remove_child(self.preview_step, target_label)
        self._remove_child(self.preview_eval_score, target_label)

    def count_hook_failure(self) -> None:
        """Count one failed evaluation/post-write hook run."""
        self.preview_hook_failures.inc()

    def count_evaluation(self, kind: str, outcome: str) -> None:
        """Count one finished evaluation job; failures also in relexd_preview_hook_failures_total."""
        self.evaluations.labels(kind=kind, outcome=outcome).inc()
        if outcome in EVAL_FAILURES:
            self.preview_hook_failures.inc()

    def set_eval_figures(
        self,
        *,
        checkpoint: tuple[int, float] | None,
        realized: Mapping[str, tuple[float | None, float]],
        leads: Mapping[str, tuple[float, int, str]],
    ) -> None:
        """Publish the reward-space figures, replacing all previous ones (absent when unknown).

        ``checkpoint``: (step, score) of the newest evaluated checkpoint; ``realized``: horizon
        label → (gain share or None, advantage); ``leads``: target → (lead, streak, horizon label).
        """
        updates: dict[str, dict[tuple[str, ...], float]] = {
            "relexd_checkpoint_eval_score": {} if checkpoint is None else {(): float(checkpoint[1])},
            "relexd_checkpoint_eval_step": {} if checkpoint is None else {(): float(checkpoint[0])},
            "relexd_preview_realized_gain_share": {
                (h,): v for h, (share, _) in realized.items() if (v := _known(share)) is not None
            },
            "relexd_preview_realized_advantage": {
                (h,): v for h, (_, adv) in realized.items() if (v := _known(adv)) is not None
            },
            "relexd_preview_lead": {
                (t,): v for t, (lead, _, _) in leads.items() if (v := _known(lead)) is not None
            },
            "relexd_preview_lead_streak": {(t, h): float(n) for t, (_, n, h) in leads.items()},
        }
        self._optional.replace_many(updates)

    def eval_value(self, name: str, labels: tuple[str, ...] = ()) -> float | None:
        """The currently exported value of a reward-space metric (None if absent); for tests."""
        return self._optional.value(name, labels)

    # ------------------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what ``GET /metrics`` returns by default)."""
        return generate_latest(self.registry)

    @staticmethod
    def _remove_child(metric: Gauge, label: str) -> None:
        with contextlib.suppress(KeyError):  # already absent is fine
            metric.remove(label)
