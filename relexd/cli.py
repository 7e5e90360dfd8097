"""The ``relexd`` command line (typer). Each command lives with its subsystem; this module only
assembles them and owns the one-off ``extrapolate`` command."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from relexd import __version__
from relexd.daemon.cli import register as register_daemon
from relexd.demo.cli import register as register_demo
from relexd.engine import DEFAULT_RANK, Engine, EngineConfig
from relexd.engine.config import BUDGET_HELP, SPARE_HELP, THREADS_HELP, parse_size
from relexd.errors import CheckpointError, RelexdError
from relexd.io.layouts import CheckpointRef, scan_run
from relexd.math.sketch import ESTIMATORS

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="relexd: streaming RELEX extrapolation of RL training checkpoints.",
)
err = Console(stderr=True)


def parse_steps(text: str) -> list[int]:
    """ "500,1000" → [500, 1000]; refuses anything that is not a positive integer."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated step numbers, got {text!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise typer.BadParameter(f"expected positive step numbers, got {text!r}")
    return sorted(set(steps))


def parse_horizons(text: str) -> tuple[float, ...]:
    try:
        return tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated factors such as 2,4, got {text!r}") from None


def fail(exc: Exception) -> typer.Exit:
    """Print an expected error as one line (no traceback) and return the exit to raise."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.command()
def version() -> None:
    """Print the relexd version."""
    typer.echo(__version__)


@app.command()
def extrapolate(
    run_dir: Annotated[Path, typer.Argument(help="Training run directory holding the checkpoints.")],
    target: Annotated[str, typer.Option(help="Step(s) to write previews for, e.g. 500,1000.")],
    out: Annotated[Path, typer.Option(help="Directory that receives one step-<τ>/ preview per target.")],
    base: Annotated[
        Path | None, typer.Option(help="θ₀: the model training started from (default: earliest checkpoint).")
    ] = None,
    upto: Annotated[int | None, typer.Option(help="Observe only checkpoints with step ≤ UPTO.")] = None,
    sketch_rank: Annotated[int, typer.Option(help="Rank k of the incremental SVD sketch.")] = DEFAULT_RANK,
    estimator: Annotated[str, typer.Option(help=f"One of: {', '.join(ESTIMATORS)}.")] = "brand",
    window: Annotated[
        int | None, typer.Option(help="Fit the line to the last W coefficients only (direction uses all).")
    ] = None,
    horizon: Annotated[str, typer.Option(help="Forecast-validation horizons, e.g. 2 or 2,4.")] = "2",
    anchor_dtype: Annotated[
        str, typer.Option(help="Storage of forecast anchors: bfloat16 (half the disk) or float32 (exact).")
    ] = "bfloat16",
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the streaming state here (resumable); default: a temporary directory."),
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable checkpoints instead of stopping at the first.")
    ] = False,
    every: Annotated[
        int, typer.Option(min=1, help="Ingest only checkpoints at least N steps after the last ingested one.")
    ] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP, envvar="RELEXD_THREADS")] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help=BUDGET_HELP, envvar="RELEXD_MEMORY_BUDGET", show_default=False)
    ] = None,
    spare_sketch: Annotated[bool, typer.Option(help=SPARE_HELP, envvar="RELEXD_SPARE_SKETCH")] = True,
) -> None:
    """Read a run's checkpoints in step order, update the streaming model once per checkpoint, and
    write a preview checkpoint for each target step."""
    targets = parse_steps(target)
    try:
        config = EngineConfig(
            estimator=estimator,
            rank=sketch_rank,
            window=window,
            horizons=parse_horizons(horizon),
            anchor_dtype=anchor_dtype,
            every=every,
        )
        budget = parse_size(memory_budget)
        refs = [r for r in scan_run(run_dir).complete if upto is None or r.step <= upto]
    except RelexdError as exc:
        raise fail(exc) from None
    if not run_dir.is_dir():
        raise fail(RelexdError(f"{run_dir}: no such directory"))
    if not refs:
        raise fail(
            RelexdError(f"{run_dir}: no complete checkpoint found" + (f" with step ≤ {upto}" if upto else ""))
        )
    if base is None:
        base, refs = refs[0].weights, refs[1:]
        err.print(
            f"no --base given: using the earliest checkpoint {escape(str(base))} as θ₀", highlight=False
        )
        if not refs:
            raise fail(RelexdError(f"{run_dir}: need at least one checkpoint after the base"))

    tmp = None
    if state_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="relexd-state-"))
        state_dir = tmp
    failed = 0
    try:
        with Engine(
            state_dir,
            base,
            config,
            threads=threads,
            memory_budget=budget,
            spare_sketch=spare_sketch,
        ) as engine:
            failed = _ingest_all(engine, refs, skip_bad)
            if not engine.steps:
                raise RelexdError("no checkpoint could be ingested; no preview written")
            written = [engine.write_preview(t, out) for t in targets]
            _print_summary(engine, targets, written)
    except RelexdError as exc:
        raise fail(exc) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        raise typer.Exit(1)


def _ingest_all(engine: Engine, refs: list, skip_bad: bool) -> int:
    """Ingest, in order, the checkpoints newer than the state's newest (a resumed state skips what
    it has) that ``--every`` takes — decided against the last one actually ingested, as the daemon
    does; returns how many were unreadable."""

    def wanted(ref: CheckpointRef) -> bool:
        last = engine.steps[-1] if engine.steps else None
        return (last is None or ref.step > last) and engine.config.takes(ref.step, last)

    numel = sum(engine.base.reader.info(n).numel for n in engine.base.tracked)
    failed = 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("reading checkpoints", total=numel * len(refs))
        for ref in refs:
            if not wanted(ref):
                progress.advance(task, numel)
                continue
            progress.update(task, description=f"step {ref.step}")
            try:
                engine.ingest(
                    ref.weights,
                    ref.step,
                    source=ref.path,
                    on_tensor=lambda _name, numel: progress.advance(task, numel),
                )
            except CheckpointError as exc:
                if not skip_bad:
                    raise
                failed += 1
                err.print(f"[yellow]skipped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return failed


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _print_summary(engine: Engine, targets: list[int], written: list[Path]) -> None:
    meta = engine.snapshot.meta
    steps = meta["steps"]
    figures = meta.get("figures", {})
    console = Console()
    table = Table(title="relexd extrapolation", show_header=False)
    table.add_row("observed steps", f"{len(steps)} checkpoints: {steps[0]} … {steps[-1]}")
    table.add_row("rank-1 energy ratio", _fmt(figures.get("rank1_energy_ratio")))
    table.add_row("worst tensor energy ratio", _fmt(figures.get("tensor_energy_ratio_min")))
    table.add_row("fit R²", _fmt(figures.get("fit_r2")))
    for f in meta.get("forecasts", []):
        table.add_row(
            f"forecast skill {f['horizon']} (ratio {f['ratio']:.2f})",
            f"{_fmt(f['skill'])}  (error ratio {_fmt(f['error_ratio'])})",
        )
    console.print(table)
    previews = Table(title="previews")
    for col in ("target step", "× newest step", "coefficient vs newest", "path"):
        previews.add_column(col)
    for t, path in zip(targets, written, strict=True):
        previews.add_row(str(t), f"{t / steps[-1]:.2f}", f"{coefficient_scale(meta, t):.3f}", str(path))
    console.print(previews)


def coefficient_scale(meta: dict, target: int) -> float:
    """Energy-weighted mean of ĉ(τ) / c(newest): how far along the line the preview sits (1 = the
    newest checkpoint's position, 2 = twice as far from θ₀)."""
    num = den = 0.0
    for rec in meta["per_tensor"].values():
        if rec["rank"] and rec["last_coef"] > 0:
            num += rec["energy"] * (rec["alpha"] + rec["beta"] * target) / rec["last_coef"]
            den += rec["energy"]
    return num / den if den else 0.0


register_daemon(app)
register_demo(app)


def main() -> None:
    app()
