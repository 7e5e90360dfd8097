"""``relexd status``: what the state directory says, read without the writer's lock.

It reads only the published generation (:func:`relexd.state.store.read_snapshot`), so it works
while the daemon runs and never blocks it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from relexd.daemon import previews as pv
from relexd.daemon.evaluations import EvalLedger
from relexd.daemon.evaluations import read_ledger as read_evaluations
from relexd.daemon.missed import read_ledger
from relexd.daemon.service import CLUSTER_FILE, DAEMON_FILE
from relexd.state.store import read_snapshot


def collect(state_dir: Path, preview_dir: Path | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` output)."""
    snap = read_snapshot(state_dir, load_small=False)
    meta = snap.meta
    daemon: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        daemon = json.loads((state_dir / DAEMON_FILE).read_text(encoding="utf-8"))
    cluster: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        cluster = json.loads((state_dir / CLUSTER_FILE).read_text(encoding="utf-8"))
    if preview_dir is None:
        preview_dir = Path(daemon.get("preview_dir") or state_dir / "previews")
    previews = []
    for step, path in pv.list_previews(preview_dir):
        generation, newest = pv.read_generation(path)
        previews.append(
            {"target_step": step, "path": str(path), "from_step": newest, "current": generation == snap.name}
        )
    history = meta.get("history", [])
    ledger = read_ledger(state_dir) or {}
    evaluations = _evaluations(state_dir, (meta.get("config") or {}).get("horizons") or [2.0])
    return {
        "state_dir": str(state_dir),
        "generation": snap.name,
        "base": meta.get("base", {}).get("path"),
        "run_dir": daemon.get("run_dir"),
        "config": meta.get("config"),
        "observed": len(meta.get("steps", [])),
        "steps": meta.get("steps", []),
        "last_source": meta.get("last_source"),
        "last_time": meta.get("last_time"),
        "figures": meta.get("figures", {}),
        "forecasts": meta.get("forecasts", []),
        "last_ingest_seconds": history[-1]["seconds"] if history else None,
        "ingest_every": (meta.get("config") or {}).get("every", 1),
        "missed": {"counts": ledger.get("counts", {}), "recent": ledger.get("recent", [])},
        "preview_dir": str(preview_dir),
        "previews": previews,
        "evaluations": evaluations,
        "cluster": cluster,
        "partition": [len(p) for p in (meta.get("partition") or {}).get("parts", [])] or None,
    }


#: evaluation records ``status`` lists (the newest)
RECENT_EVALUATIONS = 12


def _evaluations(state_dir: Path, horizons: list[float]) -> dict[str, Any]:
    """The evaluation ledger's figures and newest records (empty when there is none)."""
    empty: dict[str, Any] = {"checkpoint": None, "recent": [], "realized": {}, "leads": {}}
    try:
        if read_evaluations(state_dir) is None:
            return empty
        ledger = EvalLedger(state_dir, tuple(horizons), read_only=True)
    except ValueError as exc:
        return empty | {"error": str(exc)}
    fig = ledger.figures()
    return {
        "checkpoint": {"step": fig.checkpoint_step, "score": fig.checkpoint_score},
        "realized": {h: {"gain_share": share, "advantage": adv} for h, (share, adv) in fig.realized.items()},
        "leads": {t: {"lead": lead, "streak": n, "horizon": h} for t, (lead, n, h) in fig.leads.items()},
        "recent": ledger.records()[-RECENT_EVALUATIONS:],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _steps_text(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps)) or "none"
    return f"{', '.join(map(str, steps[:3]))}, …, {', '.join(map(str, steps[-3:]))}"


def _missed_text(missed: dict[str, Any]) -> str:
    counts = {reason: n for reason, n in missed["counts"].items() if n}
    if not counts:
        return "none"
    total = sum(counts.values())
    why = ", ".join(f"{n} {reason}" for reason, n in counts.items())
    runs = [r["first"] if r["count"] == 1 else f"{r['first']}…{r['last']}" for r in missed["recent"][-8:]]
    return f"{total} ({why}); latest: steps {', '.join(map(str, runs))}"


def _cluster_text(cluster: dict[str, Any] | None, partition: list[int] | None) -> str:
    """Workers up, where they run and their last part's seconds; the state's partition."""
    parts = f"state in {len(partition)} parts ({', '.join(map(str, partition))} tensors)" if partition else ""
    if not cluster:
        return parts
    workers = cluster["workers"]
    each = ", ".join(
        f"{w['host']}:{w['pid']} {'up' if w['up'] else 'DOWN'} {_fmt(w['last_seconds'])} s" for w in workers
    )
    return f"{cluster['up']} of {len(workers)} up ({each}); {parts}".rstrip("; ")


def render(info: dict[str, Any], console: Console) -> None:
    """Print the status as rich tables."""
    overview = Table(title=f"relexd state {info['state_dir']}", show_header=False)
    overview.add_column("key", style="bold")
    overview.add_column("value")
    overview.add_row("base", _fmt(info["base"]))
    overview.add_row("run dir", _fmt(info["run_dir"]))
    overview.add_row("observed checkpoints", str(info["observed"]))
    overview.add_row("steps", _steps_text(info["steps"]))
    if info["ingest_every"] > 1:
        overview.add_row("ingesting", f"only checkpoints ≥ {info['ingest_every']} steps apart (--every)")
    overview.add_row("missed checkpoints", _missed_text(info["missed"]))
    overview.add_row("newest checkpoint", _fmt(info["last_source"]))
    if info["cluster"] or info["partition"]:
        overview.add_row("cluster workers", _cluster_text(info["cluster"], info["partition"]))
    for key, value in info["figures"].items():
        overview.add_row(key.replace("_", " "), _fmt(value))
    console.print(overview)
    if info["forecasts"]:
        fc = Table(title="forward-validated forecasts")
        for col in ("horizon", "anchor step", "step", "ratio used", "error ratio", "skill"):
            fc.add_column(col)
        for f in info["forecasts"]:
            fc.add_row(
                *(_fmt(f.get(k)) for k in ("horizon", "anchor_step", "step", "ratio", "error_ratio", "skill"))
            )
        console.print(fc)
    _render_evaluations(info["evaluations"], console)
    prev = Table(title=f"previews in {info['preview_dir']}")
    for col in ("target step", "built from step", "current", "path"):
        prev.add_column(col)
    for p in info["previews"]:
        prev.add_row(str(p["target_step"]), _fmt(p["from_step"]), "yes" if p["current"] else "no", p["path"])
    console.print(prev)


def _render_evaluations(ev: dict[str, Any], console: Console) -> None:
    if ev.get("error"):
        console.print(f"[red]evaluation ledger: {ev['error']}[/red]")
    if not ev.get("recent"):
        return
    figures = Table(title="evaluations (--eval): what to believe", show_header=False)
    figures.add_column("key", style="bold")
    figures.add_column("value")
    ckpt = ev.get("checkpoint") or {}
    figures.add_row(
        "newest evaluated checkpoint", f"step {_fmt(ckpt.get('step'))}: {_fmt(ckpt.get('score'))}"
    )
    for h, r in sorted(ev["realized"].items()):
        figures.add_row(
            f"realized at {h}",
            f"advantage {_fmt(r['advantage'])}, share of training's gain {_fmt(r['gain_share'])}",
        )
    for t, r in sorted(ev["leads"].items()):
        figures.add_row(
            f"lead of {t}", f"{_fmt(r['lead'])} ({r['streak']} positive in a row, horizon {r['horizon']})"
        )
    console.print(figures)
    table = Table(title="newest evaluations")
    for col in ("kind", "step", "made from", "target", "status", "score", "lead", "realized share"):
        table.add_column(col)
    for r in ev["recent"]:
        real = r.get("realized") or {}
        table.add_row(
            r["kind"],
            str(r["step"]),
            str(r["made_from"]),
            r["target"] or "—",
            r["status"],
            _fmt(r.get("score")),
            _fmt(r.get("lead")),
            _fmt(real.get("gain_share")),
        )
    console.print(table)
