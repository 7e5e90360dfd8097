"""Ingest cost per checkpoint vs merely reading the same bytes; peak RSS; state size on disk.

For each checkpoint of a synthetic run (bench/synthetic.py) the parent process

1. writes the checkpoint (not timed),
2. notes how much of checkpoint + base + current sketch is in the page cache (``fincore``),
3. reads those files once, sequentially, in 16 MiB blocks (the read floor),
4. ingests the checkpoint in a fresh subprocess (``python -m bench.ingest child …``) which reports
   the engine's seconds and its own peak RSS (VmHWM),
5. records the state's bytes on disk and deletes the checkpoint.

At the end one write floor is taken: writing and fsync'ing as many bytes as the new sketch holds.
Run alone: ``python -m bench.ingest [--model 0.5b|1.5b] [--rank K] [--checkpoints N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import MB, cached_fraction, markdown_table, plain_read, scratch_dir, vm_hwm_bytes
from bench.synthetic import QWEN25_05B, QWEN25_15B, ModelShape, Trajectory, steps_irregular
from relexd.engine.config import DEFAULT_RANK

MODELS = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B}
HEADERS = [
    "model",
    "rank",
    "ckpt #",
    "step",
    "ingest s",
    "plain read s",
    "ingest / read",
    "read GB",
    "read MB/s",
    "ingest MB/s",
    "cached",
    "peak RSS MB",
    "RSS / largest f32",
    "state GB",
]


def current_sketch(state: Path) -> Path | None:
    """The published generation's sketch file, or None for a fresh state."""
    try:
        gen = json.loads((state / "CURRENT").read_text())["generation"]
    except FileNotFoundError:
        return None
    path = state / "generations" / gen / "sketch.safetensors"
    return path if path.exists() else None


def child(state: Path, base: Path, ckpt: Path, step: int, estimator: str, rank: int) -> dict[str, Any]:
    """Run in the subprocess: open the engine, ingest one checkpoint, report time and VmHWM."""
    from relexd.engine import Engine, EngineConfig

    t0 = time.perf_counter()
    engine = Engine(state, base, EngineConfig(estimator=estimator, rank=rank))
    opened = time.perf_counter() - t0
    try:
        report = engine.ingest(ckpt, step)
    finally:
        engine.close()
    return {
        "open_s": opened,
        "ingest_s": report.seconds,
        "bytes_read": report.bytes_read,
        "energy": report.figures.get("rank1_energy_ratio"),
        "vm_hwm": vm_hwm_bytes(),
    }


def write_floor(nbytes: int, directory: Path) -> float:
    """Seconds to write and fsync ``nbytes`` (16 MiB blocks of zeros) — the sketch's write floor."""
    block = bytes(16 << 20)
    path = directory / "write-floor.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        os.fsync(f.fileno())
    took = time.perf_counter() - start
    path.unlink()
    return took


def run(
    shape: ModelShape, rank: int, checkpoints: int, estimator: str = "brand", keep_state: Path | None = None
) -> dict[str, Any]:
    """Benchmark ``checkpoints`` ingests; returns rows for :data:`HEADERS` and a summary.

    With ``keep_state`` the final state and base are moved there (for the preview benchmark).
    """
    from relexd.state.store import disk_usage

    traj = Trajectory(shape)
    rows: list[list[Any]] = []
    largest_f32 = shape.largest * 4
    with scratch_dir(f"ingest-{shape.name}-k{rank}") as tmp:
        base = traj.write_base(tmp / "base")
        state = tmp / "state"
        for n, step in enumerate(steps_irregular(checkpoints), start=1):
            ckpt = traj.write_checkpoint(base, tmp / f"checkpoint-{step}", step)
            sketch = current_sketch(state)
            files = [ckpt / "model.safetensors", base / "model.safetensors", *([sketch] if sketch else [])]
            cached = cached_fraction(files)
            nbytes, read_s = plain_read(files)
            cmd = [sys.executable, "-m", "bench.ingest", "child", str(state), str(base), str(ckpt)]
            cmd += [str(step), estimator, str(rank)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            state_bytes = disk_usage(state)
            rows.append(
                [
                    shape.name,
                    rank,
                    n,
                    step,
                    rec["ingest_s"],
                    read_s,
                    rec["ingest_s"] / read_s,
                    nbytes / 1e9,
                    nbytes / MB / read_s,
                    nbytes / MB / rec["ingest_s"],
                    f"{cached:.0%}" if cached is not None else "?",
                    rec["vm_hwm"] / MB,
                    rec["vm_hwm"] / largest_f32,
                    state_bytes / 1e9,
                ]
            )
            print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
            shutil.rmtree(ckpt)
        sketch = current_sketch(state)
        sketch_bytes = sketch.stat().st_size if sketch else 0
        floor_s = write_floor(sketch_bytes, tmp)
        if keep_state is not None:
            keep_state.mkdir(parents=True, exist_ok=True)
            shutil.move(str(state), keep_state / "state")
            shutil.move(str(base), keep_state / "base")
    steady = rows[1:] or rows  # the first ingest has no old sketch to read
    return {
        "rows": rows,
        "model": shape.name,
        "params": shape.params,
        "rank": rank,
        "largest_f32_mb": largest_f32 / MB,
        "sketch_bytes": sketch_bytes,
        "write_floor_s": floor_s,
        "mean_ratio_steady": sum(r[6] for r in steady) / len(steady),
        "mean_ingest_s_steady": sum(r[4] for r in steady) / len(steady),
        "state_gb_last": rows[-1][-1],
        "bytes_per_param_state": rows[-1][-1] * 1e9 / shape.params,
    }


def report(results: list[dict[str, Any]]) -> str:
    """Markdown: the per-checkpoint table and one summary line per configuration."""
    rows = [r for res in results for r in res["rows"]]
    summary = markdown_table(
        [
            "model",
            "params",
            "rank",
            "mean ingest s (ckpt ≥ 2)",
            "mean ingest / read",
            "sketch write+fsync floor s",
            "largest tensor f32 MB",
            "max peak RSS MB",
            "final state GB",
            "state bytes / param",
        ],
        [
            [
                r["model"],
                f"{r['params'] / 1e6:.0f} M",
                r["rank"],
                r["mean_ingest_s_steady"],
                r["mean_ratio_steady"],
                r["write_floor_s"],
                r["largest_f32_mb"],
                max(row[11] for row in r["rows"]),
                r["state_gb_last"],
                r["bytes_per_param_state"],
            ]
            for r in results
        ],
    )
    return markdown_table(HEADERS, rows) + "\n\n" + summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        state, base, ckpt, step, estimator, rank = argv[1:7]
        rec = child(Path(state), Path(base), Path(ckpt), int(step), estimator, int(rank))
        print(json.dumps(rec))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--checkpoints", type=int, default=4)
    args = p.parse_args(argv)
    print(report([run(MODELS[args.model], args.rank, args.checkpoints)]))


if __name__ == "__main__":
    main()
