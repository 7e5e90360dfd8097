"""What the commit of one generation costs beside its tensors: the small arrays and meta.json.

Every ingest ends with :meth:`relexd.state.store.Transaction.commit`, on the calling thread and
with no worker running: it writes ``small.safetensors`` (three float64 arrays per tensor) and
``meta.json`` (per-tensor figures, history, forecasts), fsyncs them and publishes. Its cost grows
with the number of tensors, not their size, so it weighs most on models of many small tensors (a
LoRA adapter's hundreds of matrices).

A model of Qwen2.5-0.5B's 290 tensors, each at most 16 K elements (``bench.per_tensor``'s), is
ingested ``--checkpoints`` times by relexd's engine in this process; the median time of its
steady commits is reported. Then the last generation's arrays and meta are serialised side by side,
each way ``--rounds`` times (no file system involved, no fsync): the way relexd writes them and
the way it wrote them before, so the choice stands on a measurement of the same data.

Run: ``python -m bench.state_commit [--checkpoints 24] [--rounds 20]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import safetensors.numpy
import safetensors.torch

from bench.common import machine, markdown_table
from bench.common import scratch_dir as scratch
from bench.per_tensor import TINY, WARM
from bench.synthetic import Trajectory
from relexd.engine import Engine, EngineConfig
from relexd.math.confidence import is_anchor_count
from relexd.state import store


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm
    return 1e3 * statistics.median(timeit.repeat(fn, repeat=rounds, number=1))


def run(checkpoints: int, rounds: int) -> str:
    commits: list[float] = []
    original = store.Transaction.commit

    def timed(self: store.Transaction, *args: object, **kwargs: object) -> store.Snapshot:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            commits.append(time.perf_counter() - start)

    with scratch("state-commit") as tmp:
        traj = Trajectory(TINY)
        base = traj.write_base(tmp / "base")
        store.Transaction.commit = timed  # type: ignore[method-assign]
        try:
            with Engine(tmp / "state", base, EngineConfig()) as engine:
                steady = []
                for n in range(1, checkpoints + 1):
                    engine.ingest(traj.write_checkpoint(base, tmp / "ckpt", 10 * n), 10 * n)
                    if n > WARM and not is_anchor_count(n):
                        steady.append(commits[-1])
                snapshot = engine.snapshot
        finally:
            store.Transaction.commit = original  # type: ignore[method-assign]
        generation = Path(snapshot.root) / "generations" / snapshot.name
        arrays = safetensors.torch.load_file(str(generation / store.SMALL_FILE))
        meta = json.loads((generation / store.META_FILE).read_text())
    rows = [
        ("small arrays", "safetensors.numpy (relexd)", _median_ms(
            lambda: safetensors.numpy.save({k: t.numpy() for k, t in arrays.items()}), rounds)),
        ("small arrays", "safetensors.torch (before)", _median_ms(
            lambda: safetensors.torch.save(arrays), rounds)),
        ("meta.json", "compact (relexd)", _median_ms(lambda: json.dumps(meta, sort_keys=True), rounds)),
        ("meta.json", "indent=1 (before)", _median_ms(
            lambda: json.dumps(meta, indent=1, sort_keys=True), rounds)),
    ]  # fmt: skip
    table = markdown_table(["what", "how", "median ms"], [(w, h, f"{ms:.1f}") for w, h, ms in rows])
    return (
        f"# The commit of a generation: {len(TINY.specs())} tensors ({len(arrays)} small arrays, "
        f"meta.json {len(json.dumps(meta, sort_keys=True)) / 1e3:.0f} KB)\n\n{machine()}\n\n"
        f"`python -m bench.state_commit --checkpoints {checkpoints} --rounds {rounds}`\n\n"
        f"Median commit of the {len(steady)} steady ingests (write, fsync, publish, drop the old "
        f"generation): **{1e3 * statistics.median(steady):.1f} ms**.\n\n"
        f"Serialising the last generation's, in memory, median of {rounds}:\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=24)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args(argv)
    print(run(a.checkpoints, a.rounds))


if __name__ == "__main__":
    main()
