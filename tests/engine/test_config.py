"""The engine's settings a user types: the default worker count and ``--memory-budget`` sizes."""

from __future__ import annotations

import os
import re

import pytest

from relexd.engine import config
from relexd.errors import ConfigError


@pytest.mark.parametrize(
    ("cores", "workers", "cached"), [(1, 2, 1), (2, 4, 2), (3, 6, 3), (4, 8, 4), (16, 8, 8)]
)
def test_the_default_takes_two_workers_per_core_up_to_the_measured_cap_and_one_when_cached(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, cached: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert config.default_workers() == workers
    assert config.cached_in_flight() == cached


def test_the_help_says_the_default() -> None:
    assert config.MAX_DEFAULT_WORKERS == 8 and config.WORKERS_PER_CORE == 2
    assert "2 per core" in config.THREADS_HELP and "at most 8" in config.THREADS_HELP
    assert "one per core while the state fits the page cache" in config.THREADS_HELP
    assert "fewer while other processes keep cores busy" in config.THREADS_HELP


@pytest.mark.parametrize(
    ("text", "size"),
    [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), ("none", None), (None, None)],
)
def test_memory_budget_sizes(text: str | None, size: int | None) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize("text", ["8X", "-1G", "0", "lots"])
def test_a_size_that_is_not_one_names_itself(text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(text))):
        config.parse_size(text)
