"""The planted run of the worker-pool tests (many tensors of mixed sizes and dtypes, anchors and
forecasts) and the state one host commits from it: what every partitioned run must equal."""

from __future__ import annotations

from pathlib import Path

import pytest

from relexd.engine import Engine, EngineConfig
from tests.engine.test_workers import STEPS, run  # noqa: F401  (the fixture, shared)


@pytest.fixture(scope="module")
def reference(run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    root, base = run
    state = tmp_path_factory.mktemp("reference") / "state"
    with Engine(state, base, EngineConfig()) as engine:
        for step in STEPS:
            engine.ingest(root / f"checkpoint-{step}", step)
    return state
