"""The warm-up base is cached by a key of everything it depends on, and reused bit for bit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file

from relexd.demo import train
from relexd.demo.model import ModelConfig


def test_second_call_reuses_identical_base(tmp_path: Path) -> None:
    train.configure_torch(1)
    cache = tmp_path / "cache"
    first, second = tmp_path / "a", tmp_path / "b"
    assert not train.ensure_base(first, 3, train.Warmup(steps=3, batch_size=8), cache_dir=cache)
    assert train.ensure_base(second, 3, train.Warmup(steps=3, batch_size=8), cache_dir=cache)
    wa, wb = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert all(wa[k].equal(wb[k]) for k in wa)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("demo-base-*")]


def test_cache_key_changes_with_what_the_base_depends_on() -> None:
    w = train.Warmup(steps=10, batch_size=8, lr=1e-3, label_smoothing=0.3)
    assert w.cache_key(0) == train.Warmup(steps=10, batch_size=8, lr=1e-3, label_smoothing=0.3).cache_key(0)
    assert w.cache_key(0) != w.cache_key(1)
    assert w.cache_key(0) != replace(w, steps=11).cache_key(0)
    assert w.cache_key(0) != replace(w, label_smoothing=0.1).cache_key(0)
    assert w.cache_key(0) != replace(w, model=ModelConfig(hidden_size=64)).cache_key(0)
