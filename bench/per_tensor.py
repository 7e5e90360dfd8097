"""The fixed cost of a tensor: today's engine against an earlier one on a model of many tiny tensors.

Every tensor's task does the same Python work whatever its size (plan the small SVD, fit the line,
open and advise its chunks, hand its results back), and that work holds the GIL, so it does not
get faster with more workers. A model of Qwen2.5-0.5B's 290 tensors shrunk to at most 16 K elements
each makes that cost the whole ingest; so does a LoRA adapter's hundreds of small matrices.

Both engines run in their own process (``relexd watch`` holds its engine so), each on its own
state, and ingest the same fresh checkpoints in turn, at relexd's default workers. The first
ingests build the state and anchor checkpoints also write an anchor: both are left out of the
medians.

Run alone: ``python -m bench.per_tensor [--before REV] [--checkpoints 24] [--rank 2]``.
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import machine, markdown_table
from bench.common import scratch_dir as scratch
from bench.ingest import Config, EngineChild, before_tree
from bench.synthetic import ModelShape, Trajectory
from relexd.engine.config import DEFAULT_RANK, default_workers
from relexd.math.confidence import is_anchor_count

#: Qwen2.5-0.5B's layer count and tensor names, every tensor at most 16 K elements
TINY = ModelShape("qwen2.5-0.5b-tiny", 24, 64, 128, 2, 1, 32, 256)
WARM = 4  # ingests that build the state, left out


def run(before: str, checkpoints: int, rank: int) -> str:
    tensors = len(TINY.specs())
    times: dict[str, list[float]] = {"before": [], "now": []}
    cpu: dict[str, list[float]] = {"before": [], "now": []}
    with scratch("per-tensor") as tmp, before_tree(before) as tree:
        traj = Trajectory(TINY)
        base = traj.write_base(tmp / "base")
        configs = {e: Config(e, default_workers()) for e in times}
        children = {e: EngineChild(c, tree, tmp / f"state-{e}", base, rank) for e, c in configs.items()}
        try:
            for n in range(1, checkpoints + 1):
                ckpt = traj.write_checkpoint(base, tmp / "ckpt", 10 * n)
                order = ("before", "now") if n % 2 else ("now", "before")  # alternate who goes first
                for engine in order:
                    rec = children[engine].ingest(ckpt, 10 * n)
                    if n > WARM and not is_anchor_count(n):
                        times[engine].append(rec["ingest_s"])
                        cpu[engine].append(rec["cpu_user"] + rec["cpu_sys"])
        finally:
            for child in children.values():
                child.close()
    rows = []
    for engine in ("before", "now"):
        med = statistics.median(times[engine])
        rows.append(
            (
                f"before ({before})" if engine == "before" else "now",
                len(times[engine]),
                f"{med * 1e3:.0f}",
                f"{statistics.median(cpu[engine]) * 1e3:.0f}",
                f"{med * 1e3 / tensors:.2f}",
                f"{statistics.median(times['before']) / med:.2f}×",
            )
        )
    table = markdown_table(
        ["engine", "ingests", "median ms", "median CPU ms", "ms per tensor", "speed-up vs before"], rows
    )
    return (
        f"# The fixed cost per tensor: {tensors} tensors of at most 16 K elements, rank {rank}\n\n"
        f"{machine()}\n\n`python -m bench.per_tensor --before {before} --checkpoints {checkpoints} "
        f"--rank {rank}` (relexd's default workers, {default_workers()} threads here; steady ingests "
        f"only; per tensor: the ingest's time over its {tensors} tensors)\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the earlier engine's git revision")
    p.add_argument("--checkpoints", type=int, default=24)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    a = p.parse_args(argv)
    print(run(a.before, a.checkpoints, a.rank))


if __name__ == "__main__":
    main()
