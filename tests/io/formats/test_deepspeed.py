"""DeepSpeed ZeRO-1/2 model states, laid out as deepspeed/runtime/engine.py's _save_checkpoint
writes them (DeepSpeed does not run on this CPU machine, so the file is built from its source's
layout): the module's tensors read exactly, nothing else in the pickle is ever executed."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from relexd.errors import CheckpointError
from relexd.io.layouts import scan_run
from relexd.io.reader import open_weights


class SideEffect:
    """Stands for DeepSpeed's own objects in the file; unpickling it for real leaves a mark."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("imported")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _module(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(*shape, generator=g).to(torch.bfloat16))
        for name, shape in (("embed.weight", (11, 8)), ("proj.weight", (8, 8)), ("proj.bias", (8,)))
    )


def _save(run: Path, step: int, module: dict, marker: Path, *, stage: int = 2) -> Path:
    tag = run / f"global_step{step}"
    tag.mkdir(parents=True)
    state = {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items())],
        "lr_scheduler": SideEffect(marker),
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": step * 8,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "ds_config": {
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": True},
            "hook": Payload(marker),
        },
        "ds_version": "0.16.4",
    }
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    (run / "latest").write_text(f"global_step{step}")
    return tag


def test_module_tensors_read_exactly_and_nothing_else_runs(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    module = _module()
    tag = _save(tmp_path / "run", 4, module, marker)
    with open_weights(tag) as reader:
        assert reader.format == "deepspeed"
        assert reader.names() == list(module)
        for name, tensor in module.items():
            assert torch.equal(reader.read(name), tensor)
    assert not marker.exists()  # neither the object's __setstate__ nor os.system ran


def test_complete_once_latest_names_the_tag(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save(run, 4, _module(), tmp_path / "m")
    _save(run, 8, _module(1), tmp_path / "m")
    (run / "latest").write_text("global_step4")  # step 8 written, its tag not yet announced
    result = scan_run(run)
    assert [(r.step, r.layout) for r in result.complete] == [(4, "deepspeed")]
    assert [r.step for r in result.pending] == [8]


def test_zero3_placeholders_are_refused_with_the_setting_to_change(tmp_path: Path) -> None:
    empty = OrderedDict((k, torch.empty(0, dtype=torch.bfloat16)) for k in _module())
    tag = _save(tmp_path / "run", 4, empty, tmp_path / "m", stage=3)
    with pytest.raises(CheckpointError) as caught:
        open_weights(tag)
    assert caught.value.reason == "unsupported"
    assert "stage3_gather_16bit_weights_on_model_save" in str(caught.value)


def test_truncated_model_states_name_the_file(tmp_path: Path) -> None:
    tag = _save(tmp_path / "run", 4, _module(), tmp_path / "m")
    states = tag / "mp_rank_00_model_states.pt"
    os.truncate(states, states.stat().st_size - 100)
    with pytest.raises(CheckpointError) as caught:
        open_weights(tag)
    assert caught.value.reason == "truncated" and str(states) in str(caught.value)
