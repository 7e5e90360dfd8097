"""StreamingSafetensorsWriter produces files the reference reader accepts, and refuses misuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from relexd.io.safetensors_file import StreamingSafetensorsWriter, read_header

TENSORS = {
    "w": torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "b": torch.arange(7, dtype=torch.float32),
    "scalar": torch.tensor(4, dtype=torch.int32),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
    "mask": torch.tensor([[True, False], [False, True]]),
}


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def test_round_trip_with_chunks(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    with StreamingSafetensorsWriter(path, _specs(TENSORS), {"step": "120"}) as writer:
        flat = TENSORS["w"].reshape(-1)
        for start in range(0, flat.numel(), 7):
            writer.append("w", flat[start : start + 7])
        writer.append("b", TENSORS["b"][:3])
        writer.append("b", TENSORS["b"][3:])
        writer.append("scalar", TENSORS["scalar"])
        writer.append("mask", TENSORS["mask"])  # "empty" needs no data
    loaded = load_file(path)
    assert loaded.keys() == TENSORS.keys()
    for name, expected in TENSORS.items():
        assert loaded[name].dtype == expected.dtype
        assert torch.equal(loaded[name], expected), name
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"step": "120"}
    header = read_header(path)
    assert list(header.tensors) == list(TENSORS)  # spec order is storage order
    assert (header.tensors["w"].start - 8) % 8 == 0  # header padded to 8 bytes


def test_non_contiguous_chunks(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    source = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    with StreamingSafetensorsWriter(path, {"t": (torch.float64, (4, 3))}) as writer:
        writer.append("t", source.t())
    assert torch.equal(load_file(path)["t"], source.t().contiguous())


def test_wrong_order_raises(tmp_path: Path) -> None:
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", _specs(TENSORS))
    with pytest.raises(ValueError, match="expected data of 'w'"):
        writer.append("b", TENSORS["b"])
    writer.abort()


def test_wrong_dtype_raises(tmp_path: Path) -> None:
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", _specs(TENSORS))
    with pytest.raises(ValueError, match="bfloat16"):
        writer.append("w", TENSORS["w"].float())
    writer.abort()


def test_overrun_raises(tmp_path: Path) -> None:
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", {"t": (torch.int8, (3,))})
    with pytest.raises(ValueError, match="overruns"):
        writer.append("t", torch.zeros(4, dtype=torch.int8))
    writer.abort()


def test_incomplete_close_raises_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(path, _specs(TENSORS))
    writer.append("w", TENSORS["w"])
    writer.append("b", TENSORS["b"][:2])
    with pytest.raises(ValueError, match="'b'"):
        writer.close()
    assert not path.exists()


def test_exception_in_context_aborts(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError), StreamingSafetensorsWriter(path, _specs(TENSORS)) as writer:
        writer.append("w", TENSORS["w"])
        assert path.exists()
        raise RuntimeError("boom")
    assert not path.exists()


def test_abort_removes_file_but_not_after_close(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(path, {"t": (torch.float32, (2,))})
    writer.abort()
    assert not path.exists()

    writer = StreamingSafetensorsWriter(path, {"t": (torch.float32, (2,))})
    writer.append("t", torch.ones(2))
    writer.close()
    writer.abort()
    assert torch.equal(load_file(path)["t"], torch.ones(2))
