"""Ingest time of the same checkpoint in each format relexd reads, against HF safetensors.

``python -m bench.formats [--layers L] [--vocab V]`` writes steps 1 and 2 of one model in every
format (bench/format_writer.py, two gloo ranks for the sharded ones), then, per format, ingests
step 1 and times step 2 (the steady state: reads the old sketch, writes the new one) in one
process, formats interleaved over two rounds; the ratio is to HF safetensors in the same round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import dir_bytes, markdown_table, scratch_dir
from relexd.engine.config import EngineConfig
from relexd.engine.engine import Engine

FORMATS = ("hf", "verl", "dcp", "nemo", "deepspeed")
ROUNDS = 2


def run(layers: int = 4, vocab: int = 32768) -> dict[str, object]:
    with scratch_dir("formats") as tmp:
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run(
            [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "bench.format_writer", str(tmp),
             str(layers), str(vocab)],
            check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        for round_ in range(ROUNDS):
            for fmt in FORMATS:
                state = tmp / f"state-{fmt}-{round_}"
                with Engine(state, tmp / "base", EngineConfig(), threads=1) as engine:
                    engine.ingest(tmp / fmt / "step_1", 1)
                    started = time.perf_counter()
                    engine.ingest(tmp / fmt / "step_2", 2)
                    times[fmt].append(time.perf_counter() - started)
        sizes = {f: dir_bytes(tmp / f / "step_2") for f in FORMATS}
    hf = statistics.median(times["hf"])
    rows = [
        [
            f,
            f"{sizes[f] / 1e6:.0f}",
            f"{statistics.median(times[f]):.2f}",
            f"{statistics.median(times[f]) / hf:.2f}",
        ]
        for f in FORMATS
    ]
    return {"layers": layers, "vocab": vocab, "rows": rows}


def report(result: dict[str, object]) -> str:
    head = (
        f"Qwen2.5-0.5B layer shapes, {result['layers']} layers, vocabulary {result['vocab']}, bf16; "
        f"steady-state ingest (step 2) at the default rank, one thread, median of {ROUNDS} rounds.\n\n"
    )
    cols = ["format", "checkpoint MB on disk", "ingest s", "ratio to HF safetensors"]
    return head + markdown_table(cols, result["rows"])  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    args = p.parse_args()
    print(report(run(args.layers, args.vocab)))


if __name__ == "__main__":
    main()
