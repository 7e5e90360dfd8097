"""score_checkpoint must be deterministic, fast, and agree with the training reward."""

from __future__ import annotations

import time
from pathlib import Path

from relexd.demo.evaluate import held_out_set, score_checkpoint
from relexd.demo.model import ModelConfig, TinyCausalLM
from relexd.demo.task import is_held_out


def test_score_is_deterministic_and_fast(cached_base: Path) -> None:
    t0 = time.perf_counter()
    s1 = score_checkpoint(cached_base)
    elapsed = time.perf_counter() - t0
    assert s1 == score_checkpoint(cached_base)
    assert 0.0 <= s1 <= 1.0  # the tests' tiny warm-up budget may leave it at 0
    assert elapsed < 3.0  # < 1 s on an idle 2-core CPU; slack for a loaded CI box


def test_untrained_model_scores_zero(tmp_path: Path) -> None:
    TinyCausalLM(ModelConfig()).save_pretrained(tmp_path)
    assert score_checkpoint(tmp_path, n_prompts=64) == 0.0


def test_held_out_set_is_fixed() -> None:
    a, b = held_out_set(256, 7)
    assert bool(is_held_out(a, b).all())
    assert a.shape == (256,)
