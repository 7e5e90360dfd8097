"""Typer commands ``watch`` and ``status``; :func:`register` adds them to relexd's app.

Every option reads ``RELEXD_<NAME>`` from the environment, and ``--config FILE.toml``
(``RELEXD_CONFIG``) supplies defaults keyed by option name. Precedence, highest first: command
line, environment, config file, built-in default — click's own order for ``default_map``, which
the eager ``--config`` callback fills before any other option is resolved.
"""

from __future__ import annotations

import contextlib
import enum
import faulthandler
import gc
import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from relexd.daemon.config import WatchSettings, default_state_dir, load_toml, parse_list
from relexd.daemon.logs import setup_logging
from relexd.engine.config import (
    BUDGET_HELP,
    DEFAULT_RANK,
    SPARE_HELP,
    THREADS_HELP,
    EngineConfig,
    parse_size,
)
from relexd.errors import ConfigError, RelexdError
from relexd.telemetry import DEFAULT_LISTEN


class LogFormat(enum.StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager callback: put the TOML file's values into click's default_map."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        values = load_toml(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    known = {p.name for p in ctx.command.params if p.name != "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(
            f"{value}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _env(name: str) -> str:
    return "RELEXD_" + name.upper().replace("-", "_")


#: --state-dir, shared by `watch` and `status` (both default to $RELEXD_STATE_DIR, then ./relexd-state)
StateDirOption = Annotated[
    Path | None, typer.Option(help="State directory (default: ./relexd-state).", envvar=_env("state_dir"))
]


def watch(
    run_dir: Annotated[
        Path, typer.Argument(help="Training run directory (may not exist yet).", envvar=_env("run_dir"))
    ],
    base: Annotated[
        Path, typer.Option("--base", help="Base model θ₀ the run started from.", envvar=_env("base"))
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file of option defaults (keys = option names).",
            envvar=_env("config"),
            is_eager=True,
            callback=_load_config,
        ),
    ] = None,
    state_dir: StateDirOption = None,
    preview_dir: Annotated[
        Path | None,
        typer.Option(help="Where previews go (default: STATE_DIR/previews).", envvar=_env("preview_dir")),
    ] = None,
    preview_ahead: Annotated[
        str | None, typer.Option(help="R[,R…]: preview at R × the newest step.", envvar=_env("preview_ahead"))
    ] = None,
    preview_at: Annotated[
        str | None,
        typer.Option(
            help="STEP[,STEP…]: absolute preview steps (while ahead of training).", envvar=_env("preview_at")
        ),
    ] = None,
    preview_every: Annotated[
        int, typer.Option(help="Refresh previews every N ingested checkpoints.", envvar=_env("preview_every"))
    ] = 1,
    preview_keep: Annotated[
        int, typer.Option(help="Also keep the N newest superseded previews.", envvar=_env("preview_keep"))
    ] = 0,
    poll: Annotated[
        bool, typer.Option(help="Use the polling observer (automatic on NFS etc.).", envvar=_env("poll"))
    ] = False,
    poll_interval: Annotated[
        float, typer.Option(help="Polling observer interval, s.", envvar=_env("poll_interval"))
    ] = 2.0,
    eval_command: Annotated[
        str | None,
        typer.Option(
            "--eval",
            help="Evaluation command for previews and checkpoints (no shell); {path} {step} {target} "
            '{kind} {made_from} substituted; its last stdout line: {"score": <higher is better>}.',
            envvar=_env("eval"),
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int,
        typer.Option(min=1, help="Evaluate every N-th preview refresh.", envvar=_env("eval_every")),
    ] = 1,
    on_preview: Annotated[
        str | None,
        typer.Option(help="Deprecated name of --eval.", envvar=_env("on_preview"), hidden=True),
    ] = None,
    hook_timeout: Annotated[
        float, typer.Option(help="Hook timeout, s.", envvar=_env("hook_timeout"))
    ] = 3600.0,
    reconcile_interval: Annotated[
        float, typer.Option(help="Full rescan every S seconds.", envvar=_env("reconcile_interval"))
    ] = 30.0,
    debounce: Annotated[
        float,
        typer.Option(
            help="Marker-less checkpoints (OpenRLHF, plain): unchanged this long, s, counts as complete.",
            envvar=_env("debounce"),
        ),
    ] = 2.0,
    every: Annotated[
        int,
        typer.Option(
            min=1,
            help="Ingest only checkpoints at least N steps after the last ingested one (recorded).",
            envvar=_env("every"),
        ),
    ] = 1,
    max_pinned: Annotated[
        int,
        typer.Option(
            min=0,
            help="Complete checkpoints held open until read, so rotation cannot take them (disk!).",
            envvar=_env("max_pinned"),
        ),
    ] = 4,
    backlog_alert: Annotated[
        int,
        typer.Option(
            min=0,
            help="Above N waiting checkpoints relexd is falling behind (log; RelexFallingBehind).",
            envvar=_env("backlog_alert"),
        ),
    ] = 1,
    estimator: Annotated[str, typer.Option(help="brand or oja.", envvar=_env("estimator"))] = "brand",
    sketch_rank: Annotated[
        int, typer.Option(help="Sketch rank k.", envvar=_env("sketch_rank"))
    ] = DEFAULT_RANK,
    window: Annotated[
        int | None, typer.Option(help="Fit only the last W checkpoints.", envvar=_env("window"))
    ] = None,
    horizon: Annotated[
        str | None,
        typer.Option(
            help="Forecast horizons, e.g. 2 or 2,4 (default: the --preview-ahead ratios, else 2).",
            envvar=_env("horizon"),
            show_default=False,
        ),
    ] = None,
    anchor_dtype: Annotated[
        str,
        typer.Option(
            help="Storage of forecast anchors: bfloat16 (half the disk) or float32 (exact).",
            envvar=_env("anchor_dtype"),
        ),
    ] = "bfloat16",
    listen: Annotated[
        str, typer.Option(help="HOST:PORT of /metrics /healthz /readyz ('' disables).", envvar=_env("listen"))
    ] = DEFAULT_LISTEN,
    per_tensor_metrics: Annotated[
        bool, typer.Option(help="Export per-tensor series (many!).", envvar=_env("per_tensor_metrics"))
    ] = False,
    per_worker_metrics: Annotated[
        bool, typer.Option(help="With --ray: export per-worker series.", envvar=_env("per_worker_metrics"))
    ] = False,
    stall_threshold: Annotated[
        float | None,
        typer.Option(
            help="Seconds without a checkpoint before the stall alert.", envvar=_env("stall_threshold")
        ),
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option(help="auto: console on a TTY, else JSON.", envvar=_env("log_format"))
    ] = LogFormat.auto,
    once: Annotated[
        bool, typer.Option(help="Ingest what is complete, refresh previews, exit.", envvar=_env("once"))
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP, envvar=_env("threads"))] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help=BUDGET_HELP, envvar=_env("memory_budget"), show_default=False)
    ] = None,
    spare_sketch: Annotated[bool, typer.Option(help=SPARE_HELP, envvar=_env("spare_sketch"))] = True,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Compute on a Ray cluster: 'auto' (this node's) or its address; needs relexd[ray].",
            envvar=_env("ray"),
            show_default=False,
        ),
    ] = None,
    ray_workers: Annotated[
        int,
        typer.Option(min=1, help="With --ray: ingest workers, one per node.", envvar=_env("ray_workers")),
    ] = 2,
    ray_cpus_per_worker: Annotated[
        float,
        typer.Option(
            help="With --ray: CPUs each worker reserves (its threads).", envvar=_env("ray_cpus_per_worker")
        ),
    ] = 1.0,
    ray_timeout: Annotated[
        float,
        typer.Option(
            help="With --ray: a worker silent this long, s, is restarted.", envvar=_env("ray_timeout")
        ),
    ] = 900.0,
) -> None:
    """Follow a training run: ingest checkpoints as they complete and keep previews ahead of it."""
    setup_logging(log_format.value)
    log = structlog.get_logger("relexd.daemon")
    # systemd's watchdog kills a hung daemon with SIGABRT: print every thread's Python stack to
    # stderr (the journal) first, so the operator sees where it hung
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.enable(all_threads=True)  # needs a real stderr descriptor (not a test runner's)
    from relexd.daemon.service import WatchService  # heavy imports after option parsing
    from relexd.telemetry import RelexdMetrics

    if on_preview:
        if eval_command:
            _fail("--on-preview is the old name of --eval; give only --eval")
        typer.echo("relexd: warning: --on-preview is deprecated; use --eval (same command)", err=True)
        eval_command = on_preview
    try:
        ahead = parse_list(preview_ahead, float, "preview-ahead")
        settings = WatchSettings(
            run_dir=run_dir,
            base=base,
            state_dir=state_dir or default_state_dir(),
            preview_dir=preview_dir,
            preview_ahead=ahead,
            preview_at=parse_list(preview_at, int, "preview-at"),
            preview_every=preview_every,
            preview_keep=preview_keep,
            poll=poll,
            poll_interval=poll_interval,
            eval_command=eval_command or None,
            eval_every=eval_every,
            hook_timeout=hook_timeout,
            reconcile_interval=reconcile_interval,
            debounce=debounce,
            max_pinned=max_pinned,
            backlog_alert=backlog_alert,
            engine=EngineConfig(
                estimator=estimator,
                rank=sketch_rank,
                window=window,
                horizons=default_horizons(parse_list(horizon, float, "horizon"), ahead),
                anchor_dtype=anchor_dtype,
                every=every,
            ),
            listen=listen or None,
            per_tensor_metrics=per_tensor_metrics,
            per_worker_metrics=per_worker_metrics,
            once=once,
            threads=threads,
            memory_budget=parse_size(memory_budget),
            spare_sketch=spare_sketch,
            ray=ray or None,
            ray_workers=ray_workers,
            ray_cpus_per_worker=ray_cpus_per_worker,
            ray_timeout=ray_timeout,
        )
        metrics = RelexdMetrics(per_tensor=per_tensor_metrics, per_worker=per_worker_metrics)
        if stall_threshold is not None:
            metrics.set_stall_threshold(stall_threshold)
        service = WatchService(settings, metrics)
        service.open()
    except (RelexdError, ValueError, OSError) as exc:
        # through the log pipeline, so that under systemd this line is JSON like every other one
        log.error("cannot start", error=str(exc))
        raise typer.Exit(2) from None
    log.info("startup objects moved out of the collector's sight", objects=freeze_startup_heap())
    raise typer.Exit(service.run())


def freeze_startup_heap() -> int:
    """Move every object alive now (imported modules, the engine, the metrics: ~250 000, all of
    them living as long as the process) into the collector's permanent generation; returns how many.

    Python's cyclic garbage collector walks all tracked objects in each full collection while
    holding the GIL, and the daemon's own work triggers one every few dozen checkpoints: 150 ms
    with every thread stopped, measured beside a real TRL run on an idle host. On a loaded CI host
    a stall like it lasted 0.41 s, and a trainer that saves every 50 ms rotated six checkpoints
    away before the scout could pin them (tests/daemon/test_keeping_up.py). Frozen objects are
    never walked again; reference counting still frees them when they die. ``gc.freeze`` is
    CPython's own facility for exactly this (a long-lived process with a large startup heap)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def default_horizons(given: tuple[float, ...], preview_ahead: tuple[float, ...]) -> tuple[float, ...]:
    """Forward-validation horizons: as given, else those of the previews (a 6x preview is judged
    by a 6x skill), else 2x."""
    return given or tuple(sorted(set(preview_ahead))) or (2.0,)


def status(
    state_dir: StateDirOption = None,
    preview_dir: Annotated[
        Path | None,
        typer.Option(help="Preview directory (default: the daemon's).", envvar=_env("preview_dir")),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show observed steps, fit and confidence figures, forecasts and previews (daemon may run)."""
    from rich.console import Console

    from relexd.daemon.status import collect, render

    state = state_dir or default_state_dir()
    if not state.is_dir():
        _fail(f"{state}: no state directory (nothing watched yet?)")
    try:
        info = collect(state, preview_dir)
    except RelexdError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
    else:
        render(info, Console())


def _fail(message: str) -> Any:
    """A clear one-line error and exit status 2, no traceback (these are user errors)."""
    typer.echo(f"relexd: error: {message}", err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add ``watch`` and ``status`` to ``app`` (relexd's top-level CLI)."""
    app.command("watch")(watch)
    app.command("status")(status)


def main() -> None:
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(app)
    app()


if __name__ == "__main__":
    main()
