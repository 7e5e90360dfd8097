"""Task buffers are lent again instead of made anew, within the limit (relexd/engine/buffers.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from relexd.engine import Engine, EngineConfig
from relexd.engine.buffers import TaskBuffers
from tests.engine.planted import Planted, write_hf_checkpoint


def make(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32)


def test_a_buffer_given_back_is_lent_again_for_its_key_only() -> None:
    buffers = TaskBuffers()
    with buffers.lend("a", 400, lambda: make(100)) as first:
        pass
    with (
        buffers.lend("a", 400, lambda: make(100)) as again,
        buffers.lend("b", 400, lambda: make(100)) as other,
    ):
        assert again is first
        assert other is not first
    assert buffers.made == 2
    assert buffers.held_bytes == 800


def test_the_limit_frees_the_smallest_idle_buffers_first_and_never_a_busy_one() -> None:
    buffers = TaskBuffers()
    buffers.limit = 1000
    with buffers.lend("big", 800, lambda: make(200)) as big:
        with buffers.lend("small", 100, lambda: make(25)):
            pass
        assert buffers.held_bytes == 900  # big busy + small idle: within the limit
    assert buffers.held_bytes == 900
    # a new 150-byte buffer needs room: the small idle one goes, the big idle one stays
    with buffers.lend("medium", 150, lambda: make(40)):
        assert buffers.held_bytes == 950
    with buffers.lend("big", 800, lambda: make(200)) as again:
        assert again is big
    # a task larger than the limit still gets its buffer; giving it back frees idle ones to fit
    with buffers.lend("huge", 2000, lambda: make(500)):
        assert buffers.held_bytes == 2000  # every idle buffer freed
    assert buffers.held_bytes == 0  # the huge one left too: alone it exceeds the limit


def test_clear_frees_what_is_idle_and_what_comes_back() -> None:
    buffers = TaskBuffers()
    with buffers.lend("a", 400, lambda: make(100)):
        with buffers.lend("b", 400, lambda: make(100)):
            pass
        buffers.clear()
        assert buffers.held_bytes == 400
    assert buffers.held_bytes == 0


def test_an_engine_ingesting_again_makes_no_new_buffers(tmp_path: Path) -> None:
    """The second and third checkpoints borrow every delta and chunk buffer the first made: the
    fresh-page cost of the largest tensor is paid once per process, not once per checkpoint."""
    shapes = {
        "model.embed_tokens.weight": ((512, 64), torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": ((128, 64), torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": ((64, 64), torch.bfloat16),
        "model.norm.weight": ((64,), torch.float32),
    }
    planted = Planted.make(shapes, seed=5, a=0.05, b=0.01, noise=0.002)
    base = write_hf_checkpoint(tmp_path / "base", planted.base)
    made = []
    with Engine(tmp_path / "state", base, EngineConfig(), threads=2) as engine:
        for step in (10, 20, 30):
            engine.ingest(write_hf_checkpoint(tmp_path / f"checkpoint-{step}", planted.at(step), step), step)
            made.append(engine.backend.buffers.made)
    assert made[0] >= len(shapes)  # a delta buffer per size at least
    assert made[1] == made[2] == made[0], f"buffers made per checkpoint (cumulative): {made}"
