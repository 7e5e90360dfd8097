"""Where θ₀ comes from: the shipped bases for the default recipe, else a cache keyed by the recipe."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from relexd.demo import bases, train
from relexd.demo.model import ModelConfig


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_second_call_reuses_identical_base(tmp_path: Path) -> None:
    train.configure_torch(1)
    cache = tmp_path / "cache"
    first, second = tmp_path / "a", tmp_path / "b"
    tiny = train.Warmup(steps=3, batch_size=8)
    assert bases.ensure_base(first, 3, tiny, cache_dir=cache) is bases.BaseSource.TRAINED
    assert bases.ensure_base(second, 3, tiny, cache_dir=cache) is bases.BaseSource.CACHE
    assert _weights_equal(first, second)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("demo-base-*")]


def test_default_recipe_uses_the_shipped_base_without_training(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for seed in bases.SHIPPED_SEEDS:
        dest = tmp_path / f"seed-{seed}"
        assert bases.ensure_base(dest, seed, cache_dir=cache) is bases.BaseSource.SHIPPED
        assert _weights_equal(dest, bases.shipped_dir(seed))
        assert ModelConfig.from_dict(json.loads((dest / "config.json").read_text())) == ModelConfig()
    assert not cache.exists()  # nothing trained, nothing cached


def test_shipped_base_is_refused_for_another_recipe_or_altered_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bases.shipped_base(0, train.Warmup()) is not None
    assert bases.shipped_base(0, train.Warmup(steps=train.SFT_STEPS - 1)) is None
    assert bases.shipped_base(99, train.Warmup()) is None
    altered = tmp_path / "pretrained"
    shutil.copytree(bases.PRETRAINED_DIR, altered)
    weights = altered / "seed-0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(bases, "PRETRAINED_DIR", altered)
    assert bases.shipped_base(0, train.Warmup()) is None


def test_cache_key_changes_with_what_the_base_depends_on() -> None:
    w = train.Warmup(steps=10, batch_size=8, lr=1e-3, label_smoothing=0.3)
    assert w.cache_key(0) == train.Warmup(steps=10, batch_size=8, lr=1e-3, label_smoothing=0.3).cache_key(0)
    assert w.cache_key(0) != w.cache_key(1)
    assert w.cache_key(0) != replace(w, steps=11).cache_key(0)
    assert w.cache_key(0) != replace(w, label_smoothing=0.1).cache_key(0)
    assert w.cache_key(0) != replace(w, model=ModelConfig(hidden_size=64)).cache_key(0)
