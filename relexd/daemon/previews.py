"""Which previews should exist, and pruning the preview directory to exactly that.

Targets:

* ``--preview-ahead R`` → τ = round(R × newest observed step); it moves as training advances, so
  the preview of the previous τ becomes superseded.
* ``--preview-at S`` → τ = S, wanted only while S is ahead of the newest observed step. Once
  training has reached S the real checkpoint exists and a prediction of it is pointless, so the
  preview is no longer refreshed and is pruned like any superseded one.

``--preview-keep N`` keeps the N most recent superseded previews besides the wanted ones (e.g. so
an evaluation that is still running on one is not pulled from under it); the rest are removed.
Disk use is thus bounded by (targets + N) previews.

A preview is current when its manifest names the published state generation; after a crash
(kill -9 during a preview write or between a commit and its previews) the stale or missing ones
are simply written again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relexd.engine.preview import MANIFEST, preview_name
from relexd.io.atomic import remove_tree


@dataclass(frozen=True)
class Target:
    """One wanted preview: the step it predicts and its low-cardinality metric label."""

    step: int
    label: str  # "ahead:2x" or "at:1000" — a configured target, not a moving step


def wanted_targets(newest: int | None, ahead: tuple[float, ...], at: tuple[int, ...]) -> list[Target]:
    """Targets for the newest observed step; duplicates collapse to the first label."""
    if newest is None:
        return []
    out: dict[int, Target] = {}
    for ratio in ahead:
        step = round(ratio * newest)
        if step > newest:
            out.setdefault(step, Target(step, f"ahead:{ratio:g}x"))
    for step in at:
        if step > newest:
            out.setdefault(step, Target(step, f"at:{step}"))
    return [out[s] for s in sorted(out)]


def preview_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def read_generation(path: Path) -> tuple[str | None, int]:
    """(state generation, newest observed step) recorded in a preview's manifest."""
    try:
        doc = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return doc.get("state_generation"), int(doc.get("newest_observed_step", -1))
    except (OSError, ValueError, TypeError):
        return None, -1


def is_current(out_dir: Path, target: int, generation: str | None) -> bool:
    gen, _ = read_generation(out_dir / preview_name(target))
    return gen is not None and gen == generation


def remove_orphans(out_dir: Path) -> list[Path]:
    """Remove staging/aside directories a killed preview write left behind (never published)."""
    removed = []
    if out_dir.is_dir():
        for entry in out_dir.iterdir():
            if entry.name.startswith((".tmp-", ".old-")):
                remove_tree(entry)
                removed.append(entry)
    return removed


def prune(out_dir: Path, wanted: list[Target], keep: int) -> list[Path]:
    """Remove published previews that are not wanted, beyond the ``keep`` most recent ones."""
    if not out_dir.is_dir():
        return []
    want = {t.step for t in wanted}
    stale = []
    for entry in out_dir.iterdir():
        step = preview_step(entry)
        if step is not None and step not in want and entry.is_dir():
            _, newest = read_generation(entry)
            stale.append(((newest, step), entry))
    stale.sort(reverse=True)
    removed = []
    for _, entry in stale[keep:]:
        remove_tree(entry)
        removed.append(entry)
    return removed


def list_previews(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = [(preview_step(e), e) for e in out_dir.iterdir() if e.is_dir()]
    return sorted((s, e) for s, e in found if s is not None)
