"""The spare sketch, paired: one steady checkpoint ingested again and again from copies of the same
state, with the spare sketch (the default) and without it (``spare_sketch=False``), alternating.

A sequence of ingests (bench/ingest.py) compares configurations on different checkpoints minutes
apart, and on this shared VM its rows scatter by ±30 %; pairing removes everything but the change.
Each trial copies the state (``cp -a``: the copy's files are then in the page cache), warms the
checkpoint and the base by reading them, and ingests the 5th checkpoint (a steady one: not an
anchor) in a fresh subprocess with the default thread count (bench/ingest.py's child). Two cases
for the spare:

- ``cached``: the spare's pages are in the page cache (a host whose RAM holds the state);
- ``evicted``: the spare is dropped from the page cache first (``POSIX_FADV_DONTNEED``) — a state
  bigger than RAM, the normal case from ~1.5B parameters on a busy host.

Without the spare nothing is evicted: the file it deletes is the old generation's sketch, which the
ingest reads in full, so it is always cached when it is released — the release this avoids.

Run alone: ``python -m bench.spare [--model 0.5b] [--rank 2] [--pairs 4]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.common import evict, markdown_table, plain_read
from bench.common import scratch_dir as scratch
from bench.ingest import MODELS, Config, ingest_child
from bench.synthetic import ModelShape, Trajectory, steps_irregular
from relexd.engine import Engine, EngineConfig
from relexd.engine.config import DEFAULT_RANK, default_workers
from relexd.state.store import SKETCH_FILE, SPARE_DIR

CASES = ("spare, cached", "spare, evicted", "no spare")


def _trial(case: str, state: Path, work: Path, base: Path, ckpt: Path, step: int, rank: int) -> float:
    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-a", str(state), str(copy)], check=True)
    spare = copy / SPARE_DIR / SKETCH_FILE
    if case == "no spare":
        spare.unlink()
    elif case == "spare, evicted":
        evict(spare)
    plain_read([ckpt / "model.safetensors", base / "model.safetensors"])
    config = Config("now", default_workers(), spare=case != "no spare")
    return float(ingest_child(config, None, copy, base, ckpt, step, rank)["ingest_s"])


def run(shape: ModelShape, rank: int, pairs: int) -> dict[str, Any]:
    """``pairs`` rounds of the three cases, in a rotating order; seconds per case."""
    traj = Trajectory(shape)
    steps = steps_irregular(5)
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    with scratch(f"spare-{shape.name}-k{rank}") as tmp:
        base = traj.write_base(tmp / "base")
        state = tmp / "state"
        with Engine(state, base, EngineConfig(rank=rank), threads=default_workers()) as engine:
            for step in steps[:4]:
                ckpt = traj.write_checkpoint(base, tmp / f"checkpoint-{step}", step)
                engine.ingest(ckpt, step)
                shutil.rmtree(ckpt)
        assert (state / SPARE_DIR / SKETCH_FILE).exists(), "the state holds no spare to compare"
        ckpt = traj.write_checkpoint(base, tmp / "checkpoint", steps[4])
        for round_ in range(pairs):
            order = CASES[round_ % 3 :] + CASES[: round_ % 3]
            for case in order:
                seconds[case].append(_trial(case, state, tmp, base, ckpt, steps[4], rank))
                print(f"round {round_ + 1}: {case}: {seconds[case][-1]:.2f} s", flush=True)
    return {"model": shape.name, "rank": rank, "seconds": seconds}


def report(result: dict[str, Any]) -> str:
    seconds = result["seconds"]
    reference = statistics.median(seconds["no spare"])
    rows = [
        [
            result["model"], result["rank"], case, len(s), statistics.median(s), min(s), max(s),
            reference / statistics.median(s),
        ]
        for case, s in seconds.items()
    ]  # fmt: skip
    headers = ["model", "rank", "case", "trials", "median s", "min s", "max s", "speed-up vs no spare"]
    trials = "\n".join(f"- {case}: " + ", ".join(f"{x:.2f}" for x in s) for case, s in seconds.items())
    return markdown_table(headers, rows) + "\n\nEvery trial (s), in round order:\n\n" + trials


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--pairs", type=int, default=4, help="rounds of the three cases")
    args = p.parse_args(argv)
    print(report(run(MODELS[args.model], args.rank, args.pairs)))


if __name__ == "__main__":
    main()
