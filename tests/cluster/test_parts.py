"""A generation computed in parts by several workers is the state one host commits, and any
worker's failure leaves the published state as it was (in-process transport; the Ray transport
runs the same in tests/cluster/test_ray.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.cluster import coordinator
from relexd.cluster.coordinator import PartitionedTensors
from relexd.engine import Engine, EngineConfig
from relexd.errors import CheckpointError, WorkerLost
from relexd.state.store import read_snapshot
from tests.cluster.inprocess import InProcess
from tests.cluster.state_view import assert_same_state, committed
from tests.daemon.trainer_sim import hf_save
from tests.engine.planted import write_hf_checkpoint
from tests.engine.test_workers import STEPS


def _engine(state: Path, base: Path, workers: int | None, config: EngineConfig) -> Engine:
    if workers is None:
        return Engine(state, base, config)
    backend = PartitionedTensors(InProcess(base, config, workers), state)
    return Engine(state, base, config, backend=backend)


def _follow(root: Path, base: Path, state: Path, workers: int | None, steps: Sequence[int] = STEPS) -> None:
    with _engine(state, base, workers, EngineConfig()) as engine:
        for step in steps:
            engine.ingest(root / f"checkpoint-{step}", step)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parts_commit_the_single_host_state_bit_for_bit(
    run: tuple[Path, Path], reference: Path, tmp_path: Path, workers: int
) -> None:
    root, base = run
    _follow(root, base, tmp_path / "state", workers)
    assert_same_state(reference, tmp_path / "state")
    snap = read_snapshot(tmp_path / "state")
    parts = snap.meta["partition"]["parts"]
    assert len(parts) == workers and sorted(n for p in parts for n in p) == sorted(snap.meta["per_tensor"])
    assert set(snap.path.iterdir()) == snap.files()
    assert len([f for f in snap.files() if f.name.startswith("sketch-")]) == workers
    meta, _ = committed(tmp_path / "state")
    assert meta["anchors"]  # the anchors, written in parts too, took part


def test_a_changed_worker_count_is_rebalanced_and_changes_nothing(
    run: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    root, base = run
    state = tmp_path / "state"
    _follow(root, base, state, 2, STEPS[:3])
    _follow(root, base, state, 3, STEPS[3:5])  # 2 → 3 workers
    _follow(root, base, state, None, STEPS[5:])  # and back to one host
    assert_same_state(reference, state)


def test_bad_input_in_one_part_is_the_single_host_error_and_keeps_the_state(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, base = run
    state = tmp_path / "state"
    bad = {k: v.clone() for k, v in load_file(root / "checkpoint-20" / "model.safetensors").items()}
    bad["model.layers.4.mlp.up_proj.weight"].view(-1)[5] = float("nan")
    write_hf_checkpoint(tmp_path / "bad", bad)
    with _engine(state, base, 2, EngineConfig()) as engine:
        engine.ingest(root / "checkpoint-10", 10)
        before = committed(state)
        with pytest.raises(CheckpointError, match=r"model\.layers\.4\.mlp") as info:
            engine.ingest(tmp_path / "bad", 20)
        assert info.value.reason == "non_finite"
        assert engine.steps == [10]
    after = committed(state)
    assert after[0] == before[0] and all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert [p.name for p in (state / "generations").iterdir()] == [read_snapshot(state).name]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_lost_worker_abandons_the_generation_and_the_retry_ends_in_the_same_state(
    run: tuple[Path, Path], reference: Path, tmp_path: Path, when: str
) -> None:
    """Lost before writing anything, or after its part was written (its result never came): the
    generation is abandoned either way, its files are gone, and retrying ends where one host does."""
    root, base = run
    state = tmp_path / "state"
    config = EngineConfig()
    transport = InProcess(base, config, 2)
    with Engine(state, base, config, backend=PartitionedTensors(transport, state)) as engine:
        for step in STEPS:
            if step == STEPS[3]:  # an anchor-making checkpoint: its anchor parts are abandoned too

                def lose(index: int, job: object) -> bool:
                    if index == 1 and when == "before":
                        raise WorkerLost("worker 1 lost (test)")
                    return index == 1

                transport.before = lose
                with pytest.raises(WorkerLost):
                    engine.ingest(root / f"checkpoint-{step}", step)
                transport.before = None
                assert len(list((state / "generations").iterdir())) == 1
            engine.ingest(root / f"checkpoint-{step}", step)
    assert_same_state(reference, state)


def test_a_hung_worker_is_restarted_after_the_timeout_and_the_generation_abandoned(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, base = run
    state = tmp_path / "state"
    config = EngineConfig()
    transport = InProcess(base, config, 2)
    reported: list[tuple[int, bool, float | None]] = []
    backend = PartitionedTensors(
        transport, state, timeout_s=1.0, on_part=lambda w: reported.append((w.index, w.up, w.last_seconds))
    )
    with Engine(state, base, config, backend=backend) as engine:
        engine.ingest(root / "checkpoint-10", 10)
        transport.hung = {1}
        reported.clear()
        with pytest.raises(WorkerLost, match=r"worker\(s\) \[1\] sent no result within 1 s"):
            engine.ingest(root / "checkpoint-20", 20)
        assert transport.restarted == [1] and not backend.status[1].up
        assert reported[-1] == (1, False, None)  # the daemon's metrics hear that it is down
        assert engine.steps == [10] and len(list((state / "generations").iterdir())) == 1
        transport.hung = set()
        engine.ingest(root / "checkpoint-20", 20)  # probed back up first, then the retry
        assert engine.steps == [10, 20] and backend.status[1].up


def test_idle_workers_free_the_buffers_they_keep_once_per_idle_spell(
    run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's idle release (``Engine.release_buffers``) reaches the workers: each frees what
    its tasks kept for the next ingest, only once the workers were idle long enough, once per idle
    spell; a worker lost meanwhile is marked down and probed before the next ingest."""
    root, base = run
    state = tmp_path / "state"
    config = EngineConfig()
    transport = InProcess(base, config, 2)
    sent: list[tuple[int, str]] = []

    def record(index: int, job: object) -> bool:
        sent.append((index, type(job).__name__))
        return False

    transport.before = record
    backend = PartitionedTensors(transport, state)
    pools = [part.pool.buffers for part in transport.parts]
    with Engine(state, base, config, backend=backend) as engine:
        engine.ingest(root / "checkpoint-10", 10)
        kept = [pool.kept_bytes for pool in pools]
        assert all(kept), "the workers keep their tasks' buffers for the next ingest"
        sent.clear()
        assert engine.release_buffers(idle_for=3600.0) == 0  # not idle for long enough yet
        assert sent == [] and [pool.kept_bytes for pool in pools] == kept

        assert engine.release_buffers(idle_for=0.0) == sum(kept)
        assert sent == [(0, "ReleaseJob"), (1, "ReleaseJob")]
        assert [pool.kept_bytes for pool in pools] == [0, 0]
        assert engine.release_buffers(idle_for=0.0) == 0 and len(sent) == 2  # once per idle spell
        assert all(w.up and w.last_seconds is not None for w in backend.status)  # parts' times stay

        engine.ingest(root / "checkpoint-20", 20)
        kept = [pool.kept_bytes for pool in pools]
        transport.before = lambda index, job: index == 1  # worker 1 frees, then its answer is lost
        assert engine.release_buffers(idle_for=0.0) == kept[0]
        assert [pool.kept_bytes for pool in pools] == [0, 0]
        assert backend.status[0].up and not backend.status[1].up
        transport.before = None
        engine.ingest(root / "checkpoint-30", 30)  # probed back up first
        assert engine.steps == [10, 20, 30] and backend.status[1].up

        kept = [pool.kept_bytes for pool in pools]
        monkeypatch.setattr(coordinator, "RELEASE_WAIT_S", 0.2)
        transport.hung = {1}  # frees, never answers: not waited for, not taken for lost
        assert engine.release_buffers(idle_for=0.0) == kept[0]
        assert all(w.up for w in backend.status) and transport.restarted == []


def test_files_no_commit_references_are_removed(run: tuple[Path, Path], tmp_path: Path) -> None:
    """A worker of an abandoned try that writes late can only add files under its own attempt
    token; the next commit (and every start) removes them."""
    root, base = run
    state = tmp_path / "state"
    _follow(root, base, state, 2, STEPS[:2])
    snap = read_snapshot(state)
    late = snap.path / "sketch-deadbeef-000.safetensors"
    late.write_bytes(b"late")
    anchor = state / "anchors" / next(iter(sorted(p.name for p in (state / "anchors").iterdir())))
    (anchor / "v-deadbeef-001.safetensors").write_bytes(b"late")
    _follow(root, base, state, 2, STEPS[2:3])
    assert not list(state.glob("**/*deadbeef*"))


def _preview_tensors(preview: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(preview.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_preview_written_by_the_workers_equals_the_single_host_one(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Each worker writes whole shard files into the staging directory; the coordinator writes
    the index, the loader's files and the manifest, and publishes. The newest checkpoint is saved
    in 4 shards, so the preview has 4 files for 3 workers."""
    root, base = run
    last = STEPS[-1]
    tensors = {k: v for k, v in load_file(root / f"checkpoint-{last}" / "model.safetensors").items()}
    sharded_ckpt = hf_save(tmp_path / "sharded-run", last, tensors, shards=4)
    previews = {}
    for workers in (None, 3):
        state = tmp_path / f"state-{workers}"
        _follow(root, base, state, workers, STEPS[:-1])
        with _engine(state, base, workers, EngineConfig()) as engine:
            engine.ingest(sharded_ckpt, last)
            previews[workers] = engine.write_preview(140, tmp_path / f"previews-{workers}")
    single, sharded = previews[None], previews[3]
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(list(sharded.glob("model-*.safetensors"))) == 4
    a, b = _preview_tensors(single), _preview_tensors(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = "model.safetensors.index.json"
    assert (sharded / index).read_text() == (single / index).read_text()
    assert not [p for p in sharded.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_worker_lost_while_writing_a_preview_publishes_nothing(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, base = run
    state, out = tmp_path / "state", tmp_path / "previews"
    config = EngineConfig()
    transport = InProcess(base, config, 2)
    with Engine(state, base, config, backend=PartitionedTensors(transport, state)) as engine:
        for step in STEPS[:3]:
            engine.ingest(root / f"checkpoint-{step}", step)
        before = engine.write_preview(100, out)
        kept = _preview_tensors(before)
        engine.ingest(root / f"checkpoint-{STEPS[3]}", STEPS[3])

        def lose(index: int, job: object) -> bool:
            raise WorkerLost("worker lost (test)")

        transport.before = lose
        with pytest.raises(WorkerLost):
            engine.write_preview(100, out)
    assert [p.name for p in out.iterdir()] == ["step-100"]  # no staging left, the old one kept
    now = _preview_tensors(out / "step-100")
    assert all(torch.equal(now[k], v) for k, v in kept.items())
