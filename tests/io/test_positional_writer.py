"""PositionalSafetensorsWriter: chunks in any order, from several threads, give exactly the bytes
of a sequential write; an incomplete or misused file is refused and deleted."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.io.safetensors_file import PositionalSafetensorsWriter, StreamingSafetensorsWriter
from tests.io.page_cache import resident_pages

TENSORS = {
    "w": torch.randn(64, 33, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "b": torch.arange(1000, dtype=torch.float32),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
    "q": torch.randn(2, 517, generator=torch.Generator().manual_seed(2)),
}
SPECS = {name: (t.dtype, tuple(t.shape)) for name, t in TENSORS.items()}


def _chunks(size: int = 37) -> list[tuple[str, int, torch.Tensor]]:
    out = []
    for name, t in TENSORS.items():
        flat = t.reshape(-1)
        out += [(name, i, flat[i : i + size]) for i in range(0, flat.numel(), size)]
    return out


def test_shuffled_chunks_from_threads_equal_a_sequential_write(tmp_path: Path) -> None:
    sequential = tmp_path / "seq.safetensors"
    with StreamingSafetensorsWriter(sequential, SPECS, {"layout": "columns"}) as w:
        for name, _, chunk in _chunks():
            w.append(name, chunk)
    chunks = _chunks()
    random.Random(0).shuffle(chunks)
    positional = tmp_path / "pos.safetensors"
    # a tiny flush threshold: background fdatasyncs run while the threads write
    writer = PositionalSafetensorsWriter(positional, SPECS, {"layout": "columns"}, flush_bytes=512)
    threads = [
        threading.Thread(target=lambda part=chunks[k::4]: [writer.write(*c) for c in part]) for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert positional.read_bytes() == sequential.read_bytes()
    loaded = load_file(positional)
    assert all(torch.equal(loaded[n], TENSORS[n]) for n in TENSORS)


def test_a_file_missing_chunks_is_deleted_at_close(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    writer = PositionalSafetensorsWriter(path, SPECS)
    for name, start, chunk in _chunks()[:-1]:
        writer.write(name, start, chunk)
    with pytest.raises(ValueError, match="'q'"):
        writer.close()
    assert not path.exists()


def test_misuse_is_refused_and_abort_deletes(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    writer = PositionalSafetensorsWriter(path, SPECS)
    with pytest.raises(ValueError, match="overruns"):
        writer.write("b", 990, torch.zeros(11))
    with pytest.raises(ValueError, match=r"is torch\.float32"):
        writer.write("b", 0, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no tensor"):
        writer.write("nope", 0, torch.zeros(1))
    writer.abort()
    assert not path.exists()
    with pytest.raises(ValueError, match="closed"):
        writer.write("b", 0, torch.zeros(1))


def test_the_file_is_preallocated_to_its_final_size(tmp_path: Path) -> None:
    """A full disk fails at the start (fallocate), not after the whole ingest."""
    path = tmp_path / "out.safetensors"
    writer = PositionalSafetensorsWriter(path, SPECS)
    size = path.stat().st_size
    for c in _chunks():
        writer.write(*c)
    writer.close()
    assert path.stat().st_size == size


@pytest.mark.parametrize("extra", [-100, 0, 4096])
def test_in_place_over_an_old_file_leaves_no_trace_of_it(tmp_path: Path, extra: int) -> None:
    """A recycled file (shorter, as long, or longer than needed, full of other bytes) ends up byte
    for byte the file a fresh write makes, in the same inode: its blocks were reused, not freed."""
    fresh = tmp_path / "fresh.safetensors"
    writer = PositionalSafetensorsWriter(fresh, SPECS, {"layout": "columns"})
    for c in _chunks():
        writer.write(*c)
    writer.close()
    reused = tmp_path / "reused.safetensors"
    size = fresh.stat().st_size + extra
    reused.write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])
    inode = reused.stat().st_ino
    writer = PositionalSafetensorsWriter(reused, SPECS, {"layout": "columns"}, in_place=True)
    chunks = _chunks()
    random.Random(1).shuffle(chunks)
    for c in chunks:
        writer.write(*c)
    writer.close()
    assert reused.read_bytes() == fresh.read_bytes()
    assert reused.stat().st_ino == inode


def test_abort_can_keep_the_file_for_recycling(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    writer = PositionalSafetensorsWriter(path, SPECS)
    writer.write(*_chunks()[0])
    writer.abort(remove=False)
    assert path.exists()
    with pytest.raises(ValueError, match="closed"):
        writer.write(*_chunks()[1])


def _direct_chunks() -> tuple[dict[str, torch.Tensor], list[tuple[str, int, torch.Tensor]]]:
    """A tensor whose 4 KiB chunks sit in page-aligned buffers (O_DIRECT-able), one chunk of it in
    an unaligned buffer, and a small tensor that is never aligned."""
    from relexd.io.safetensors_file import aligned_empty

    big = torch.randn(2, 4096, generator=torch.Generator().manual_seed(3))
    small = torch.arange(300, dtype=torch.float32).reshape(3, 100)
    chunks: list[tuple[str, int, torch.Tensor]] = []
    flat = big.reshape(-1)
    for i in range(0, flat.numel(), 1024):
        buf = aligned_empty((1024,), torch.float32)
        chunks.append(("big", i, buf.copy_(flat[i : i + 1024])))
    unaligned = torch.empty(1025)[1:]  # 4 bytes past an allocation's start
    chunks[3] = ("big", 3 * 1024, unaligned.copy_(flat[3 * 1024 : 4 * 1024]))
    chunks += [("small", i, small.reshape(-1)[i : i + 64]) for i in range(0, 300, 64)]
    return {"big": big, "small": small}, chunks


def test_direct_writes_give_the_bytes_of_plain_ones_around_the_page_cache(tmp_path: Path) -> None:
    """``direct=True`` changes where the bytes go (around the page cache), never which: the file
    equals a plain write's, loads with the reference library, and its data starts 4 KiB-aligned."""
    from relexd.io.safetensors_file import DIRECT_ALIGN, SafetensorsFile

    tensors, chunks = _direct_chunks()
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    files = {}
    for direct in (False, True):
        path = files[direct] = tmp_path / f"direct-{direct}.safetensors"
        writer = PositionalSafetensorsWriter(path, specs, align=DIRECT_ALIGN, direct=direct, flush_bytes=8192)
        if direct and not writer.direct:
            writer.abort()
            pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
        shuffled = list(chunks)
        random.Random(1).shuffle(shuffled)
        for chunk in shuffled:
            writer.write(*chunk)
        writer.close()
    with SafetensorsFile(files[True]) as f:  # reads the header's page only
        info = f.info("big")
    assert info.start % DIRECT_ALIGN == 0
    # the aligned chunks went around the page cache; the one from an unaligned buffer through it
    resident = resident_pages(files[True])[info.start // DIRECT_ALIGN : info.end // DIRECT_ALIGN]
    assert resident == [False, False, False, True, False, False, False, False]
    assert files[True].read_bytes() == files[False].read_bytes()
    loaded = load_file(files[True])
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_a_device_refusing_the_alignment_falls_back_to_plain_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL from an O_DIRECT write (a device with larger blocks than 4 KiB) is no error: that
    write and all later ones go through the page cache."""
    import errno
    import os

    from relexd.io.safetensors_file import DIRECT_ALIGN

    tensors, chunks = _direct_chunks()
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    path = tmp_path / "out.safetensors"
    writer = PositionalSafetensorsWriter(path, specs, align=DIRECT_ALIGN, direct=True)
    if not writer.direct:
        writer.abort()
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    real_pwrite, direct_fd = os.pwrite, writer._direct_fd

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    for chunk in chunks:
        writer.write(*chunk)
    assert not writer.direct
    writer.close()
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
