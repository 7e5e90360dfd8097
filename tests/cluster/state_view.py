"""A committed state read through the Snapshot API, so that states written in one file and in
parts compare tensor by tensor."""

from __future__ import annotations

import copy
import math
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
    tracked = snap.meta["per_tensor"]
    arrays: dict[str, torch.Tensor] = {}
    for name in tracked:
        small = snap.small(name)
        arrays |= {f"z/{name}": small.z, f"sq/{name}": small.sqnorms, f"sigma/{name}": small.sigma}
    sketch = snap.sketch()
    assert sketch is not None
    with sketch:
        for name in tracked:
            arrays[f"sketch/{name}"] = sketch.vectors(name)
    for anchor in snap.meta["anchors"]:
        with snap.anchor(anchor["step"]) as files:
            for name in tracked:
                numel = math.prod(snap.meta["tensors"][name]["shape"])
                for key in (f"v/{name}", f"x/{name}"):
                    arrays[f"anchor{anchor['step']}/{key}"] = files.read_range(key, 0, numel).clone()
    return meta, arrays


def assert_same_state(a: Path, b: Path, *, sources: bool = True) -> None:
    (meta_a, arrays_a), (meta_b, arrays_b) = committed(a, sources=sources), committed(b, sources=sources)
    assert meta_a == meta_b
    assert sorted(arrays_a) == sorted(arrays_b)
    for key, value in arrays_a.items():
        assert torch.equal(arrays_b[key], value), key
