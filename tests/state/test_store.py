"""The spare sketch: the replaced generation's sketch file is overwritten by the next one in place
— the same inode, so its blocks are reused — and the state written is byte for byte the state
written into new files."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.engine import Engine, EngineConfig
from relexd.errors import CheckpointError
from relexd.state.store import SKETCH_FILE, SPARE_DIR, read_snapshot
from tests.engine.planted import Planted, write_hf_checkpoint
from tests.io.page_cache import evict, resident_pages

STEPS = (10, 20, 30, 40, 50)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spare")
    planted = Planted.make(seed=11, a=0.05, b=0.01, noise=0.002)
    base = write_hf_checkpoint(root / "base", planted.base)
    for step in STEPS:
        write_hf_checkpoint(root / f"checkpoint-{step}", planted.at(step), step)
    bad = {k: v.clone() for k, v in planted.at(60).items()}
    bad["model.layers.0.mlp.up_proj.weight"].view(-1)[3] = float("nan")
    write_hf_checkpoint(root / "checkpoint-60-nan", bad, 60)
    return root, base


def _sketch(state: Path) -> Path:
    snap = read_snapshot(state)
    assert snap.path is not None
    return snap.path / SKETCH_FILE


def _spare(state: Path) -> Path:
    return state / SPARE_DIR / SKETCH_FILE


def _files(state: Path) -> dict[str, bytes]:
    """The committed generation's and anchors' bytes (meta.json holds times, compared apart)."""
    snap = read_snapshot(state)
    assert snap.path is not None
    out = {f"gen/{f.name}": f.read_bytes() for f in snap.path.glob("*.safetensors")}
    out |= {f"{f.parent.name}/{f.name}": f.read_bytes() for f in (state / "anchors").glob("*/*.safetensors")}
    return out


def test_the_next_generation_overwrites_the_spare_and_writes_the_same_bytes(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, base = run
    recycled, fresh = tmp_path / "recycled", tmp_path / "fresh"
    inodes: list[tuple[int, int | None]] = []  # (this generation's sketch, the spare) per ingest
    with (
        Engine(recycled, base, EngineConfig(), threads=2) as engine,
        Engine(fresh, base, EngineConfig(), threads=2, spare_sketch=False) as reference,
    ):
        for step in STEPS:
            engine.ingest(root / f"checkpoint-{step}", step)
            reference.ingest(root / f"checkpoint-{step}", step)
            spare = _spare(recycled)
            inodes.append((_sketch(recycled).stat().st_ino, spare.stat().st_ino if spare.exists() else None))
            assert not _spare(fresh).exists()
            assert _files(recycled) == _files(fresh), step
    assert inodes[0][1] is None  # nothing replaced yet
    for (prev_sketch, prev_spare), (sketch, spare) in itertools.pairwise(inodes):
        assert spare == prev_sketch  # the replaced generation's file became the spare …
        if prev_spare is not None:
            assert sketch == prev_spare  # … and the one before it is this generation's file
    a, b = read_snapshot(recycled).meta, read_snapshot(fresh).meta
    assert a["steps"] == b["steps"] and a["per_tensor"] == b["per_tensor"]


def test_a_failed_ingest_keeps_the_spare_and_the_state(run: tuple[Path, Path], tmp_path: Path) -> None:
    """The generation abandoned mid-way (bad input here; disk full alike) hands its half-written
    file back as the spare: relexd keeps the disk its next try needs, and the next try's state is
    the one an uninterrupted run commits."""
    root, base = run
    state, reference = tmp_path / "state", tmp_path / "reference"
    with Engine(state, base, EngineConfig(), threads=2) as engine:
        for step in STEPS[:3]:
            engine.ingest(root / f"checkpoint-{step}", step)
        spare = _spare(state).stat().st_ino
        before = _files(state)
        with pytest.raises(CheckpointError, match="up_proj"):
            engine.ingest(root / "checkpoint-60-nan", 60)
        assert _files(state) == before
        assert _spare(state).stat().st_ino == spare
        assert [p.name for p in (state / "generations").iterdir()] == [read_snapshot(state).name]
        engine.ingest(root / "checkpoint-40", 40)
        assert _sketch(state).stat().st_ino == spare
    with Engine(reference, base, EngineConfig(), threads=1) as engine:
        for step in STEPS[:4]:
            engine.ingest(root / f"checkpoint-{step}", step)
    assert _files(state) == _files(reference)


def test_no_spare_sketch_gives_the_disk_back(run: tuple[Path, Path], tmp_path: Path) -> None:
    """A state that holds a spare, continued with ``spare_sketch=False``: the spare is deleted at
    open, and the state at rest holds one sketch."""
    root, base = run
    state = tmp_path / "state"
    with Engine(state, base, EngineConfig()) as engine:
        for step in STEPS[:3]:
            engine.ingest(root / f"checkpoint-{step}", step)
    assert _spare(state).exists()
    with Engine(state, base, EngineConfig(), spare_sketch=False) as engine:
        assert not _spare(state).exists()
        engine.ingest(root / "checkpoint-40", 40)
        assert not _spare(state).exists()
    sketches = [p for p in state.rglob("*.safetensors") if p.name == SKETCH_FILE]
    assert sketches == [_sketch(state)]
    assert torch.isfinite(load_file(_sketch(state))["model.norm.weight"]).all()


def test_a_crashed_generation_s_file_becomes_the_spare_at_open(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """What a kill -9 left (an unpublished generation with a partly written sketch) is recycled at
    the next open, not freed and allocated again."""
    root, base = run
    state = tmp_path / "state"
    with Engine(state, base, EngineConfig()) as engine:
        engine.ingest(root / "checkpoint-10", 10)
    orphan = state / "generations" / "g00000099"
    orphan.mkdir()
    (orphan / SKETCH_FILE).write_bytes(b"half written")
    inode = (orphan / SKETCH_FILE).stat().st_ino
    with Engine(state, base, EngineConfig()) as engine:
        assert not orphan.exists()
        assert _spare(state).stat().st_ino == inode
        engine.ingest(root / "checkpoint-20", 20)
        assert _sketch(state).stat().st_ino == inode
        assert engine.steps == [10, 20]
    load_file(_sketch(state))  # a valid file of the right size


@pytest.mark.parametrize("hint", ["prefetch", "release"])
def test_sketch_hints_cover_the_range_in_every_basis_vector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hint: str
) -> None:
    """The column-major sketch keeps each basis vector contiguous: a chunk's read-ahead hint, and
    the hint that drops it once read, are one range per vector, at the same element offsets a read
    of the chunk uses."""
    import os

    from safetensors.torch import save_file

    from relexd.io.safetensors_file import SafetensorsFile
    from relexd.state.store import SKETCH_COLUMNS, SketchFile

    path = tmp_path / "sketch.safetensors"
    save_file({"w": torch.arange(2 * 50, dtype=torch.float32).reshape(2, 50)}, str(path), SKETCH_COLUMNS)
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice))
    )
    monkeypatch.setattr(SafetensorsFile, "_cached", lambda self, offset, length: False)  # uncached: hinted
    advice = os.POSIX_FADV_WILLNEED if hint == "prefetch" else os.POSIX_FADV_DONTNEED
    with SketchFile(path) as sketch:
        start = sketch._files.file("w").info("w").start
        getattr(sketch, hint)("w", 10, 20)
        assert calls == [(start + 40, 40, advice), (start + 4 * 50 + 40, 40, advice)]
        assert torch.equal(sketch.columns("w", 10, 20), torch.arange(100.0).reshape(2, 50)[:, 10:20])


@pytest.mark.parametrize("fits", [False, "rest", True], ids=["outgrows", "rest-fits", "fits"])
def test_the_replaced_basis_leaves_the_page_cache_when_the_state_outgrows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fits: bool | str
) -> None:
    """Where the state outgrows the page cache, the basis an ingest replaces leaves it: it becomes
    the spare, which the next generation overwrites without reading, and its pages would evict the
    new sketch, the base and the anchors that the next ingest does read (bench/README.md, 1.5B).
    Each tensor's basis goes as soon as its pass 2 has read it — while the ingest runs, which is
    when the room is needed — and the rest (pages shared by two tensors) after the commit. Where
    the state fits, it stays: overwriting cached pages is the spare's point. The new basis is
    written around the page cache (O_DIRECT) where even the state without the replaced basis
    outgrows it, and stays cached where that fits ("rest-fits") — the next ingest reads it."""
    import mmap
    import os

    from relexd.engine import ingest as ingest_module
    from relexd.io.safetensors_file import SafetensorsFile

    monkeypatch.setattr(ingest_module, "page_cache_room", lambda: 1 << 50 if fits is True else 1 << 20)
    if fits == "rest":  # room for the state less the replaced basis: the two-sketch set is larger
        one_sketch = ingest_module.CheckpointPass._working_set
        monkeypatch.setattr(
            ingest_module, "state_outgrows_page_cache", lambda working_set, room: working_set > limit[0]
        )
        limit = [0]

        def working_set(self: ingest_module.CheckpointPass, numels: dict[str, int], sketches: int = 2) -> int:
            limit[0] = one_sketch(self, numels, 1)
            return one_sketch(self, numels, sketches)

        monkeypatch.setattr(ingest_module.CheckpointPass, "_working_set", working_set)

    big = "model.embed_tokens.weight"
    shapes = {
        big: ((2048, 512), torch.bfloat16),  # 8 MiB of basis at rank 2: interior pages to look at
        "model.layers.0.mlp.up_proj.weight": ((384, 256), torch.float32),
        "model.norm.weight": ((256,), torch.float32),
    }
    planted = Planted.make(shapes, seed=3, a=0.05, b=0.01, noise=0.002)
    base = write_hf_checkpoint(tmp_path / "base", planted.base)
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    evict(probe)
    if any(resident_pages(probe)):
        pytest.skip(f"the file system of {tmp_path} keeps pages it is told to drop (tmpfs?)")

    margin = (2 << 20) // mmap.PAGESIZE  # a large folio straddling the tensor's ends may stay
    seen: list[int] = []

    def interior_cached(sketch: Path, name: str, numel: int) -> None:
        if name == big:
            with SafetensorsFile(sketch) as f:
                info = f.info(big)
            first, last = info.start // mmap.PAGESIZE + margin, info.end // mmap.PAGESIZE - margin
            seen.append(sum(resident_pages(sketch)[first:last]))

    state = tmp_path / "state"
    with Engine(state, base, EngineConfig(), threads=2) as engine:
        for step in (10, 20, 30):
            checkpoint = write_hf_checkpoint(tmp_path / f"checkpoint-{step}", planted.at(step), step)
            if step == 10:
                assert engine.ingest(checkpoint, step).replaced_sketch is None  # nothing replaced
            else:
                old = _sketch(state)
                inode = old.stat().st_ino
                report = engine.ingest(
                    checkpoint, step, on_tensor=lambda n, k, old=old: interior_cached(old, n, k)
                )
                assert report.replaced_sketch == ("kept" if fits is True else "dropped")
                assert report.new_sketch == ("cached" if fits else "direct")
                assert _spare(state).stat().st_ino == inode  # the replaced basis, now the spare
                if fits is True:
                    assert all(resident_pages(_spare(state))), "the spare left the page cache"
                else:
                    assert not any(resident_pages(_spare(state))), "pages of the replaced basis still cached"
            written = _sketch(state)
            if fits or step == 10:  # "rest": not written around the page cache
                assert all(resident_pages(written))
            else:
                with SafetensorsFile(written) as f:
                    info = f.info(big)
                pages = resident_pages(written)[info.start // mmap.PAGESIZE : info.end // mmap.PAGESIZE]
                assert pages and not any(pages), "the new basis went through the page cache"
    if fits is not True:
        assert seen == [0, 0], "the big tensor's basis was still cached after its pass"


@pytest.mark.parametrize("room", ["fits", "outgrows"])
def test_the_state_is_mapped_where_it_fits_the_page_cache_and_the_result_is_the_read_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: str
) -> None:
    """Where the state fits the page cache the ingest maps the old basis and the scored anchors
    instead of copying them out of it (``SafetensorsFile.view_range``); where it outgrows it, it
    reads them, as mapping measured slower there. Either way the committed state is, byte for
    byte, the state of an ingest that reads everything."""
    import filecmp

    from relexd.engine import ingest as ingest_module
    from relexd.io.safetensors_file import SafetensorsFile

    monkeypatch.setattr(ingest_module, "page_cache_room", lambda: 1 << 50 if room == "fits" else 1 << 10)
    views: list[str] = []
    view_range = SafetensorsFile.view_range

    def counted(self: SafetensorsFile, name: str, *args: int, **kwargs: int) -> torch.Tensor | None:
        views.append(name.split("/")[0] if "/" in name else "sketch")
        return view_range(self, name, *args, **kwargs)

    monkeypatch.setattr(SafetensorsFile, "view_range", counted)
    shapes = {
        "model.embed_tokens.weight": ((512, 64), torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": ((96, 64), torch.float32),
        "model.norm.weight": ((64,), torch.float32),
    }
    planted = Planted.make(shapes, seed=5, a=0.05, b=0.01, noise=0.002)
    base = write_hf_checkpoint(tmp_path / "base", planted.base)
    states = {mode: tmp_path / f"state-{mode}" for mode in ("default", "read")}
    for mode, state in states.items():
        if mode == "read":
            monkeypatch.setattr(ingest_module.CheckpointPass, "maps_state", property(lambda self: False))
        views.clear()
        with Engine(state, base, EngineConfig(), threads=2) as engine:
            for step in (10, 20, 30, 40, 50):  # anchors at the 1st, 2nd and 4th: later ones score them
                checkpoint = write_hf_checkpoint(tmp_path / f"checkpoint-{step}", planted.at(step), step)
                engine.ingest(checkpoint, step)
        if mode == "default":
            if room == "fits":
                assert {"sketch", "v", "x"} <= set(views), f"not mapped: {sorted(set(views))}"
            else:
                assert not views, "mapped although the state outgrows the page cache"
        else:
            assert not views
    sketches = {mode: _sketch(state) for mode, state in states.items()}
    assert filecmp.cmp(sketches["default"], sketches["read"], shallow=False)
    for anchor in (states["default"] / "anchors").rglob("*.safetensors"):
        twin = states["read"] / anchor.relative_to(states["default"])
        assert filecmp.cmp(anchor, twin, shallow=False), anchor


def test_a_state_on_a_network_file_system_is_read_not_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN.md §5: mmap on a network file system can SIGBUS. There the sketch's columns are read
    into the caller's buffer even where the engine asks for a mapping."""
    from safetensors.torch import save_file

    from relexd.state import store

    path = tmp_path / "sketch.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(2, 6)}, path, {"layout": "columns"})
    for network, mapped in ((False, True), (True, False)):
        monkeypatch.setattr(store, "mapping_is_safe", lambda p, network=network: not network)
        with store.SketchFile(path) as sketch:
            out = torch.empty(2, 6)
            columns = sketch.columns("w", 1, 4, out, mapped=True)
            assert torch.equal(columns, torch.tensor([[1.0, 2, 3], [7, 8, 9]]))
            assert (columns.data_ptr() == out.data_ptr()) is not mapped, "mapped on NFS / read on ext4"
