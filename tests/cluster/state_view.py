"""A committed state read through the Snapshot API, so that states written in one file and in
parts compare tensor by tensor."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from relexd.state.store import read_snapshot

#: meta keys that only say when and how fast, or how the files are split
VOLATILE = ("last_time", "created", "partition")


def committed(state: Path, *, sources: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``sources=False``: leave out where the checkpoints were read from (another run directory)."""
    snap = read_snapshot(state)
    meta = copy.deepcopy(snap.meta)
    for key in VOLATILE + (() if sources else ("last_source",)):
        meta.pop(key, None)
    for rec in meta["history"]:
        rec.pop("time"), rec.pop("seconds")
        if not sources:
            rec.pop("source")
    for anchor in meta["anchors"]:
        anchor.pop("partition", None)
    arrays = {f"small/{k}": v for k, v in snap._small.items()}
    sketch = snap.sketch()
    assert sketch is not None
    with sketch:
        for name in snap.meta["per_tensor"]:
            arrays[f"sketch/{name}"] = sketch.vectors(name)
    for anchor in snap.meta["anchors"]:
        with snap.anchor(anchor["step"]) as files:
            for name in snap.meta["per_tensor"]:
                for kind in ("v", "x"):
                    key = f"{kind}/{name}"
                    numel = files._files.file(key).info(key).numel
                    arrays[f"anchor{anchor['step']}/{key}"] = files.read_range(key, 0, numel).clone()
    return meta, arrays


def assert_same_state(a: Path, b: Path, *, sources: bool = True) -> None:
    (meta_a, arrays_a), (meta_b, arrays_b) = committed(a, sources=sources), committed(b, sources=sources)
    assert meta_a == meta_b
    assert sorted(arrays_a) == sorted(arrays_b)
    for key, value in arrays_a.items():
        assert torch.equal(arrays_b[key], value), key
