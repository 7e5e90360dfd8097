"""Native checkpoints written by the real writers (FSDP2 on gloo, torch DCP) read exactly as the
same weights saved as HF safetensors; relexd's previews of them equal the HF-derived previews and
load in transformers; bad input is a clear, counted error (issue 11)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor
from safetensors.torch import load_file, save_file

from relexd.engine.config import EngineConfig
from relexd.engine.engine import Engine
from relexd.errors import CheckpointError
from relexd.io.names import match_names
from relexd.io.reader import open_weights

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
WRITER = HERE / "fsdp_writer.py"
#: the writer's output directory -> relexd's format name
READER_FORMAT = {"verl": "verl_fsdp", "dcp": "dcp", "nemo": "nemo_rl"}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real FSDP2 run on two gloo ranks (3 steps), followed live by ``relexd watch`` on its
    verl and DCP output from an empty directory on, and one single-process run (2 steps)."""
    from tests.daemon.trainer_sim import Daemon

    out = tmp_path_factory.mktemp("native")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = {"check": True, "timeout": 600, "cwd": ROOT, "env": env, "capture_output": True}
    subprocess.run([sys.executable, str(WRITER), str(out / "w2"), "--base-only"], **run)  # type: ignore[call-overload]
    qwen2 = out / "w2" / "qwen2"
    for fmt in READER_FORMAT:
        (out / f"watch-{fmt}").mkdir()
    daemons = {
        fmt: Daemon(out / f"watch-{fmt}", qwen2 / fmt, qwen2 / "base", "--preview-at", "9")
        for fmt in READER_FORMAT
    }
    for daemon in daemons.values():
        daemon.wait_url()
    try:
        subprocess.run(
            [
                str(torchrun),
                "--standalone",
                "--nproc_per_node",
                "2",
                str(WRITER),
                str(out / "w2"),
                "--steps",
                "3",
            ],
            **run,  # type: ignore[arg-type]
        )
        for daemon in daemons.values():
            daemon.wait_for(lambda d=daemon: d.steps() == [1, 2, 3], timeout=120, what="steps 1-3")
    finally:
        for daemon in daemons.values():
            assert daemon.stop() == 0, daemon.tail()
    subprocess.run([sys.executable, str(WRITER), str(out / "w1"), "--steps", "2"], **run)  # type: ignore[call-overload]
    return out


def _source(root: Path, fmt: str, step: int) -> Path:
    return {
        "verl": root / "verl" / f"global_step_{step}" / "actor",
        "dcp": root / "dcp" / f"step_{step}",
        "nemo": root / "nemo" / f"step_{step}" / "policy" / "weights" / "model",
    }[fmt]


@pytest.mark.slow
@pytest.mark.parametrize("world", ["w2", "w1"])
@pytest.mark.parametrize("kind", ["qwen2", "odd"])
@pytest.mark.parametrize("fmt", list(READER_FORMAT))
def test_native_reader_equals_the_same_weights_as_safetensors(
    written: Path, world: str, kind: str, fmt: str
) -> None:
    if fmt == "nemo" and world == "w1":
        pytest.skip("in one process HuggingFaceStorageWriter writes plain HF safetensors")
    root = written / world / kind
    for step in (1, 2):
        ref = load_file(str(root / "hf" / f"checkpoint-{step}" / "model.safetensors"))
        src = _source(root, fmt, step)
        with open_weights(src) as reader:
            assert reader.format == READER_FORMAT[fmt]
            names = match_names(reader.names(), set(ref), src)
            assert sorted(names.values()) == sorted(ref)  # optimizer state left out
            for stored, name in names.items():
                assert torch.equal(reader.read(stored), ref[name]), name  # bit for bit
                flat = reader.info(stored).numel
                assert torch.equal(
                    reader.read_range(stored, flat // 3, flat), ref[name].reshape(-1)[flat // 3 :]
                )


@pytest.mark.slow
def test_fsdp2_leaves_an_empty_shard_and_the_reader_still_assembles_it(written: Path) -> None:
    rank1 = torch.load(
        _source(written / "w2" / "odd", "verl", 1) / "model_world_size_2_rank_1.pt", weights_only=True
    )
    assert tuple(rank1["1.weight"].to_local().shape) == (0, 7)  # torch.chunk: 1 row over 2 ranks


def _extrapolate(run: Path, base: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relexd", "extrapolate", str(run), "--base", str(base), "--target", "9",
         "--out", str(out / "previews"), "--state-dir", str(out / "state")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(READER_FORMAT))
def test_watch_follows_a_native_run_and_its_previews_equal_the_hf_ones(
    written: Path, tmp_path: Path, fmt: str
) -> None:
    root = written / "w2" / "qwen2"
    _extrapolate(root / "hf", root / "base", tmp_path / "from-hf")
    native = written / f"watch-{fmt}" / "state" / "previews" / "step-9"
    from_hf = load_file(str(tmp_path / "from-hf" / "previews" / "step-9" / "model.safetensors"))
    preview = load_file(str(native / "model.safetensors"))
    assert preview.keys() == from_hf.keys()
    assert all(torch.equal(preview[k], from_hf[k]) for k in from_hf)  # same values in, same bits out

    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(native)  # config.json from the run or the base
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def _engine(tmp_path: Path, base: Path) -> Engine:
    return Engine(tmp_path / "state", base, EngineConfig())


def _rank_file(actor: Path, rank: int) -> Path:
    return actor / f"model_world_size_2_rank_{rank}.pt"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "missing_rank", "mixed_world", "nan", "shape"])
def test_bad_verl_checkpoints_are_clear_errors_and_leave_the_state(
    written: Path, tmp_path: Path, damage: str
) -> None:
    root = written / "w2" / "odd"
    actor = tmp_path / "global_step_2" / "actor"
    shutil.copytree(_source(root, "verl", 2), actor)
    base = root / "base"
    expect_file = _rank_file(actor, 1)
    if damage == "truncated":
        os.truncate(expect_file, expect_file.stat().st_size // 2)
        reason = "truncated"
    elif damage == "missing_rank":
        expect_file.unlink()
        reason = "missing_shard"
    elif damage == "mixed_world":
        shutil.copy(expect_file, actor / "model_world_size_4_rank_3.pt")
        expect_file, reason = actor, "corrupt_header"
    elif damage == "nan":
        state = torch.load(_rank_file(actor, 0), weights_only=True)
        state["0.weight"].to_local()[0, 0] = float("nan")
        torch.save(state, _rank_file(actor, 0))
        expect_file, reason = _rank_file(actor, 0), "non_finite"
    else:  # a base with the same names but another shape
        ref = load_file(str(base / "model.safetensors"))
        ref["0.bias"] = torch.zeros(8)
        base = tmp_path / "other-base"
        base.mkdir()
        save_file(ref, str(base / "model.safetensors"))
        expect_file, reason = _rank_file(actor, 0), "shape_mismatch"
    with _engine(tmp_path, base) as engine:
        with pytest.raises(CheckpointError) as caught:
            engine.ingest(actor, 2)
        assert caught.value.reason == reason
        assert str(expect_file) in str(caught.value)  # names the file
        assert engine.steps == []  # state untouched


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["dcp", "nemo"])
@pytest.mark.parametrize("damage", ["truncated", "missing_file"])
def test_bad_dcp_and_nemo_checkpoints_are_clear_errors(
    written: Path, tmp_path: Path, fmt: str, damage: str
) -> None:
    root = written / "w2" / "odd"
    ckpt = tmp_path / "step_2"
    shutil.copytree(_source(root, fmt, 2), ckpt)
    # NeMo's shards carry no count: a missing first shard shows as a gap (a missing last one as
    # tensors smaller than the base's, a shape_mismatch)
    victim = ckpt / ("__1_0.distcp" if fmt == "dcp" else "shard-00001-model-00001-of-00001.safetensors")
    if damage == "truncated":
        os.truncate(victim, victim.stat().st_size - 3)
    else:
        victim.unlink()
    with _engine(tmp_path, root / "base") as engine:
        with pytest.raises(CheckpointError) as caught:
            engine.ingest(ckpt, 2)
        assert caught.value.reason == ("truncated" if damage == "truncated" else "missing_shard")
        named = (
            victim
            if damage == "truncated" or fmt == "dcp"
            else ckpt / "shard-00001-model-00001-of-00001.safetensors"
        )
        assert str(named) in str(caught.value)
        assert engine.steps == []


@pytest.mark.slow
def test_a_dcp_checkpoint_can_be_the_base(written: Path, tmp_path: Path) -> None:
    """--base may be a native checkpoint: its tensor names become the base's, HF names."""
    root = written / "w2" / "qwen2"
    _extrapolate(root / "dcp", _source(root, "dcp", 1), tmp_path / "dcp-base")
    _extrapolate(root / "hf", root / "hf" / "checkpoint-1", tmp_path / "hf-base")  # observes 1, 2, 3 too
    native = load_file(str(tmp_path / "dcp-base" / "previews" / "step-9" / "model.safetensors"))
    reference = load_file(str(tmp_path / "hf-base" / "previews" / "step-9" / "model.safetensors"))
    assert native.keys() == reference.keys() and "lm_head.weight" in native
    assert all(torch.equal(native[k], reference[k]) for k in reference)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_dcp_metadata_pickle_that_would_run_code_is_refused(written: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "step_2"
    shutil.copytree(_source(written / "w2" / "odd", "dcp", 2), ckpt)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError) as caught:
        open_weights(ckpt)
    assert caught.value.reason == "unsupported" and "posix.system" in str(caught.value)
    assert not marker.exists()


@pytest.mark.slow
def test_names_that_match_under_no_prefix_name_an_example_on_each_side(written: Path, tmp_path: Path) -> None:
    with (
        _engine(tmp_path, written / "w2" / "odd" / "base") as engine,
        pytest.raises(CheckpointError) as caught,
    ):
        engine.ingest(_source(written / "w2" / "qwen2", "verl", 1), 1)
    message = str(caught.value)
    assert "'lm_head.weight'" in message and "'0.bias'" in message


@pytest.mark.slow
def test_hsdp_replicate_shard_placements_read_the_first_replica_group(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "4", str(HERE / "hsdp_writer.py"), str(tmp_path)],
        check=True, timeout=600, cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert "Replicate(), Shard(dim=0)" in done.stdout  # it really is HSDP
    reference = load_file(str(tmp_path / "reference.safetensors"))
    with open_weights(tmp_path / "actor") as reader:
        assert sorted(reader.names()) == sorted(reference)
        for name, tensor in reference.items():
            assert torch.equal(reader.read(name), tensor), name
            assert torch.equal(reader.read_range(name, 1, tensor.numel()), tensor.reshape(-1)[1:]), name
