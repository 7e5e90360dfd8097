"""What relexd costs the training job it follows, and how far behind it stays (issue 14).

A real training loop — the demo's RL trainer (GRPO on addition, relexd.demo.train), using every
core and saving a Hugging Face checkpoint after *every* step (the densest cadence a trainer has) —
runs a fixed number of steps alone, and with ``relexd watch`` following it in each configuration
of :data:`VARIANTS`; the order turns every round so that drift of the shared machine falls on every
side. relexd runs with the unit's priorities: ``nice -n 10`` (Nice=10) and ``ionice -c 2 -n 7``
(IOSchedulingClass=best-effort, IOSchedulingPriority=7). CPUWeight=50 needs a cgroup and has no
equivalent outside systemd, so under the unit the cost can only be lower.

Reported: the trainer's median step time beside relexd over alone in the same round (1.00 is the
floor: no cost), relexd's CPU time per checkpoint, and its lag — from the trainer completing a
checkpoint to relexd committing it (what ``relexd_ingest_lag_seconds`` publishes) — with how many
checkpoints it was behind the newest one at each commit.

    python -m bench.beside_trainer [--steps 80] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.common import machine, markdown_table, scratch_dir
from relexd.engine.cores import available_cores

PRIORITY = ["nice", "-n", "10", "ionice", "-c", "2", "-n", "7"]
ALONE = "alone"
#: relexd configurations measured beside the trainer (name → extra ``relexd watch`` options): the
#: defaults, and the levers README "Keeping up" names for a host short of CPU.
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "--threads 1": ["--threads", "1"],
    "--threads 1 --every 4": ["--threads", "1", "--every", "4"],
}
WARMUP_STEPS = 3  # first steps pay one-off costs (allocator, page cache): not in the medians


@dataclass
class TrainerRun:
    variant: str  # ALONE or a key of VARIANTS
    step_seconds: list[float]
    completed_at: list[float]  # Unix time each step's checkpoint was complete
    lags: list[float] = field(default_factory=list)  # per ingested checkpoint, s
    behind: list[int] = field(default_factory=list)  # checkpoints newer than the one committed
    ingested: int = 0
    catch_up: float | None = None  # s from the newest checkpoint relexd took to its commit
    cpu_seconds: float = 0.0  # relexd's user + system CPU time while following the run

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds[WARMUP_STEPS:])


def _train(run_dir: Path, steps: int, threads: int) -> None:
    """The trainer process: one JSON line per finished step (its seconds and completion time)."""
    from relexd.demo.train import StepInfo, train_run

    def report(info: StepInfo) -> None:
        print(json.dumps({"step": info.step, "seconds": info.seconds, "done": time.time()}), flush=True)

    train_run(run_dir, steps=steps, num_threads=threads, on_step=report)


def _relexd(run_dir: Path, state: Path, log: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    relexd = Path(sys.executable).with_name("relexd")
    args = [str(relexd), "watch", str(run_dir), "--base", str(run_dir / "base"), "--state-dir", str(state)]
    args += ["--preview-ahead", "2", "--listen", "", "--log-format", "json", *extra]
    with log.open("wb") as out:
        return subprocess.Popen([*PRIORITY, *args], stdout=out, stderr=out)


def _events(log: Path) -> list[dict]:
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _wait_for(log: Path, event: str, step: int | None = None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("event") == event and (step is None or e.get("step") == step) for e in _events(log)):
            return
        time.sleep(0.1)
    raise RuntimeError(f"relexd never logged {event!r} (step {step}); see {log}")


def _last_ingested(steps: int, extra: list[str]) -> int:
    """The step relexd ends on: the last one, or with --every N the last of 1, 1+N, 1+2N, …"""
    every = int(extra[extra.index("--every") + 1]) if "--every" in extra else 1
    return steps - (steps - 1) % every


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (proc(5): fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(tmp: Path, base: Path, steps: int, threads: int, variant: str) -> TrainerRun:
    run_dir, state, log = tmp / "run", tmp / "state", tmp / "relexd.log"
    for path in (run_dir, state):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, run_dir / "base")
    extra = VARIANTS.get(variant, [])
    daemon = None if variant == ALONE else _relexd(run_dir, state, log, extra)
    try:
        started_cpu = 0.0
        if daemon is not None:
            _wait_for(log, "first scan done", timeout=120)
            started_cpu = _cpu_seconds(daemon.pid)  # start-up (imports, base model) not counted
        cmd = [sys.executable, "-m", "bench.beside_trainer", "_train", str(run_dir), str(steps), str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
        run = TrainerRun(variant, [r["seconds"] for r in rows], [r["done"] for r in rows])
        if daemon is not None:
            _wait_for(log, "checkpoint ingested", step=_last_ingested(steps, extra), timeout=600)
            run.cpu_seconds = _cpu_seconds(daemon.pid) - started_cpu
            _lag_figures(run, _events(log))
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    return run


def _lag_figures(run: TrainerRun, events: list[dict]) -> None:
    for e in events:
        if e.get("event") != "checkpoint ingested":
            continue
        committed = datetime.fromisoformat(e["timestamp"]).timestamp()
        run.ingested += 1
        if e.get("lag_s") is not None:
            run.lags.append(float(e["lag_s"]))
        run.behind.append(sum(1 for t in run.completed_at if t <= committed) - int(e["step"]))
        run.catch_up = committed - run.completed_at[int(e["step"]) - 1]


def run(
    steps: int = 80, rounds: int = 3, threads: int | None = None, variants: list[str] | None = None
) -> list[TrainerRun]:
    from relexd.demo.bases import ensure_base

    threads = threads or available_cores()
    names = [ALONE, *(variants or VARIANTS)]
    results: list[TrainerRun] = []
    with scratch_dir("beside") as tmp:
        base = tmp / "base"
        ensure_base(base, 0)  # the demo's shipped base model
        for r in range(rounds):
            for variant in names[r % len(names) :] + names[: r % len(names)]:
                results.append(one_run(tmp, base, steps, threads, variant))
                print(f"round {r + 1}: {variant}: {results[-1].median_step:.3f} s/step", flush=True)
    return results


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: list[TrainerRun], steps: int, threads: int) -> str:
    names = list(dict.fromkeys(r.variant for r in results))
    rounds = [results[i : i + len(names)] for i in range(0, len(results), len(names))]
    by_round = [{r.variant: r for r in chunk} for chunk in rounds]
    step_rows, lag_rows = [], []
    for variant in names:
        runs = [rnd[variant] for rnd in by_round]
        medians = [r.median_step * 1000 for r in runs]
        if variant == ALONE:
            step_rows.append([variant, " / ".join(f"{m:.0f}" for m in medians), "1 (floor)", "–"])
            continue
        ratios = [rnd[variant].median_step / rnd[ALONE].median_step for rnd in by_round]
        step_rows.append(
            [
                f"`{variant}`",
                " / ".join(f"{m:.0f}" for m in medians),
                f"**{statistics.median(ratios):.2f}**",
                f"{min(ratios):.2f}–{max(ratios):.2f}",
            ]
        )
        lags = [x for r in runs for x in r.lags]
        behind = [x for r in runs for x in r.behind]
        ingested = sum(r.ingested for r in runs)
        lag_rows.append(
            [
                f"`{variant}`",
                f"{ingested}/{sum(len(r.completed_at) for r in runs)}",
                f"{sum(r.cpu_seconds for r in runs) / max(ingested, 1) * 1000:.0f}",
                f"{statistics.median(lags):.2f}",
                f"{_q(lags, 0.95):.2f}",
                f"{statistics.median(behind):.0f}",
                max(behind),
                f"{max(r.catch_up or 0.0 for r in runs):.2f}",
            ]
        )
    return "\n".join(
        [
            f"The demo's RL trainer ({steps} steps, {threads} torch threads, a 1.4 MB HF checkpoint after "
            f"every step), alone and beside `relexd watch --preview-ahead 2` run at `{' '.join(PRIORITY)}`; "
            f"{len(rounds)} rounds, the order turned each round. Step medians exclude the first "
            f"{WARMUP_STEPS} steps.",
            "",
            "Trainer step time — ratio beside/alone within a round; the floor is 1.00 (no cost):",
            "",
            markdown_table(
                ["relexd", "median step ms per round", "ratio (median)", "ratio range"], step_rows
            ),
            "",
            "relexd following the run: CPU per checkpoint it ingested, lag (trainer completes a checkpoint "
            "→ relexd commits it, `relexd_ingest_lag_seconds`), checkpoints newer than the one it just "
            "committed, and the catch-up after the trainer's last checkpoint:",
            "",
            markdown_table(
                [
                    "relexd",
                    "ingested",
                    "CPU ms/ckpt",
                    "lag median s",
                    "lag p95 s",
                    "behind median",
                    "behind max",
                    "catch-up max s",
                ],
                lag_rows,
            ),
        ]
    )


def trainer_threads() -> list[int]:
    """Both situations of a host: the trainer on every core, and the trainer leaving one core
    (what a GPU trainer's host has to spare; AllowedCPUs= in the unit can reserve it)."""
    cores = available_cores()
    return [cores, cores - 1] if cores > 1 else [cores]


def run_and_report(steps: int, rounds: int, threads: list[int], variants: list[str] | None = None) -> str:
    sections = []
    for n in threads:
        title = "every core" if n == available_cores() else f"{n} of {available_cores()} cores"
        sections.append(f"### Trainer on {title}\n\n" + report(run(steps, rounds, n, variants), steps, n))
    return "\n\n".join(sections)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (alone, each variant)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="trainer's torch threads (default: all cores, then one fewer)",
    )
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: all")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    started = time.perf_counter()
    threads = [args.threads] if args.threads else trainer_threads()
    text = run_and_report(args.steps, args.rounds, threads, args.variants)
    text += (
        f"\n\n_`python -m bench.beside_trainer --steps {args.steps} --rounds {args.rounds}`: "
        f"{time.perf_counter() - started:.0f} s wall; {machine()}_\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        _train(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
