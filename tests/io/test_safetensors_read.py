"""SafetensorsFile reads exactly what safetensors' own reader reads, and notices files shrinking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from relexd.errors import CheckpointError
from relexd.io.safetensors_file import SafetensorsFile, read_header


@pytest.fixture
def path(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7, generator=generator),
        "bf16": torch.randn(3, 11, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(13, generator=generator).to(torch.float16),
        "i64": torch.arange(-20, 20, dtype=torch.int64).reshape(4, 10),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(2, 0, dtype=torch.bfloat16),
    }
    file = tmp_path / "model.safetensors"
    save_file(tensors, file)
    return file


def _reference(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118


def test_read_equals_safe_open(path: Path) -> None:
    reference = _reference(path)
    with SafetensorsFile(path) as file:
        assert sorted(file.names()) == sorted(reference)
        for name, expected in reference.items():
            got = file.read(name)
            assert got.dtype == expected.dtype, name
            assert got.shape == expected.shape, name
            assert torch.equal(got, expected), name


def test_read_range_equals_flattened_slices(path: Path) -> None:
    reference = _reference(path)
    with SafetensorsFile(path) as file:
        for name in ("f32", "bf16", "f16", "i64", "u8"):
            flat = reference[name].reshape(-1)
            for start, stop in ((0, 1), (3, 9), (0, flat.numel()), (flat.numel(), flat.numel())):
                got = file.read_range(name, start, stop)
                assert got.dtype == flat.dtype
                assert torch.equal(got, flat[start:stop]), (name, start, stop)
        with pytest.raises(ValueError):
            file.read_range("f32", 30, 36)
        with pytest.raises(KeyError):
            file.read("nope")


def test_read_returns_owned_writable_tensors(path: Path) -> None:
    with SafetensorsFile(path) as file:
        first = file.read("f32")
        first.zero_()
        assert not torch.equal(file.read("f32"), first)


def test_truncated_after_validation(path: Path) -> None:
    with SafetensorsFile(path) as file:
        last = max(file.header.tensors.values(), key=lambda info: info.end)
        os.truncate(path, last.start + 1)
        with pytest.raises(CheckpointError) as caught:
            file.read(last.name)
        assert caught.value.reason == "truncated"
        assert caught.value.path == path


def test_given_header_is_checked_against_size(path: Path) -> None:
    header = read_header(path)
    os.truncate(path, header.file_size - 2)
    with pytest.raises(CheckpointError) as caught:
        SafetensorsFile(path, header)
    assert caught.value.reason == "truncated"


def test_replaced_file_still_reads_validated_inode(path: Path, tmp_path: Path) -> None:
    expected = _reference(path)["f32"]
    with SafetensorsFile(path) as file:
        other = tmp_path / "other.safetensors"
        save_file({"f32": torch.zeros(5, 7)}, other)
        os.replace(other, path)
        assert torch.equal(file.read("f32"), expected)


def test_closed_file_refuses_reads(path: Path) -> None:
    file = SafetensorsFile(path)
    file.close()
    with pytest.raises(ValueError):
        file.read("f32")


def _aligned_file(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A file whose tensor "big" starts 4 KiB-aligned, written with the engine's own writer."""
    from relexd.io.safetensors_file import DIRECT_ALIGN, PositionalSafetensorsWriter

    big = torch.randn(4, 4096, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "aligned.safetensors"
    writer = PositionalSafetensorsWriter(path, {"big": (torch.float32, (4, 4096))}, align=DIRECT_ALIGN)
    writer.write("big", 0, big)
    writer.close()
    return path, big


def test_direct_reads_give_the_bytes_of_plain_ones_around_the_page_cache(tmp_path: Path) -> None:
    """``direct=True`` reads aligned ranges into aligned buffers with O_DIRECT — not through the page
    cache — and the same bytes as a plain read; an unaligned range or buffer is read plainly."""
    from relexd.io.safetensors_file import aligned_empty
    from tests.io.page_cache import evict, resident_pages

    path, big = _aligned_file(tmp_path)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    evict(path)
    flat = big.reshape(-1)
    with SafetensorsFile(path) as f:
        start = f.info("big").start
        out = aligned_empty((8192,), torch.float32)
        assert torch.equal(f.read_range("big", 4096, 12288, out, direct=True), flat[4096:12288])
        pages = resident_pages(path)[start // 4096 :]
        assert not any(pages[4:12]), "a direct read went through the page cache"
        unaligned = torch.empty(8193, dtype=torch.float32)[1:]  # the buffer, 4 bytes off
        assert torch.equal(f.read_range("big", 0, 8192, unaligned, direct=True), flat[:8192])
        assert torch.equal(f.read_range("big", 1, 1025, out, direct=True), flat[1:1025])  # the range
        assert any(resident_pages(path)[start // 4096 :][:4]), "the plain reads bypassed the cache?"


def test_a_device_refusing_direct_reads_falls_back_to_plain_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL from an O_DIRECT read (a device with larger blocks than 4 KiB) is no error: that read
    and all later ones are plain."""
    import errno

    from relexd.io.safetensors_file import aligned_empty

    path, big = _aligned_file(tmp_path)
    real_preadv, calls = os.preadv, {"direct": 0}
    with SafetensorsFile(path) as f:
        if f._direct_descriptor() is None:
            pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")

        def preadv(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
            if fd == f._direct_fd:
                calls["direct"] += 1
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset, *flags)

        monkeypatch.setattr(os, "preadv", preadv)
        out = aligned_empty((4096,), torch.float32)
        for _ in range(2):
            assert torch.equal(f.read_range("big", 4096, 8192, out, direct=True), big[1])
        assert calls["direct"] == 1


def _mapped_pages() -> int:
    """Pages of files this process has mapped (RssFile, in pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024 // 4096
    raise AssertionError("no RssFile in /proc/self/status")


def test_mapped_views_give_the_bytes_of_plain_reads(path: Path) -> None:
    """``view_range`` (relexd's own state files) returns, in place, what ``read_range`` copies;
    with ``rows`` it gives rows ``row_stride`` elements apart, as the sketch's basis vectors lie."""
    reference = _reference(path)
    with SafetensorsFile(path, mapped=True) as file:
        for name in ("f32", "bf16", "i64", "u8"):
            flat = reference[name].reshape(-1)
            for start, stop in ((0, flat.numel()), (1, 4), (3, flat.numel() - 1)):
                view = file.view_range(name, start, stop)
                assert view is not None
                assert torch.equal(view[0], flat[start:stop]) and torch.equal(
                    view[0], file.read_range(name, start, stop)
                )
                file.unmap(name, start, stop)
        rows = file.view_range("f32", 2, 5, rows=5, row_stride=7)  # columns 2-4 of a 5 × 7 matrix
        assert rows is not None and torch.equal(rows, reference["f32"][:, 2:5])
        with pytest.raises(ValueError, match="outside"):
            file.view_range("f32", 2, 5, rows=6, row_stride=7)
    with SafetensorsFile(path) as file:  # not ours to map: a checkpoint
        assert file.view_range("f32", 0, 3) is None


def test_a_mapped_file_cut_short_raises_instead_of_killing_the_process(path: Path) -> None:
    """A mapped page past the end of the file would raise SIGBUS when touched; the view's pages are
    populated first, so the read fails with an error naming the file instead."""
    with SafetensorsFile(path, mapped=True) as file:
        last = max(file.header.tensors.values(), key=lambda info: info.end)
        assert file.view_range(last.name, 0, 1) is not None  # mapped while the file was whole
        file.unmap(last.name, 0, 1)
        os.truncate(path, 4096 * (last.start // 4096))
        with pytest.raises(CheckpointError) as caught:
            file.view_range(last.name, 0, last.numel)
        assert caught.value.path == path and "cannot be read" in str(caught.value)


def test_unmapped_views_leave_no_pages_in_the_process(tmp_path: Path) -> None:
    """Views are unmapped after use, so the process's RSS holds only the chunks in use, however
    large the file (here 32 MiB read in 1 MiB chunks)."""
    file_path = tmp_path / "big.safetensors"
    save_file({"v": torch.randn(8 << 20)}, file_path)
    chunk = 256 << 10
    with SafetensorsFile(file_path, mapped=True) as file:
        before = _mapped_pages()
        total = 0.0
        for start in range(0, 8 << 20, chunk):
            view = file.view_range("v", start, start + chunk)
            assert view is not None
            total += float(view.sum())
            del view
            file.unmap("v", start, start + chunk)
        assert _mapped_pages() - before < (4 << 20) // 4096, "mapped pages of read chunks stayed mapped"
        assert total == pytest.approx(float(file.read("v").sum()), rel=1e-3, abs=1e-1)
