"""The paper's offline batch method vs relexd, per checkpoint, at T stored checkpoints (issue 2 (d)).

Batch method (as in the RELEX release): every delta is stored as float16 on disk (T × model size);
when checkpoint T lands it recomputes, per tensor, the Gram matrix G = X·Xᵀ (T × T, accumulated
chunkwise in float32 → float64 from the T float16 files), its top eigenpair (λ, u), σ = √λ, the
direction v = Xᵀu / σ (a second pass over the files) and writes v (float32). Its per-checkpoint
cost is storing the new delta plus that full recomputation; relexd's is one ``Engine.ingest``.

Both see the same synthetic checkpoints (bench/synthetic.py) of a model with Qwen2.5-0.5B layer
shapes but fewer layers and a smaller vocabulary, so that T = 40+ stored deltas fit the time budget;
both costs are linear in the parameter count, so the ratios carry over. Store and ingest times are
medians of the last 5 checkpoints up to T (the shared machine is noisy); the Gram SVD is timed once.
As a sanity check the batch direction is compared to relexd's (1 − |cos|, parameter-weighted) at
every measured T.
Run alone: ``python -m bench.batch_baseline [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from bench.common import MB, dir_bytes, markdown_table, scratch_dir
from bench.synthetic import QWEN25_05B, Trajectory, steps_irregular
from relexd.io.safetensors_file import SafetensorsFile, StreamingSafetensorsWriter
from relexd.state.store import SketchFile

F64 = torch.float64
CHUNK_BYTES = 64 << 20  # float32 bytes of one T × c block


def store_delta(base: Path, ckpt: Path, out: Path) -> None:
    """x = θ_s − θ₀ of every tensor, written as one float16 safetensors file (fsync'd)."""
    with SafetensorsFile(base) as b, SafetensorsFile(ckpt) as c:
        specs = {n: (torch.float16, c.info(n).shape) for n in c.names()}
        with StreamingSafetensorsWriter(out, specs) as w:
            for n in c.names():
                w.append(n, (c.read(n).float() - b.read(n).float()).to(torch.float16))


def batch_svd(delta_files: list[Path], out: Path) -> dict[str, torch.Tensor]:
    """Per tensor: Gram over all stored deltas, top eigenpair, v = Xᵀu/σ; writes v; returns them."""
    files = [SafetensorsFile(p) for p in delta_files]
    try:
        names = files[0].names()
        t = len(files)
        specs = {n: (torch.float32, (files[0].info(n).numel,)) for n in names}
        vs: dict[str, torch.Tensor] = {}
        with StreamingSafetensorsWriter(out, specs) as w:
            for n in names:
                numel = files[0].info(n).numel
                cols = max(1, CHUNK_BYTES // (4 * t))
                gram = torch.zeros(t, t, dtype=F64)
                for i in range(0, numel, cols):
                    j = min(i + cols, numel)
                    x = torch.stack([f.read_range(n, i, j) for f in files]).float()
                    gram += (x @ x.T).to(F64)
                vals, vecs = torch.linalg.eigh(gram)
                lam, u = float(vals[-1]), vecs[:, -1]
                if lam <= 0.0:
                    v = torch.zeros(numel)
                else:
                    u32 = (u / math.sqrt(lam)).float()
                    v = torch.empty(numel)
                    for i in range(0, numel, cols):
                        j = min(i + cols, numel)
                        x = torch.stack([f.read_range(n, i, j) for f in files]).float()
                        v[i:j] = u32 @ x
                w.append(n, v)
                vs[n] = v
        return vs
    finally:
        for f in files:
            f.close()


def relexd_agreement(state: Path, batch_v: dict[str, torch.Tensor]) -> float:
    """Parameter-weighted |cos| between relexd's current v (sketch column 0) and the batch v."""
    import json

    gen = json.loads((state / "CURRENT").read_text())["generation"]
    num = den = 0.0
    # SketchFile, not a raw read: it knows the sketch's layout (column-major since issue 12)
    with SketchFile(state / "generations" / gen / "sketch.safetensors") as sk:
        for n, vb in batch_v.items():
            vr = sk.columns(n, 0, vb.numel(), count=1)[0].to(F64)
            cos = abs(float(vr @ vb.to(F64))) / max(float(vr.norm() * vb.to(F64).norm()), 1e-300)
            num, den = num + cos * vb.numel(), den + vb.numel()
    return num / den


HEADERS = [
    "T",
    "batch: store delta s (median last 5)",
    "batch: Gram SVD s",
    "batch per-ckpt s",
    "relexd ingest s (median last 5)",
    "batch / relexd time",
    "batch disk GB",
    "relexd state GB",
    "batch / relexd disk",
    "1 − abs(cos) relexd vs batch",
]


def run(quick: bool = False) -> dict[str, Any]:
    from relexd.engine import Engine, EngineConfig
    from relexd.state.store import disk_usage

    shape = QWEN25_05B.smaller(1, vocab=1024)
    measure = (5, 10) if quick else (10, 20, 40, 75)
    traj = Trajectory(shape)
    rows: list[list[Any]] = []
    with scratch_dir("batch") as tmp:
        base = traj.write_base(tmp / "base")
        deltas = tmp / "deltas"
        deltas.mkdir()
        files: list[Path] = []
        ingest_s: list[float] = []
        store_s: list[float] = []
        with Engine(tmp / "state", base, EngineConfig()) as engine:
            for t, step in enumerate(steps_irregular(max(measure)), start=1):
                ckpt = traj.write_checkpoint(base, tmp / f"checkpoint-{step}", step)
                ingest_s.append(engine.ingest(ckpt, step).seconds)
                t0 = time.perf_counter()
                files.append(deltas / f"delta-{step:06d}.safetensors")
                store_delta(base / "model.safetensors", ckpt / "model.safetensors", files[-1])
                store_s.append(time.perf_counter() - t0)
                shutil.rmtree(ckpt)
                if t not in measure:
                    continue
                t0 = time.perf_counter()
                vs = batch_svd(files, tmp / "batch-v.safetensors")
                svd_s = time.perf_counter() - t0
                os.sync()
                batch_disk = dir_bytes(deltas)
                state_disk = disk_usage(tmp / "state")
                store_med, ingest_med = median(store_s[-5:]), median(ingest_s[-5:])
                rows.append(
                    [
                        t,
                        store_med,
                        svd_s,
                        store_med + svd_s,
                        ingest_med,
                        (store_med + svd_s) / ingest_med,
                        batch_disk / 1e9,
                        state_disk / 1e9,
                        batch_disk / state_disk,
                        f"{1 - relexd_agreement(tmp / 'state', vs):.1e}",
                    ]
                )
                print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    return {"rows": rows, "model": shape.name, "params": shape.params, "mb": shape.params * 2 / MB}


def report(result: dict[str, Any]) -> str:
    head = (
        f"Model {result['model']} ({result['params'] / 1e6:.1f} M params, {result['mb']:.0f} MB bf16), "
        "relexd at the default rank.\n\n"
    )
    return head + markdown_table(HEADERS, result["rows"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    print(report(run(p.parse_args().quick)))


if __name__ == "__main__":
    main()
