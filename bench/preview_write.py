"""Preview write throughput: ``Engine.write_preview`` vs ``safetensors.torch.save_file`` of the same tensors.

The engine streams θ₀ + (α+βτ)·v tensor by tensor from the base and the sketch and publishes the
preview atomically (fsync'd). The baseline gets the very same tensors already computed in memory
and only serialises them (``save_file``), then fsyncs; both timings are reported. Rounds alternate
(engine, baseline, engine, baseline) so that drift on the shared machine hits both.
Run alone: ``python -m bench.preview_write`` (builds its own 2-checkpoint 0.5B-shaped state).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from bench.common import MB, markdown_table, scratch_dir
from bench.synthetic import QWEN25_05B, ModelShape, Trajectory, steps_irregular

HEADERS = [
    "round",
    "write_preview s",
    "write_preview MB/s",
    "save_file s",
    "save_file + fsync s",
    "save_file+fsync MB/s",
    "write_preview / (save_file+fsync)",
]


def build_state(shape: ModelShape, directory: Path, checkpoints: int = 2) -> tuple[Path, Path]:
    """A state with ``checkpoints`` ingested checkpoints; returns (state dir, base dir)."""
    from relexd.engine import Engine, EngineConfig

    traj = Trajectory(shape)
    base = traj.write_base(directory / "base")
    with Engine(directory / "state", base, EngineConfig()) as engine:
        for step in steps_irregular(checkpoints):
            ckpt = traj.write_checkpoint(base, directory / f"checkpoint-{step}", step)
            engine.ingest(ckpt, step)
            shutil.rmtree(ckpt)
    return directory / "state", base


def run(state: Path, base: Path, work: Path, rounds: int = 2) -> dict[str, Any]:
    """Time ``rounds`` alternating engine/baseline writes of the preview at 2× the last step."""
    from relexd.engine import Engine, EngineConfig

    rows = []
    with Engine(state, base, EngineConfig()) as engine:
        target = 2 * engine.steps[-1]
        for r in range(1, rounds + 1):
            out = work / f"previews-{r}"
            t0 = time.perf_counter()
            path = engine.write_preview(target, out)
            engine_s = time.perf_counter() - t0
            weights = path / "model.safetensors"
            nbytes = weights.stat().st_size
            tensors = load_file(str(weights))  # the same tensors, precomputed in memory
            plain = work / f"plain-{r}.safetensors"
            t0 = time.perf_counter()
            save_file(tensors, str(plain), metadata={"format": "pt"})
            save_s = time.perf_counter() - t0
            fd = os.open(plain, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            save_sync_s = time.perf_counter() - t0
            del tensors
            rows.append(
                [
                    r,
                    engine_s,
                    nbytes / MB / engine_s,
                    save_s,
                    save_sync_s,
                    nbytes / MB / save_sync_s,
                    engine_s / save_sync_s,
                ]
            )
            print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
            shutil.rmtree(out)
            plain.unlink()
    return {"rows": rows, "bytes": nbytes, "target": target}


def report(result: dict[str, Any]) -> str:
    return (
        f"Preview at step {result['target']}, {result['bytes'] / 1e9:.2f} GB of bf16 weights.\n\n"
        + markdown_table(HEADERS, result["rows"])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=QWEN25_05B.layers, help="fewer layers for a quick look")
    args = p.parse_args()
    shape = QWEN25_05B if args.layers == QWEN25_05B.layers else QWEN25_05B.smaller(args.layers)
    with scratch_dir("preview") as tmp:
        state, base = build_state(shape, tmp)
        print(report(run(state, base, tmp)))


if __name__ == "__main__":
    main()
