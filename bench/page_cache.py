"""A run of steady checkpoints on one state: today's engine against an earlier one, in alternating
blocks of ingests, each of a checkpoint the "trainer" has just written (so it is in the page cache,
as a real trainer's is).

Why this and not bench.paired or bench.ingest: an ingest starts with whatever page cache the
ingests before it left, so what an engine does to the page cache shows from its second ingest in a
row on. bench.paired times one ingest from a copy of a state, and bench.ingest reads and writes
the state's size for its floors right before each ingest; neither can see it. Here the first
ingest of each block inherits the other engine's page cache: it is listed, and kept out of the
medians, as are anchor checkpoints (they also write an anchor). Each block's ingests run in one
process, as ``relexd watch`` holds its engine (since 3 Dec; a fresh process per ingest before),
so what an engine keeps between checkpoints shows too; the first of a block also makes the
process's buffers.

Per ingest: seconds, what reached the storage (the child's ``/proc/self/io``: read and write GB),
and the child's CPU time during the ingest, user and system (moving pages in and out of the page
cache is system time). The state is built with today's engine from four checkpoints; both engines
read and write the same state format.

Run alone: ``python -m bench.page_cache [--model 1.5b] [--rank 2] [--blocks 4] [--block-size 4]
[--before REV] [--idle SECONDS]``.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import time
from typing import Any

from bench.common import GB, markdown_table
from bench.common import scratch_dir as scratch
from bench.ingest import MODELS, Config, EngineChild, before_tree
from bench.synthetic import ModelShape, Trajectory
from relexd.engine import Engine, EngineConfig
from relexd.engine.config import DEFAULT_RANK, default_workers
from relexd.math.confidence import is_anchor_count

#: the engine before the replaced sketch left the page cache and the tensor order alternated
BEFORE_REV = "fe78613"
BUILD_CHECKPOINTS = 4


def run(
    shape: ModelShape, rank: int, blocks: int, block_size: int, before: str, idle: float = 0.0
) -> dict[str, Any]:
    """``blocks`` blocks of ``block_size`` ingests, "before" first, then alternating; ``idle``
    seconds between a checkpoint's arrival and its ingest (a trainer's cadence: the engine's process
    sits idle that long, and memory it freed may meanwhile go back to the host)."""
    traj = Trajectory(shape)
    steps = itertools.count(10, 10)
    records: list[dict[str, Any]] = []
    with scratch(f"page-cache-{shape.name}-k{rank}") as tmp, before_tree(before) as tree:
        base = traj.write_base(tmp / "base")
        state, ckpt_dir = tmp / "state", tmp / "checkpoint"
        with Engine(state, base, EngineConfig(rank=rank), threads=default_workers()) as engine:
            for _ in range(BUILD_CHECKPOINTS):
                step = next(steps)
                engine.ingest(traj.write_checkpoint(base, ckpt_dir, step), step)
                shutil.rmtree(ckpt_dir)
        observed = BUILD_CHECKPOINTS
        for block in range(blocks):
            config = Config(("before", "now")[block % 2], default_workers())
            with EngineChild(config, tree, state, base, rank) as child:
                for n in range(block_size):
                    step, observed = next(steps), observed + 1
                    ckpt = traj.write_checkpoint(base, ckpt_dir, step)  # the trainer's fresh checkpoint
                    time.sleep(idle)
                    rec = child.ingest(ckpt, step)
                    shutil.rmtree(ckpt_dir)
                    row = {
                        "block": block + 1,
                        "engine": config.engine,
                        "step": step,
                        "first": n == 0,
                        "anchor": is_anchor_count(observed),
                        "seconds": rec["ingest_s"],
                        "read_gb": rec["disk_read"] / GB,
                        "write_gb": rec["disk_write"] / GB,
                        "user_s": rec["cpu_user"],
                        "sys_s": rec["cpu_sys"],
                    }
                    records.append(row)
                    print(
                        f"block {row['block']} {row['engine']} step {step}: {row['seconds']:.1f} s, "
                        f"read {row['read_gb']:.1f} GB, wrote {row['write_gb']:.1f} GB, "
                        f"user {row['user_s']:.1f} s, sys {row['sys_s']:.1f} s"
                        + (" (first of block)" if n == 0 else ""),
                        flush=True,
                    )
    return {"model": shape.name, "rank": rank, "before": before, "records": records}


def report(result: dict[str, Any]) -> str:
    records = result["records"]
    headers = ["block", "engine", "step", "counted", "ingest s", "disk read GB", "disk write GB"]
    every = markdown_table(
        [*headers, "user s", "sys s"],
        [
            [r["block"], r["engine"], r["step"],
             "first of block" if r["first"] else "anchor" if r["anchor"] else "yes",
             r["seconds"], r["read_gb"], r["write_gb"], r["user_s"], r["sys_s"]]
            for r in records
        ],
    )  # fmt: skip
    steady = {
        e: [r for r in records if r["engine"] == e and not r["first"] and not r["anchor"]]
        for e in ("before", "now")
    }
    medians = {
        e: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "read_gb", "sys_s")}
        for e, rs in steady.items()
        if rs
    }
    rows = []
    for engine, m in medians.items():
        ref = medians.get("before", m)
        label = f"before ({result['before']})" if engine == "before" else "now"
        rows.append(
            [result["model"], result["rank"], label, len(steady[engine]),
             m["seconds"], m["read_gb"], m["sys_s"],
             ref["seconds"] / m["seconds"], ref["read_gb"] / m["read_gb"] if m["read_gb"] > 0.01 else None]
        )  # fmt: skip
    summary = markdown_table(
        ["model", "rank", "engine", "steady ingests", "median s", "median disk read GB", "median sys s",
         "speed-up vs before", "disk reads, before / now"],
        rows,
    )  # fmt: skip
    return summary + "\n\nEvery ingest, in order:\n\n" + every


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--blocks", type=int, default=4, help="blocks of ingests, engines alternating")
    p.add_argument("--block-size", type=int, default=4, help="ingests per block (the first is a transition)")
    p.add_argument("--before", default=BEFORE_REV, help="the earlier engine's git revision")
    p.add_argument("--idle", type=float, default=0.0, help="seconds between a checkpoint and its ingest")
    a = p.parse_args(argv)
    print(report(run(MODELS[a.model], a.rank, a.blocks, a.block_size, a.before, a.idle)))


if __name__ == "__main__":
    main()
