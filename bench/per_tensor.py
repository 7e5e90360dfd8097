"""The fixed cost of a tensor: today's engine against an earlier one on a model of many tiny tensors.

Every tensor's task does the same Python work whatever its size (plan the small SVD, fit the line,
open and advise its chunks, hand its results back), and that work holds the GIL, so it does not
get faster with more workers. A model of Qwen2.5-0.5B's 290 tensors shrunk to at most 16 K elements
each makes that cost the whole ingest; so does a LoRA adapter's hundreds of small matrices.

Both engines run in their own process (``relexd watch`` holds its engine so), each on its own
state, and ingest the same fresh checkpoints in turn, at relexd's default workers. The first
ingests build the state and anchor checkpoints also write an anchor: both are left out of the
medians.

``--model lora`` keeps the names but lets tensors grow to 80 K elements (81 920; LoRA adapters' sizes: rank
16 on a 0.5B model's matrices gives 14-78 K), still mostly fixed cost. ``--model peft`` is such an
adapter as peft itself saves it (:class:`bench.peft_adapters.PeftRun`): rank 16 on every linear layer of a
Qwen2.5-0.5B-shaped model, 336 tensors, each checkpoint read by relexd's peft path.

Run alone: ``python -m bench.per_tensor [--before REV] [--checkpoints 24] [--rank 2] [--model tiny]``.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

from bench.common import machine, markdown_table
from bench.common import scratch_dir as scratch
from bench.ingest import Config, EngineChild, before_tree
from bench.synthetic import ModelShape, Trajectory
from relexd.engine.config import DEFAULT_RANK, default_workers
from relexd.math.confidence import is_anchor_count

#: Qwen2.5-0.5B's layer count and tensor names, every tensor at most 16 K elements
TINY = ModelShape("qwen2.5-0.5b-tiny", 24, 64, 128, 2, 1, 32, 256)
#: the same names, every tensor at most 80 K (81 920) elements
LORA_SIZED = ModelShape("qwen2.5-0.5b-lora-sized", 24, 256, 320, 4, 1, 64, 256)
SHAPES = {"tiny": TINY, "lora": LORA_SIZED}
MODELS = [*SHAPES, "peft"]  # peft: bench.peft_adapters
WARM = 4  # ingests that build the state, left out


def run(before: str, checkpoints: int, rank: int, model: str = "tiny") -> str:
    times: dict[str, list[float]] = {"before": [], "now": []}
    cpu: dict[str, list[float]] = {"before": [], "now": []}
    with scratch("per-tensor") as tmp, before_tree(before) as tree:
        if model == "peft":
            from bench.peft_adapters import PeftRun  # needs the test extras (peft, transformers)

            peft = PeftRun(tmp)
            base, shapes = peft.base, peft.shapes()
            write = functools.partial(peft.checkpoint, tmp / "ckpt")
        else:
            shape = SHAPES[model]
            traj = Trajectory(shape)
            base, shapes = traj.write_base(tmp / "base"), list(shape.specs().values())
            write = functools.partial(traj.write_checkpoint, base, tmp / "ckpt")
        tensors = len(shapes)
        largest = max(math.prod(dims) for dims in shapes)
        configs = {e: Config(e, default_workers()) for e in times}
        children = {e: EngineChild(c, tree, tmp / f"state-{e}", base, rank) for e, c in configs.items()}
        try:
            for n in range(1, checkpoints + 1):
                ckpt = write(10 * n)
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
        f"# The fixed cost per tensor ({model}): {tensors} tensors of at most "
        f"{largest / 1024:.0f} K elements, rank {rank}\n\n{machine()}\n\n"
        f"`python -m bench.per_tensor --before {before} "
        f"--checkpoints {checkpoints} --rank {rank} --model {model}` (relexd's default workers, "
        f"{default_workers()} threads here; steady ingests only; per tensor: the ingest's time over "
        f"its {tensors} tensors)\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the earlier engine's git revision")
    p.add_argument("--checkpoints", type=int, default=24)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    a = p.parse_args(argv)
    print(run(a.before, a.checkpoints, a.rank, a.model))


if __name__ == "__main__":
    main()
