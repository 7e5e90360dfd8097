"""Today's engine against an earlier one, paired: one steady checkpoint ingested again and again
from copies of the same state, the two engines alternating.

A sequence of ingests (bench/ingest.py) compares engines on different checkpoints minutes apart,
and on a shared VM its rows scatter by ±30 %; pairing leaves only the change. The state is built
once (four checkpoints of the synthetic run, default worker count), then each trial:

1. copies it (``cp -a``), syncs, and drops the source's pages from the page cache;
2. ``cached``: reads every file of the copy, so the old sketch, the spare and the anchors are
   resident (a host whose RAM holds the state, as it does at 0.5B on 24 GB); ``evicted``: drops
   the copy's pages instead (a state larger than RAM, the normal case from ~1.5B parameters);
3. warms the checkpoint and the base, and ingests the 5th checkpoint (steady: not an anchor) in a
   fresh subprocess with the default thread count (bench/ingest.py's child, ``spare`` default).

The earlier engine is ``--before REV`` checked out into a git worktree (bench/ingest.py).

Run alone: ``python -m bench.paired [--model 0.5b] [--rank 2] [--rounds 3] [--before REV]
[--modes cached evicted]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.common import evict, markdown_table, plain_read
from bench.common import scratch_dir as scratch
from bench.ingest import MODELS, Config, before_tree, ingest_child
from bench.synthetic import ModelShape, Trajectory, steps_irregular
from relexd.engine import Engine, EngineConfig
from relexd.engine.config import DEFAULT_RANK, default_workers

#: the engine before the fused pass 1 and the read-ahead hints (issue 12, 3 Dec)
BEFORE_REV = "35d14cc"
MODES = ("cached", "evicted")


def _files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def _evict(root: Path) -> None:
    for path in _files(root):
        evict(path)


def _trial(
    engine: str, tree: Path | None, mode: str, tmp: Path, base: Path, ckpt: Path, step: int, rank: int
) -> float:
    state, copy = tmp / "state", tmp / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-a", str(state), str(copy)], check=True)
    os.sync()  # the copy's writeback must not run during the ingest
    _evict(state)
    if mode == "cached":
        plain_read(_files(copy))
    else:
        _evict(copy)
    plain_read([ckpt / "model.safetensors", base / "model.safetensors"])
    config = Config(engine, default_workers())
    return float(ingest_child(config, tree, copy, base, ckpt, step, rank)["ingest_s"])


def run(
    shape: ModelShape, rank: int, rounds: int, before: str, modes: tuple[str, ...] = MODES
) -> dict[str, Any]:
    """``rounds`` rounds of both engines in each of ``modes``; seconds per (mode, engine)."""
    traj = Trajectory(shape)
    steps = steps_irregular(5)
    seconds: dict[tuple[str, str], list[float]] = {(m, e): [] for m in modes for e in ("before", "now")}
    with scratch(f"paired-{shape.name}-k{rank}") as tmp, before_tree(before) as tree:
        base = traj.write_base(tmp / "base")
        with Engine(tmp / "state", base, EngineConfig(rank=rank), threads=default_workers()) as engine:
            for step in steps[:4]:
                ckpt = traj.write_checkpoint(base, tmp / f"checkpoint-{step}", step)
                engine.ingest(ckpt, step)
                shutil.rmtree(ckpt)
        ckpt = traj.write_checkpoint(base, tmp / "checkpoint", steps[4])
        for round_ in range(rounds):
            for mode in modes:
                engines = ("before", "now") if round_ % 2 == 0 else ("now", "before")
                for engine_name in engines:
                    took = _trial(engine_name, tree, mode, tmp, base, ckpt, steps[4], rank)
                    seconds[(mode, engine_name)].append(took)
                    print(f"round {round_ + 1}: {mode}, {engine_name}: {took:.2f} s", flush=True)
    return {"model": shape.name, "rank": rank, "before": before, "modes": modes, "seconds": seconds}


def report(result: dict[str, Any]) -> str:
    seconds = result["seconds"]
    rows = []
    for mode in result["modes"]:
        ref = statistics.median(seconds[(mode, "before")])
        for engine in ("before", "now"):
            s = seconds[(mode, engine)]
            label = f"before ({result['before']})" if engine == "before" else "now"
            rows.append(
                [result["model"], result["rank"], mode, label, len(s), statistics.median(s), min(s), max(s),
                 ref / statistics.median(s)]
            )  # fmt: skip
    headers = ["model", "rank", "state", "engine", "trials", "median s", "min s", "max s"]
    headers.append("speed-up vs before")
    trials = "\n".join(
        f"- {mode}, {engine}: " + ", ".join(f"{x:.2f}" for x in s) for (mode, engine), s in seconds.items()
    )
    return markdown_table(headers, rows) + "\n\nEvery trial (s), in round order:\n\n" + trials


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--rounds", type=int, default=3, help="rounds of both engines in both modes")
    p.add_argument("--before", default=BEFORE_REV, help="the earlier engine's git revision")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="page-cache regimes")
    args = p.parse_args(argv)
    print(report(run(MODELS[args.model], args.rank, args.rounds, args.before, tuple(args.modes))))


if __name__ == "__main__":
    main()
