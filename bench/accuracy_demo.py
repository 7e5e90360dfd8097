"""Streaming estimates vs batch SVD on a REAL RL trajectory: the demo's run (issue 5 item 3b).

Trains the demo's policy-gradient run (relexd/demo; cached SFT base, one checkpoint per step), then
per tensor stacks the deltas of the first K checkpoints (the observed prefix) and compares each
streaming estimator (Oja; Brand ranks 1, 2, 4, 8 — fed one checkpoint at a time, float32 state as on
disk) with the exact batch SVD of the same deltas: 1 − |cos| of the top direction (energy-weighted
mean and worst tensor) and the relative error of the preview delta at τ = 2K against the batch
preview. The batch figures of the prefix (rank-1 energy) are printed for context.

    .venv/bin/python -m bench.accuracy_demo [--steps 60] [--observe 30] [--run DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.accuracy import ESTIMATORS, batch_top, preview, stream
from bench.common import markdown_table
from relexd.demo.bases import ensure_base
from relexd.demo.train import BASE_DIR_NAME, configure_torch, train_run
from relexd.io.reader import open_weights

F64 = torch.float64


def load_deltas(run: Path, observe: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """name → (K × d) float64 deltas of checkpoints 1…K against run/base."""
    with open_weights(run / "base") as base:
        theta0 = {n: base.read(n).reshape(-1).to(F64) for n in base.names()}
    steps = list(range(1, observe + 1))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in theta0}
    for s in steps:
        with open_weights(run / f"checkpoint-{s}") as ckpt:
            for n in theta0:
                rows[n].append(ckpt.read(n).reshape(-1).to(F64) - theta0[n])
    return {n: torch.stack(r) for n, r in rows.items()}, steps


def run(run_dir: Path, observe: int) -> dict[str, Any]:
    deltas, steps = load_deltas(run_dir, observe)
    st = torch.tensor(steps, dtype=F64)
    tau = 2.0 * steps[-1]
    batch = {}
    for name, m in deltas.items():
        if float(m.norm()) == 0.0:
            continue
        v, c, energy = batch_top(m)
        batch[name] = (v, preview(v, c, st, tau), float((m**2).sum()), energy)
    total = sum(b[2] for b in batch.values())
    prefix_energy = sum(b[3] * b[2] for b in batch.values()) / total
    rows = []
    for estimator, width in ESTIMATORS:
        cos_gap = worst = 0.0
        err_num = err_den = 0.0
        for name, (v_b, p_b, e, _) in batch.items():
            v_s, c_s = stream(estimator, width, deltas[name])
            gap = 1.0 - abs(float(v_s @ v_b)) / float(v_s.norm())
            cos_gap += gap * e / total
            worst = max(worst, gap)
            p_s = preview(v_s, c_s, st, tau)
            err_num += float((p_s - p_b).norm() ** 2)
            err_den += float(p_b.norm() ** 2)
        label = "oja" if estimator == "oja" else f"brand k={width}"
        rows.append([label, f"{cos_gap:.1e}", f"{worst:.1e}", f"{(err_num / err_den) ** 0.5:.3g}", width * 4])
    return {"rows": rows, "observe": observe, "tau": tau, "energy": prefix_energy, "tensors": len(batch)}


def run_fresh(steps: int = 60, observe: int = 30) -> dict[str, Any]:
    """Train the demo's RL run into a temporary directory and measure it."""
    with tempfile.TemporaryDirectory(prefix="relexd-bench-demo-") as tmp:
        configure_torch(1)
        ensure_base(Path(tmp) / BASE_DIR_NAME, 0)  # the demo's own (shipped) base
        train_run(Path(tmp), steps=steps, num_threads=1)
        return run(Path(tmp), observe)


def report(result: dict[str, Any]) -> str:
    head = (
        f"Demo run, first {result['observe']} checkpoints observed, {result['tensors']} moving tensors, "
        f"batch rank-1 energy of the prefix {result['energy']:.3f} (energy-weighted); preview at "
        f"τ = {result['tau']:g}.\n\n"
    )
    cols = ["estimator", "1 − abs(cos) to batch (energy-weighted)", "1 − abs(cos) worst tensor",
            "preview rel. err vs batch @2×", "state bytes/param"]  # fmt: skip
    return head + markdown_table(cols, result["rows"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="RL steps to train (≥ --observe)")
    p.add_argument("--observe", type=int, default=30, help="observed prefix K")
    p.add_argument("--run", type=Path, help="use an existing demo run directory instead of training")
    args = p.parse_args()
    if args.run is not None:
        print(report(run(args.run, args.observe)))
        return
    print(report(run_fresh(args.steps, args.observe)))


if __name__ == "__main__":
    main()
