"""The warm-up base is cached by a key of everything it depends on, and reused bit for bit."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from relexd.demo import train
from relexd.demo.model import ModelConfig


def test_second_call_reuses_identical_base(tmp_path: Path) -> None:
    train.configure_torch(1)
    cache = tmp_path / "cache"
    first, second = tmp_path / "a", tmp_path / "b"
    assert not train.ensure_base(first, 3, steps=3, batch_size=8, cache_dir=cache)
    assert train.ensure_base(second, 3, steps=3, batch_size=8, cache_dir=cache)
    wa, wb = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert all(wa[k].equal(wb[k]) for k in wa)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("demo-base-*")]


def test_cache_key_changes_with_what_the_base_depends_on() -> None:
    cfg = ModelConfig()
    shape = dict(steps=10, batch_size=8, lr=1e-3, label_smoothing=0.3)

    def key(seed: int = 0, config: ModelConfig = cfg, **changes: float) -> str:
        return train.base_cache_key(seed, config=config, **{**shape, **changes})  # type: ignore[arg-type]

    assert key() == key()
    assert key() != key(seed=1)
    assert key() != key(steps=11)
    assert key() != key(label_smoothing=0.1)
    assert key() != key(config=ModelConfig(hidden_size=64))
