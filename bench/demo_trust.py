"""Which of relexd's signals can a user act on? (issue 13) — the demo over learning rates × seeds.

Each run is the full ``relexd demo`` (:func:`relexd.demo.cli.run_demo`): the real trainer, the real
``relexd watch --eval 'python -m relexd.demo.score {path}'`` beside it, previews at 2×/3×/6×
captured when training reaches 15 % of the run. At that moment the demo reads what relexd says
per horizon — the weight-space forecast skill, the realized advantage of earlier previews at the
horizon (from its evaluation ledger), the lead streak, and so whether ``RelexPreviewAhead`` would
fire — and at the end it knows the truth: whether the captured preview scored better than the
last observed checkpoint (expected reward on 1024 held-out prompts).

A signal says "trust" when: skill ≥ 0; realized advantage > 0; RelexPreviewAhead's condition
(3 positive leads in a row and realized advantage > 0). Its **false-trust rate** is the share of
its "trust" cases in which the preview lost; its **coverage** the share of winning previews it
trusted.

    .venv/bin/python -m bench.demo_trust [--lrs 8e-6,3e-5,1e-4,3e-4] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import demo_table
from bench.common import markdown_table
from relexd.demo import train
from relexd.demo.cli import Signals

LRS = (train.DEFAULT_LR, 3e-5, 1e-4, train.COLLAPSE_LR)
SEEDS = (0, 1, 2)
SIGNALS = (
    ("weight skill ≥ 0", "skill_says_trust"),
    ("realized advantage > 0", "realized_says_trust"),
    ("RelexPreviewAhead", "ahead_fires"),
)


def run(lrs: tuple[float, ...], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """One demo per (lr, seed) (:func:`bench.demo_table.run`); one record per horizon."""
    records = []
    for lr, seed, r, seconds in demo_table.run(tuple((lr, seed) for lr in lrs for seed in seeds)):
        last = r.observed_score.expected_reward
        end = r.at_end.evaluations
        for (h, target, preview, trained), sig, share, won in zip(
            r.rows, r.signals_at_capture(), r.recovered_shares(), r.preview_won(), strict=True
        ):
            real_end = end.realized.get(f"{h}x") if end else None
            records.append(
                {
                    "lr": lr,
                    "seed": seed,
                    "horizon": h,
                    "capture": r.observed_step,
                    "target": target,
                    "preview": preview.expected_reward,
                    "trained": None if trained is None else trained.expected_reward,
                    "last_observed": last,
                    "gain_recovered": share,
                    "won": won,
                    "signals": asdict(sig),
                    "relexd_realized_share_at_end": None if real_end is None else real_end[0],
                    "wall_s": seconds,
                }
            )
    return records


def _says(rec: dict[str, Any], attr: str) -> bool:
    return bool(getattr(Signals(**rec["signals"]), attr))


def _pct(n: int, d: int) -> str:
    return "—" if d == 0 else f"{100 * n / d:.0f} % ({n}/{d})"


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report(records: list[dict[str, Any]]) -> str:
    cols = ["lr", "seed", "horizon", "preview", "last observed", "gain recovered", "preview won",
            "skill at capture", "realized adv. at capture", "lead streak", "RelexPreviewAhead",
            "relexd realized share at end"]  # fmt: skip
    rows = []
    for rec in records:
        sig = rec["signals"]
        share = rec["gain_recovered"]
        end = rec["relexd_realized_share_at_end"]
        rows.append([
            f"{rec['lr']:g}", rec["seed"], f"{rec['horizon']}×", f"{rec['preview']:.4f}",
            f"{rec['last_observed']:.4f}",
            "—" if share is None else f"{100 * share:+.0f} %",
            "yes" if rec["won"] else "no",
            _f(sig["skill"], "+.3f"), _f(sig["realized_advantage"], "+.4f"), sig["streak"],
            "fires" if _says(rec, "ahead_fires") else "quiet",
            "—" if end is None else f"{100 * end:+.0f} %",
        ])  # fmt: skip
    summary_cols = ["signal", "horizon", "said trust", "false-trust rate (lost | trust)",
                    "coverage (trust | won)"]  # fmt: skip
    summary = []
    for name, attr in SIGNALS:
        for h in ("all", 2, 3, 6):
            sel = [r for r in records if h == "all" or r["horizon"] == h]
            trust = [r for r in sel if _says(r, attr)]
            won = [r for r in sel if r["won"]]
            summary.append([
                name, h if h == "all" else f"{h}×", f"{len(trust)} of {len(sel)}",
                _pct(sum(not r["won"] for r in trust), len(trust)),
                _pct(sum(_says(r, attr) for r in won), len(won)),
            ])  # fmt: skip
    runs = {(r["lr"], r["seed"]) for r in records}
    wall = sum({(r["lr"], r["seed"]): r["wall_s"] for r in records}.values())
    head = (
        f"{len(runs)} demo runs ({len(records)} previews), previews captured at step "
        f"{records[0]['capture']} of {train.DEFAULT_STEPS}; scores = expected reward on 1024 held-out "
        f"prompts; {wall:.0f} s of demo runs.\n\n"
    )
    return head + markdown_table(summary_cols, summary) + "\n\n" + markdown_table(cols, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--json", type=Path, help="also write the raw records here")
    args = p.parse_args()
    records = run(tuple(float(x) for x in args.lrs.split(",")), tuple(int(x) for x in args.seeds.split(",")))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(report(records))


if __name__ == "__main__":
    main()
