"""open_weights finds, validates and reads every weights layout, and never runs a pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from relexd.errors import CheckpointError
from relexd.io.reader import open_weights
from relexd.io.safetensors_file import read_header

STATE = {
    "model.embed.weight": torch.randn(8, 4, generator=torch.Generator().manual_seed(2)),
    "model.layer.weight": torch.randn(4, 4, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16),
    "model.layer.bias": torch.arange(4, dtype=torch.float16),
    "model.norm.weight": torch.ones(4),
}


def _check_equal(reader, expected: dict[str, torch.Tensor]) -> None:
    assert set(reader.names()) == set(expected)
    for name, tensor in expected.items():
        info = reader.info(name)
        assert (info.dtype, info.shape, info.numel) == (
            tensor.dtype,
            tuple(tensor.shape),
            tensor.numel(),
        )
        assert torch.equal(reader.read(name), tensor), name
        flat = tensor.reshape(-1)
        assert torch.equal(reader.read_range(name, 1, 3), flat[1:3]), name
    assert reader.total_bytes() == sum(t.numel() * t.element_size() for t in expected.values())


def _sharded(directory: Path) -> Path:
    directory.mkdir()
    names = list(STATE)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, members in shards.items():
        save_file({name: STATE[name] for name in members}, directory / file)
    weight_map = {name: file for file, members in shards.items() for name in members}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return directory


def _reason(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        open_weights(path)
    return caught.value


def test_single_file_directory(tmp_path: Path) -> None:
    save_file(STATE, tmp_path / "model.safetensors")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not weights")
    (tmp_path / "model.safetensors.tmp1234").write_bytes(b"partial")
    with open_weights(tmp_path) as reader:
        assert reader.format == "safetensors"
        assert reader.path == tmp_path
        _check_equal(reader, STATE)
        assert reader.info("model.norm.weight").file == tmp_path / "model.safetensors"
        assert reader.shard_files() == {"model.safetensors": reader.names()}


def test_single_file_path(tmp_path: Path) -> None:
    path = tmp_path / "model_step_120.safetensors"
    save_file(STATE, path)
    with open_weights(path) as reader:
        assert reader.path == path
        _check_equal(reader, STATE)


def test_only_other_safetensors_name_in_directory(tmp_path: Path) -> None:
    save_file(STATE, tmp_path / "consolidated.safetensors")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    with open_weights(tmp_path) as reader:
        _check_equal(reader, STATE)


def test_sharded(tmp_path: Path) -> None:
    with open_weights(_sharded(tmp_path / "ckpt")) as reader:
        _check_equal(reader, STATE)
        shards = reader.shard_files()
        assert list(shards) == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
        for file, names in shards.items():  # storage order within a file
            assert names == list(read_header(tmp_path / "ckpt" / file).tensors)
        assert reader.names() == [n for names in reader.shard_files().values() for n in names]


def test_sharded_missing_shard(tmp_path: Path) -> None:
    directory = _sharded(tmp_path / "ckpt")
    (directory / "model-00002-of-00002.safetensors").unlink()
    error = _reason(directory)
    assert error.reason == "missing_shard"
    assert error.path.name == "model-00002-of-00002.safetensors"


def test_sharded_truncated_shard(tmp_path: Path) -> None:
    directory = _sharded(tmp_path / "ckpt")
    shard = directory / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    error = _reason(directory)
    assert (error.reason, error.path) == ("truncated", shard)


def test_index_naming_tensor_absent_from_shard(tmp_path: Path) -> None:
    directory = _sharded(tmp_path / "ckpt")
    index = directory / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    assert _reason(directory).reason == "corrupt_header"


@pytest.mark.parametrize("text", ["{oops", "[]", '{"weight_map": {"a": 3}}', '{"weight_map": {"a": "../x"}}'])
def test_bad_index(tmp_path: Path, text: str) -> None:
    directory = _sharded(tmp_path / "ckpt")
    (directory / "model.safetensors.index.json").write_text(text)
    error = _reason(directory)
    assert error.reason == "corrupt_header"
    assert error.path.name == "model.safetensors.index.json"


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    error = _reason(tmp_path)
    assert error.reason == "missing_shard"
    assert "no weights file" in error.message


def test_an_adapter_is_the_weights_of_an_adapter_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")  # and it is validated like any file
    error = _reason(tmp_path)
    assert error.reason == "truncated" and error.path == tmp_path / "adapter_model.safetensors"


def test_missing_path_is_rotation(tmp_path: Path) -> None:
    assert _reason(tmp_path / "checkpoint-5").reason == "rotated"


def test_bin_state_dict(tmp_path: Path) -> None:
    torch.save(STATE, tmp_path / "pytorch_model.bin")
    with open_weights(tmp_path) as reader:
        assert reader.format == "bin"
        _check_equal(reader, STATE)


def test_bin_tied_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"a": base, "a_t": base.t(), "tied": base}, tmp_path / "pytorch_model.bin")
    with open_weights(tmp_path) as reader:
        assert torch.equal(reader.read("a_t"), base.t())
        assert torch.equal(reader.read_range("a_t", 0, 4), base.t().reshape(-1)[:4])
        reader.read("tied").zero_()
        assert torch.equal(reader.read("a"), base)


def test_sharded_bin(tmp_path: Path) -> None:
    names = list(STATE)
    torch.save({n: STATE[n] for n in names[:1]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({n: STATE[n] for n in names[1:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i == 0 else 2}-of-00002.bin" for i, n in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_weights(tmp_path) as reader:
        assert reader.format == "bin"
        _check_equal(reader, STATE)


class _Payload:
    """Unpickling this would create ``marker``: proves whether a loader executes pickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_bin_with_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    torch.save({"w": torch.ones(2), "evil": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    error = _reason(tmp_path)
    assert error.reason == "unsupported"
    assert error.path == tmp_path / "pytorch_model.bin"
    assert not marker.exists()


def test_payload_would_run_under_plain_pickle(tmp_path: Path) -> None:
    """Guards the test above: the payload really does create its marker when unpickled."""
    marker = tmp_path / "executed"
    torch.save({"evil": _Payload(marker)}, tmp_path / "x.bin")
    torch.load(tmp_path / "x.bin", weights_only=False)
    assert marker.exists()


def test_bin_not_a_flat_state_dict(tmp_path: Path) -> None:
    torch.save({"state_dict": STATE}, tmp_path / "pytorch_model.bin")
    assert _reason(tmp_path).reason == "unsupported"


def test_legacy_bin_format(tmp_path: Path) -> None:
    torch.save(STATE, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    error = _reason(tmp_path)
    assert error.reason == "unsupported"
    assert "zip" in error.message
