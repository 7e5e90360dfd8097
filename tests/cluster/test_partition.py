"""Parts balanced by bytes, kept while the worker count holds, rebalanced when it changes."""

from __future__ import annotations

import random

import pytest

from relexd.cluster.partition import balance, next_parts, part_bytes


def test_balance_is_near_even_deterministic_and_keeps_the_order() -> None:
    rng = random.Random(0)
    sizes = {f"t{i}": rng.choice([1, 4, 16, 64]) * 1000 for i in range(300)} | {"embed": 150_000}
    parts = balance(sizes, 4)
    assert parts == balance(dict(sizes), 4)
    assert sorted(n for p in parts for n in p) == sorted(sizes)
    order = list(sizes)
    assert all(p == sorted(p, key=order.index) for p in parts)
    loads = part_bytes(parts, sizes)
    assert max(loads) <= 4 / 3 * sum(sizes.values()) / 4 + max(sizes.values())  # Graham's bound
    assert max(loads) / min(loads) < 1.05  # many tensors: nearly even


def test_one_tensor_larger_than_the_rest_gets_a_part_of_its_own() -> None:
    parts = balance({"a": 1, "huge": 100, "b": 1, "c": 1}, 2)
    assert ["huge"] in parts and ["a", "b", "c"] in parts


def test_the_recorded_parts_are_kept_while_workers_and_tensors_are_unchanged() -> None:
    sizes = {"a": 5, "b": 3, "c": 3, "d": 1}
    recorded = {"attempt": "x", "parts": [["b", "c"], ["a", "d"]]}  # not what balance() picks
    assert next_parts(recorded, sizes, 2) == ([["b", "c"], ["a", "d"]], False)
    assert next_parts(recorded, sizes, 3) == (balance(sizes, 3), True)
    assert next_parts(recorded, sizes | {"e": 1}, 2) == (balance(sizes | {"e": 1}, 2), True)
    assert next_parts(None, sizes, 2) == (balance(sizes, 2), False)


def test_zero_parts_is_refused() -> None:
    with pytest.raises(ValueError):
        balance({"a": 1}, 0)
