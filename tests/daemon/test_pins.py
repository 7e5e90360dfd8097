"""Pins keep a complete checkpoint readable after the trainer deletes it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from relexd.daemon.pins import CheckpointPin
from relexd.io.layouts import scan_run
from relexd.io.reader import open_weights
from tests.daemon.trainer_sim import hf_save


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(32, generator=g)}


def test_a_pinned_checkpoint_reads_the_same_after_rotation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = hf_save(run, 7, _tensors(0), shards=2)
    (ref,) = scan_run(run).complete
    with open_weights(ref.weights) as reader:
        expected = {n: reader.read(n) for n in reader.names()}
    pin = CheckpointPin(ref, tmp_path / "pins")
    names = sorted(p.name for p in pin.view.iterdir())
    assert "optimizer.pt" not in names and "config.json" in names  # trainer internals are not held
    assert pin.nbytes == sum((ckpt / n).stat().st_size for n in names)
    shutil.rmtree(ckpt)  # the trainer's rotation
    assert not ckpt.exists()
    with open_weights(pin.weights) as reader:
        assert {n: reader.read(n) for n in reader.names()}.keys() == expected.keys()
        for name in expected:
            assert torch.equal(reader.read(name), expected[name])
    assert (
        pin.original(pin.view / "model-00001-of-00002.safetensors")
        == ckpt / "model-00001-of-00002.safetensors"
    )
    pin.close()
    assert not pin.view.exists()


def test_a_pinned_single_file_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file(_tensors(1), str(run / "model_step_3.safetensors"))
    (ref,) = scan_run(run).complete
    pin = CheckpointPin(ref, tmp_path / "pins")
    os.unlink(ref.weights)
    with open_weights(pin.weights) as reader:
        assert torch.equal(reader.read("b.bias"), _tensors(1)["b.bias"])
    assert pin.original(pin.weights) == ref.weights
    pin.close()
