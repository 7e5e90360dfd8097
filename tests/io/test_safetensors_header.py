"""read_header accepts what the reference writer produces and names every way a file can be bad."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from relexd.errors import CheckpointError
from relexd.io.safetensors_file import DTYPES, SafetensorsFile, dtype_code, read_header
from tests.io.page_cache import evict, resident_pages


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _reason(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        read_header(path)
    assert caught.value.path == path
    return caught.value.reason


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.bfloat16),
            "scalar": torch.tensor(3, dtype=torch.int64),
            "empty": torch.zeros(0, 5, dtype=torch.float16),
        },
        path,
        metadata={"format": "pt"},
    )
    return path


def test_reference_file_passes(good: Path) -> None:
    header = read_header(good)
    assert header.file_size == good.stat().st_size
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == {"a", "b", "scalar", "empty"}
    starts = [info.start for info in header.tensors.values()]
    assert starts == sorted(starts)
    a = header.tensors["a"]
    assert (a.dtype, a.shape, a.numel, a.end - a.start) == (torch.float32, (2, 3), 6, 24)
    assert header.tensors["scalar"].shape == ()
    assert header.tensors["scalar"].numel == 1
    assert max(info.end for info in header.tensors.values()) == header.file_size


def test_truncated_file(good: Path) -> None:
    os.truncate(good, good.stat().st_size - 1)
    with pytest.raises(CheckpointError) as caught:
        read_header(good)
    assert caught.value.reason == "truncated"
    assert "truncated?" in caught.value.message


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00")
    assert _reason(path) == "truncated"


def test_header_cut_short_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a":')
    assert _reason(path) == "truncated"


def test_trailing_bytes_are_corrupt(good: Path) -> None:
    with open(good, "ab") as file:
        file.write(b"\0" * 8)
    assert _reason(good) == "corrupt_header"


def test_absurd_header_length(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}" + b"\0" * 64)
    assert _reason(path) == "corrupt_header"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe{}", b'{"a":1,"a":2}'])
def test_garbage_json(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    assert _reason(path) == "corrupt_header"


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": [1]},
        "not an object",
    ],
)
def test_bad_entry(tmp_path: Path, entry: object) -> None:
    path = _raw_file(tmp_path / "x.safetensors", {"t": entry}, b"\0" * 4)
    assert _reason(path) == "corrupt_header"


def test_bad_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": {"n": 1}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    assert _reason(_raw_file(tmp_path / "x.safetensors", header, b"\0")) == "corrupt_header"


@pytest.mark.parametrize(
    ("first", "second"),
    [([0, 8], [4, 12]), ([0, 8], [12, 20]), ([4, 12], [12, 20])],
    ids=["overlap", "gap", "not-starting-at-zero"],
)
def test_offsets_must_be_contiguous(tmp_path: Path, first: list, second: list) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": first},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": second},
    }
    end = max(first[1], second[1])
    path = _raw_file(tmp_path / "x.safetensors", header, b"\0" * end)
    assert _reason(path) == "corrupt_header"


def test_nbytes_must_match_shape(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    path = _raw_file(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError) as caught:
        read_header(path)
    assert caught.value.reason == "corrupt_header"
    assert "needs 12" in caught.value.message


def test_missing_file_is_rotation(tmp_path: Path) -> None:
    assert _reason(tmp_path / "gone.safetensors") == "rotated"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file(good: Path) -> None:
    good.chmod(0)
    try:
        assert _reason(good) == "permission"
    finally:
        good.chmod(0o644)


def test_permission_denied_maps_to_permission(good: Path, monkeypatch) -> None:
    """Runs as root too: the OS refusal is simulated where chmod cannot produce it."""

    def refuse(path: object, flags: int) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    assert _reason(good) == "permission"


def test_directory_is_io_error(tmp_path: Path) -> None:
    assert _reason(tmp_path) == "io"


def test_dtype_codes_round_trip() -> None:
    for code, dtype in DTYPES.items():
        assert dtype_code(dtype) == code
    assert dtype_code(torch.bfloat16) == "BF16"
    with pytest.raises(ValueError):
        dtype_code(torch.complex128)


def test_an_owner_only_file_of_another_user_says_why_and_what_to_do(good: Path, monkeypatch) -> None:
    """safetensors >= 0.8 saves every file 0600 (measured with 0.8.0: save_file under umask 022):
    the error names the mode and owner, and the fix."""
    save_file({"x": torch.zeros(2)}, str(good.with_name("fresh.safetensors")))
    assert good.with_name("fresh.safetensors").stat().st_mode & 0o777 == 0o600  # the writer's fact
    good.chmod(0o600)
    real_stat = os.stat

    def owned_by_another(path: object, *a: object, **kw: object) -> os.stat_result:
        st = real_stat(path, *a, **kw)  # type: ignore[arg-type]
        fields = list(st)
        fields[4] = os.geteuid() + 4242  # st_uid
        return os.stat_result(fields)

    def refuse(path: object, flags: int) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "stat", owned_by_another)
    with pytest.raises(CheckpointError) as raised:
        read_header(good)
    assert raised.value.reason == "permission"
    assert "mode 0600" in str(raised.value) and "Run relexd as that user" in str(raised.value)
    good.chmod(0o640)  # group-readable: a group grant would work, so no such hint
    with pytest.raises(CheckpointError) as raised:
        read_header(good)
    assert "(mode" not in str(raised.value)


@pytest.fixture
def advised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[tuple[int, int, int]]]:
    """A file of two tensors, and the (offset, length, advice) of every posix_fadvise call."""
    path = tmp_path / "t.safetensors"
    save_file(
        {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(100, dtype=torch.bfloat16)}, path
    )
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice))
    )
    return path, calls


def _refuse(*_args: object) -> None:
    raise OSError(22, "Invalid argument")


def test_prefetch_asks_for_the_bytes_of_the_element_range_only(
    advised: tuple[Path, list[tuple[int, int, int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-ahead hint names exactly the bytes a read of the same range would read (clipped
    to the tensor), asks nothing for an empty range, and a refused hint is no error (the file's
    pages taken for uncached: the next test is about that)."""
    path, calls = advised
    monkeypatch.setattr(SafetensorsFile, "_cached", lambda self, offset, length: False)
    with SafetensorsFile(path) as f:
        b = f.info("b")
        f.prefetch("b", 10, 30)
        f.prefetch("b", 90, 500)  # clipped at the tensor's end
        f.prefetch("b", 50, 50)  # empty: nothing asked
        assert calls == [
            (b.start + 20, 40, os.POSIX_FADV_WILLNEED),
            (b.start + 180, 20, os.POSIX_FADV_WILLNEED),
        ]
        monkeypatch.setattr(os, "posix_fadvise", _refuse)
        f.prefetch("b", 0, 100)  # a hint: its failure is not the read's
        assert torch.equal(f.read_range("b", 10, 30), torch.arange(10, 30, dtype=torch.bfloat16))


def test_prefetch_asks_nothing_for_a_range_the_page_cache_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel would look up every page of a cached range to find nothing to read: the hint is
    given only where the range's first or last page is not cached (probed with reads that may not
    wait for the disk)."""
    path = tmp_path / "t.safetensors"
    save_file({"b": torch.arange(100, dtype=torch.bfloat16)}, path)
    calls: list[tuple[int, int, int]] = []

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))

    with SafetensorsFile(path) as f:
        f.read_range("b", 0, 100)
        with monkeypatch.context() as patched:
            patched.setattr(os, "posix_fadvise", recording)
            f.prefetch("b", 0, 100)
        assert calls == []  # just written and read: cached
        evict(path)
        if any(resident_pages(path)):
            pytest.skip(f"the file system of {path} keeps its pages (tmpfs?)")
        monkeypatch.setattr(os, "posix_fadvise", recording)
        f.prefetch("b", 0, 100)
        assert calls == [(f.info("b").start, 200, os.POSIX_FADV_WILLNEED)]


def test_release_drops_the_bytes_of_the_element_range_or_the_whole_file(
    advised: tuple[Path, list[tuple[int, int, int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropping pages names the same bytes a read of the range would read (default: the whole
    tensor), or the whole file without a name; a refused hint is no error."""
    path, calls = advised
    with SafetensorsFile(path) as f:
        b = f.info("b")
        f.release("b", 10, 30)
        f.release("b")
        f.release()
        assert calls == [
            (b.start + 20, 40, os.POSIX_FADV_DONTNEED),
            (b.start, 200, os.POSIX_FADV_DONTNEED),
            (0, 0, os.POSIX_FADV_DONTNEED),
        ]
        monkeypatch.setattr(os, "posix_fadvise", _refuse)
        f.release()
        assert torch.equal(f.read_range("b", 10, 30), torch.arange(10, 30, dtype=torch.bfloat16))
