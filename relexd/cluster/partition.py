"""Which worker computes which tensors: balanced by bytes, stable from one checkpoint to the next.

Greedy longest-processing-time assignment (largest tensor first, each to the part with the fewest
bytes so far; ties by part index, names in the base's order): deterministic, and within 4/3 of the
best possible largest part (Graham's bound), which for thousands of tensors of an LLM is within a
few per cent of even.

Stability: a generation records the partition its files were written in (``meta["partition"]``).
The next checkpoint keeps it while the worker count and the tensors are unchanged, so each worker
reads back the sketch rows it wrote itself (its host's page cache). When the worker count changes,
the tensors are balanced anew: correct without any migration, because every generation is written
whole — a worker reads its tensors' old rows from whichever part files hold them on the shared file
system, and writes them into its own new part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from relexd.state.store import Partition


def balance(sizes: Mapping[str, int], parts: int) -> list[list[str]]:
    """Split the names of ``sizes`` (name → bytes, in a fixed order) into ``parts`` lists of
    nearly equal total bytes; each list keeps that order."""
    if parts < 1:
        raise ValueError(f"parts must be ≥ 1, not {parts}")
    order = {name: i for i, name in enumerate(sizes)}
    loads = [0] * parts
    chosen: list[list[str]] = [[] for _ in range(parts)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], order[n])):
        part = min(range(parts), key=lambda p: (loads[p], p))
        chosen[part].append(name)
        loads[part] += sizes[name]
    return [sorted(names, key=order.__getitem__) for names in chosen]


def next_parts(
    previous: Partition | None, sizes: Mapping[str, int], workers: int
) -> tuple[list[list[str]], bool]:
    """The parts for the next generation, and whether they differ from the previous ones'
    (a rebalance: the worker count or the tensors changed)."""
    if previous:
        parts: Sequence[Sequence[str]] = previous["parts"]
        same_tensors = sorted(n for p in parts for n in p) == sorted(sizes)
        if len(parts) == workers and same_tensors:
            return [list(p) for p in parts], False
    return balance(sizes, workers), previous is not None


def part_bytes(parts: Sequence[Sequence[str]], sizes: Mapping[str, int]) -> list[int]:
    return [sum(sizes[n] for n in p) for p in parts]
