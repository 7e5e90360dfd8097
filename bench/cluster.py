"""Ingest on a Ray cluster against this host's threads, side by side in one run.

Three configurations follow the same synthetic 0.5B-shaped run (bench/synthetic.py), each with its
own state directory, interleaved checkpoint by checkpoint (so the machine's noise hits all alike):

* **2 local threads** — ``Engine(threads=2)``, what ``relexd watch --threads 2`` runs;
* **1 Ray worker** and **2 Ray workers** — ``relexd watch --ray`` with one single-threaded
  :class:`~relexd.cluster.worker.PartWorker` actor per worker, on a local Ray cluster
  (``ray start --head``) of this machine. The coordinator is this process, as the daemon is.

Per ingest: the coordinator's wall time, and each worker's own part time (read, update, write,
fsync its part file), from which the coordinator's share (wait, combine, commit) follows. The
floor of the comparison is the 2-thread local engine: on one 2-core host a cluster cannot beat it;
what the Ray rows measure is what the cluster path costs on top (process boundary, results sent
back, part files), and how evenly the parts split — the figures the scaling paragraph of
bench/README.md extrapolates from.

The local cluster offers 4 logical CPUs (``--num-cpus 4``) so that the 1- and 2-worker
configurations' actors stay placed side by side; each worker still computes with one thread, and
the configurations never run at the same time.

Run: ``python -m bench.cluster [--checkpoints 5] [--rank 2]`` (~6 min at 0.5B).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported (README "On a Ray cluster")

from bench.common import machine, markdown_table, scratch_dir
from bench.synthetic import QWEN25_05B, ModelShape, Trajectory, steps_irregular
from relexd.cluster.coordinator import WorkerStatus
from relexd.engine import Engine, EngineConfig
from relexd.engine.config import DEFAULT_RANK
from relexd.math.confidence import is_anchor_count

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("2 local threads", "1 Ray worker", "2 Ray workers")


def _engine(
    name: str, state: Path, base: Path, config: EngineConfig, on_part: Callable[[WorkerStatus], None]
) -> Engine:
    if name == "2 local threads":
        return Engine(state, base, config, threads=2)
    from relexd.cluster.ray_backend import ClusterSettings, ray_tensors

    workers = 1 if name == "1 Ray worker" else 2
    settings = ClusterSettings(workers=workers, cpus_per_worker=1.0, threads_per_worker=1, timeout_s=1800)
    return Engine(state, base, config, backend=ray_tensors(settings, base, config, state, on_part=on_part))


def run(checkpoints: int, rank: int, shape: ModelShape = QWEN25_05B) -> dict[str, Any]:
    import ray

    from tests.cluster.ray_cluster import local_cluster  # the tests' local cluster, started alike

    traj = Trajectory(shape)
    config = EngineConfig(rank=rank)
    records: list[dict[str, Any]] = []
    with scratch_dir("cluster") as tmp, local_cluster(tmp, cpus=4) as address, ExitStack() as stack:
        ray.init(address=address, namespace="relexd-bench", log_to_driver=False)
        stack.callback(ray.shutdown)
        base = traj.write_base(tmp / "base")
        parts: dict[str, list[WorkerStatus]] = {name: [] for name in CONFIGS}
        engines = {
            name: stack.enter_context(
                _engine(name, tmp / f"state-{i}", base, config,
                        lambda s, n=name: parts[n].append(dataclasses.replace(s)))
            )
            for i, name in enumerate(CONFIGS)
        }  # fmt: skip
        for n, step in enumerate(steps_irregular(checkpoints), start=1):
            ckpt = traj.write_checkpoint(base, tmp / f"checkpoint-{step}", step)
            for name, engine in engines.items():
                parts[name].clear()
                started = time.perf_counter()
                engine.ingest(ckpt, step)
                wall = time.perf_counter() - started
                seconds = [p.last_seconds for p in parts[name] if p.last_seconds is not None]
                records.append(
                    {
                        "config": name,
                        "n": n,
                        "anchor": is_anchor_count(n),
                        "ingest_s": wall,
                        "parts_s": seconds,
                    }
                )
                print(
                    f"{name:>16}  ckpt {n}  {wall:7.2f} s  parts {[round(s, 2) for s in seconds]}", flush=True
                )
            for path in ckpt.iterdir():
                path.unlink()
            ckpt.rmdir()
        partition = engines["2 Ray workers"].snapshot.meta["partition"]["parts"]
        shapes = traj.shape.specs()
        numels = [sum(math.prod(shapes[t]) for t in part) for part in partition]
    return {"records": records, "rank": rank, "numels": numels, "params": shape.params, "shape": shape.name}


def report(result: dict[str, Any]) -> str:
    steady = [r for r in result["records"] if r["n"] >= 2 and not r["anchor"]]
    anchors = [r for r in result["records"] if r["n"] >= 2 and r["anchor"]]
    mean = {c: statistics.mean(r["ingest_s"] for r in steady if r["config"] == c) for c in CONFIGS}
    local = mean["2 local threads"]
    rows = []
    for c in CONFIGS:
        mine = [r for r in steady if r["config"] == c]
        part_max = [max(r["parts_s"]) for r in mine if r["parts_s"]]
        part_min = [min(r["parts_s"]) for r in mine if r["parts_s"]]
        coord = [r["ingest_s"] - max(r["parts_s"]) for r in mine if r["parts_s"]]
        anchor = [r["ingest_s"] for r in anchors if r["config"] == c]
        rows.append([
            c, len(mine), mean[c], mean[c] / local,
            statistics.mean(part_max) if part_max else "—",
            statistics.mean(part_min) if part_min else "—",
            statistics.mean(coord) if coord else "—",
            statistics.mean(anchor) if anchor else "—",
        ])  # fmt: skip
    numels = result["numels"]
    split = f"{numels[0] / 1e6:.0f}M / {numels[1] / 1e6:.0f}M elements ({max(numels) / min(numels):.3f}×)"
    headers = [
        "configuration", "steady ckpts", "ingest s", "ratio to 2 local threads", "slowest part s",
        "fastest part s", "coordinator s (ingest − slowest part)", "anchor ckpt s",
    ]  # fmt: skip
    text = (
        f"model shape {result['shape']} ({result['params'] / 1e6:.0f}M parameters, bf16), "
        f"rank {result['rank']}; "
        f"the 2 Ray workers' parts: {split}\n\n"
        + markdown_table(headers, rows)
        + "\n\nSteady state = checkpoints ≥ 2 that make no anchor. Raw records:\n\n"
        + markdown_table(
            ["configuration", "ckpt #", "anchor", "ingest s", "parts s"],
            [
                [
                    r["config"],
                    r["n"],
                    "yes" if r["anchor"] else "",
                    r["ingest_s"],
                    ", ".join(f"{s:.2f}" for s in r["parts_s"]),
                ]
                for r in result["records"]
            ],
        )
    )
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--quick", action="store_true", help="a small shape (seconds), to try it out")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "full" / "cluster.md")
    args = p.parse_args(argv)
    started = time.perf_counter()
    shape = QWEN25_05B.smaller(2, 16384) if args.quick else QWEN25_05B
    text = report(run(args.checkpoints, args.rank, shape))
    text += f"\n\n_cluster: {time.perf_counter() - started:.0f} s wall; {machine()}_\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
