"""The demo's extrapolation table (issue 5 item 5): previews vs. trained vs. last observed.

Runs ``relexd demo`` (:func:`relexd.demo.cli.run_demo`: the real trainer, the real ``relexd watch``
subprocess, previews captured when training reaches 15 % of the run) once per configuration —
the default learning rate on seeds 0, 1, 2 and the collapsing ones — and tabulates, per horizon,
the expected reward of the preview, of the truly trained checkpoint and of the last observed one,
the share of training's gain the preview recovers, and the forecast skill relexd reported at the
capture step and at the end. Warm-up bases come from the demo's cache (``~/.cache/relexd``).

    .venv/bin/python -m bench.demo_table [--quick]      # --quick: default lr and COLLAPSE_LR, seed 0
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.common import markdown_table
from relexd.demo import train
from relexd.demo.cli import DemoResult, run_demo

#: (learning rate, seed) pairs of the full table: the default on three seeds, an intermediate rate,
#: and the collapsing one.
FULL = (
    (train.DEFAULT_LR, 0),
    (train.DEFAULT_LR, 1),
    (train.DEFAULT_LR, 2),
    (1e-4, 0),
    (train.COLLAPSE_LR, 0),
)
QUICK = ((train.DEFAULT_LR, 0), (train.COLLAPSE_LR, 0))


def run(configs: tuple[tuple[float, int], ...]) -> list[tuple[float, int, DemoResult, float]]:
    """One demo per (lr, seed); returns the results with their wall seconds."""
    out = []
    for lr, seed in configs:
        with tempfile.TemporaryDirectory(prefix="relexd-bench-demo-") as tmp:
            t0 = time.perf_counter()
            result = run_demo(
                Path(tmp),
                lr=lr,
                steps=train.DEFAULT_STEPS,
                seed=seed,
                observe_fraction=0.15,
                console=Console(file=io.StringIO()),
            )
            out.append((lr, seed, result, time.perf_counter() - t0))
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report(results: list[tuple[float, int, DemoResult, float]]) -> str:
    cols = ["lr", "seed", "horizon", "target", "preview", "trained", "last observed", "gain recovered",
            "greedy preview / trained", "skill at capture", "skill at end", "wall s"]  # fmt: skip
    rows = []
    for lr, seed, r, seconds in results:
        last = r.observed_score.expected_reward
        shares = r.recovered_shares()
        for i, ((h, target, preview, trained), share) in enumerate(zip(r.rows, shares, strict=True)):
            first = i == 0
            rows.append([
                f"{lr:g}" if first else "", str(seed) if first else "", f"{h}×", target,
                f"{preview.expected_reward:.4f}",
                "—" if trained is None else f"{trained.expected_reward:.4f}",
                f"{last:.4f}" if first else "",
                _fmt(None if share is None else 100 * share, "+.0f") + ("" if share is None else " %"),
                f"{preview.greedy_accuracy:.3f} / "
                + ("—" if trained is None else f"{trained.greedy_accuracy:.3f}"),
                _fmt(r.at_capture.skill, "+.3f") if first else "",
                _fmt(r.at_end.skill, "+.3f") if first else "",
                f"{seconds:.0f}" if first else "",
            ])  # fmt: skip
    head = (
        f"Previews made from steps 1…{results[0][2].observed_step} of {results[0][2].steps}; scores = "
        "expected reward on 1024 held-out prompts (probability that a sample is exactly right).\n\n"
    )
    return head + markdown_table(cols, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="default and collapsing lr on seed 0 only")
    args = p.parse_args()
    print(report(run(QUICK if args.quick else FULL)))


if __name__ == "__main__":
    main()
