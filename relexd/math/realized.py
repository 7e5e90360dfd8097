"""Reward-space validation of previews: how a preview scored against the checkpoints around it.

The evaluation hook gives one number per evaluated checkpoint or preview ("higher is better").
With a preview for step τ made when step a was the newest checkpoint, and the checkpoint that
training actually produced at (or first after) τ:

* **advantage** = score(preview) − score(checkpoint a): what taking the preview instead of the
  checkpoint one already has would have gained (negative: the preview was worse).
* **gain share** = advantage / (score(checkpoint at τ) − score(checkpoint a)): the share of
  training's own gain over the same stretch that the preview recovered (1 = as good as training
  there, > 1 better, < 0 worse than not training further). Undefined — ``None``, never 0 — when
  training gained nothing over that stretch: there was no gain to recover.
* **lead** = score(newest evaluated preview for a target) − score(newest evaluated checkpoint):
  whether the preview one could take *now* beats what training has so far.

Pure arithmetic, no I/O: the daemon's evaluation ledger (relexd.daemon.evaluations) feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Realized:
    """One preview scored against reality."""

    horizon: float  # the configured horizon τ / a rounds to
    ratio: float  # τ / a as it was
    advantage: float
    gain_share: float | None  # None: training gained nothing over the stretch


def realized(
    preview: float, made_from: float, reached: float, ratio: float, horizons: Sequence[float]
) -> Realized:
    """Score a preview (``preview``) made at a checkpoint scoring ``made_from`` against the
    checkpoint training reached at its target (``reached``); ``ratio`` = τ / a."""
    advantage = preview - made_from
    gain = reached - made_from
    share = advantage / gain if gain > 0 else None
    return Realized(nearest_horizon(ratio, horizons), ratio, advantage, share)


def nearest_horizon(ratio: float, horizons: Sequence[float]) -> float:
    """The configured horizon closest to ``ratio`` on a log scale (3.2× is a 3× horizon, not 4×;
    ratios are multiplicative, so 1.5× and 6× are equally far from 3×)."""
    if not horizons:
        raise ValueError("no horizons configured")
    if not ratio > 0:
        raise ValueError(f"horizon ratio must be positive, not {ratio!r}")
    return min(horizons, key=lambda h: (abs(math.log(ratio / h)), h))


def lead_streak(leads: Sequence[float]) -> int:
    """How many of the newest leads in a row are positive (oldest first in ``leads``)."""
    count = 0
    for lead in reversed(leads):
        if not lead > 0:
            break
        count += 1
    return count
