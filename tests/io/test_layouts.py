"""scan_run recognises each trainer's layout and completion marker (DESIGN.md §5)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from relexd.io.layouts import CheckpointRef, checkpoint_of, checkpoint_step, scan_run, size_signature
from relexd.io.reader import open_weights


def _weights(directory: Path, name: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(3)}, directory / name)
    return directory


def _hf(run: Path, step: int, *, done: bool = True, global_step: object = None) -> Path:
    directory = _weights(run / f"checkpoint-{step}")
    if done:
        state = {"global_step": step if global_step is None else global_step}
        (directory / "trainer_state.json").write_text(json.dumps(state))
    return directory


def _steps(refs: list[CheckpointRef]) -> list[tuple[int, str]]:
    return [(ref.step, ref.layout) for ref in refs]


def test_hf_trainer_state_marks_completion(tmp_path: Path) -> None:
    _hf(tmp_path, 10)
    _hf(tmp_path, 20, done=False)
    _weights(tmp_path / "tmp-checkpoint-30")
    (tmp_path / "runs").mkdir()
    result = scan_run(tmp_path)
    assert _steps(result.complete) == [(10, "hf")]
    assert _steps(result.pending) == [(20, "hf")]
    ref = result.complete[0]
    assert ref.path == ref.weights == tmp_path / "checkpoint-10"


def test_hf_step_from_trainer_state(tmp_path: Path) -> None:
    _hf(tmp_path, 5, global_step=50)
    half_written = _hf(tmp_path, 7)
    (half_written / "trainer_state.json").write_text('{"global_st')
    assert [ref.step for ref in scan_run(tmp_path).complete] == [7, 50]


def test_verl_tracker(tmp_path: Path) -> None:
    for step in (5, 10):
        _weights(tmp_path / f"global_step_{step}" / "actor" / "huggingface")
    tracker = tmp_path / "latest_checkpointed_iteration.txt"

    assert scan_run(tmp_path).complete == []  # no tracker yet
    tracker.write_text("")
    result = scan_run(tmp_path)
    assert (result.complete, _steps(result.pending)) == ([], [(5, "verl"), (10, "verl")])

    tracker.write_text("5\n")
    result = scan_run(tmp_path)
    assert _steps(result.complete) == [(5, "verl")]
    assert _steps(result.pending) == [(10, "verl")]
    assert result.complete[0].weights == tmp_path / "global_step_5" / "actor" / "huggingface"
    assert result.complete[0].path == tmp_path / "global_step_5"

    tracker.write_text("10")
    assert _steps(scan_run(tmp_path).complete) == [(5, "verl"), (10, "verl")]


def test_verl_weights_in_actor_dir(tmp_path: Path) -> None:
    _weights(tmp_path / "global_step_3" / "actor")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    [ref] = scan_run(tmp_path).complete
    assert ref.weights == tmp_path / "global_step_3" / "actor"


def test_verl_fsdp_rank_files_are_weights_once_the_tracker_reaches_the_step(tmp_path: Path) -> None:
    actor = tmp_path / "global_step_4" / "actor"
    actor.mkdir(parents=True)
    (actor / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    (actor / "model_world_size_2_rank_1.pt").write_bytes(b"x")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    [pending] = scan_run(tmp_path).pending
    assert pending.weights == actor
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    [ref] = scan_run(tmp_path).complete
    assert ref.weights == actor and ref.layout == "verl"


def test_verl_without_any_weights_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "global_step_4" / "actor" / "huggingface").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    result = scan_run(tmp_path)
    assert result.complete == []
    [(path, why)] = result.unsupported
    assert path == tmp_path / "global_step_4"
    assert "rank files" in why


def test_openrlhf_needs_a_weights_file(tmp_path: Path) -> None:
    _weights(tmp_path / "global_step7_hf")
    (tmp_path / "global_step8_hf").mkdir()
    _weights(tmp_path / "global_step9")  # DeepSpeed's tag: complete only once `latest` names it
    result = scan_run(tmp_path)
    assert _steps(result.complete) == [(7, "openrlhf")]
    assert _steps(result.pending) == [(8, "openrlhf"), (9, "deepspeed")]
    _weights(tmp_path / "global_step7")  # OpenRLHF saves both; its HF weights are preferred
    (tmp_path / "latest").write_text("global_step7")
    assert _steps(scan_run(tmp_path).complete) == [(7, "openrlhf")]


def test_nemo_rl(tmp_path: Path) -> None:
    _weights(tmp_path / "step_3" / "policy" / "weights" / "model")
    _weights(tmp_path / "tmp_step_4" / "policy" / "weights" / "model")
    [ref] = scan_run(tmp_path).complete
    assert (ref.step, ref.layout) == (3, "nemo_rl")
    assert ref.weights == tmp_path / "step_3" / "policy" / "weights" / "model"
    assert scan_run(tmp_path).pending == []


def test_dcp_is_pending_until_its_metadata_is_renamed_into_place(tmp_path: Path) -> None:
    weights = tmp_path / "step_6" / "policy" / "weights"
    weights.mkdir(parents=True)
    (weights / "__0_0.distcp").write_bytes(b"x")
    (weights / ".metadata.tmp").write_bytes(b"x")
    result = scan_run(tmp_path)
    assert result.complete == result.unsupported == [] and [r.step for r in result.pending] == [6]
    (weights / ".metadata.tmp").rename(weights / ".metadata")
    [ref] = scan_run(tmp_path).complete
    assert ref.weights == weights


def test_plain_directories_and_files(tmp_path: Path) -> None:
    _weights(tmp_path / "step_1")
    _weights(tmp_path / "step-2")
    _weights(tmp_path / "iter_0003")
    (tmp_path / "step_4").mkdir()  # nothing written yet
    save_file({"w": torch.ones(1)}, tmp_path / "model_step_120.safetensors")
    save_file({"w": torch.ones(1)}, tmp_path / "step-130.safetensors")
    save_file({"w": torch.ones(1)}, tmp_path / "model_step_140.safetensors.tmp99")
    save_file({"w": torch.ones(1)}, tmp_path / ".step_150.safetensors")
    save_file({"w": torch.ones(1)}, tmp_path / "adapter_model.safetensors")
    result = scan_run(tmp_path)
    assert _steps(result.complete) == [
        (1, "plain"),
        (2, "plain"),
        (3, "plain"),
        (120, "file"),
        (130, "file"),
    ]
    assert _steps(result.pending) == [(4, "plain")]
    for ref in result.complete:  # what the scan calls complete opens
        with open_weights(ref.weights) as reader:
            assert reader.names() == ["w"]


@pytest.mark.parametrize("nested", ["checkpoints", "ckpt", "ckpts"])
def test_nested_checkpoint_directory(tmp_path: Path, nested: str) -> None:
    _hf(tmp_path / nested, 12)
    _hf(tmp_path / "other", 13)  # only the well-known names are looked into
    [ref] = scan_run(tmp_path).complete
    assert ref.path == tmp_path / nested / "checkpoint-12"


def test_same_step_prefers_most_specific_layout(tmp_path: Path) -> None:
    _hf(tmp_path, 100)
    save_file({"w": torch.ones(1)}, tmp_path / "model_step_100.safetensors")
    _hf(tmp_path, 200, done=False)
    _weights(tmp_path / "step_200")
    _hf(tmp_path / "checkpoints", 300)
    _hf(tmp_path, 300)
    result = scan_run(tmp_path)
    assert [(r.step, r.path) for r in result.complete] == [
        (100, tmp_path / "checkpoint-100"),
        (300, tmp_path / "checkpoint-300"),
    ]
    assert [(r.step, r.path) for r in result.pending] == [(200, tmp_path / "checkpoint-200")]


def test_missing_run_dir_is_empty(tmp_path: Path) -> None:
    result = scan_run(tmp_path / "nope")
    assert result.complete == result.pending == result.unsupported == []


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("checkpoint-500", 500),
        ("global_step_12", 12),
        ("global_step12_hf", 12),
        ("step_7", 7),
        ("step-7", 7),
        ("iter_0042", 42),
        ("model_step_120.safetensors", 120),
        ("step-130.safetensors", 130),
        ("tmp-checkpoint-5", None),
        ("tmp_step_5", None),
        ("step_5.tmp", None),
        ("model.safetensors", None),
        ("config.json", None),
    ],
)
def test_checkpoint_step(name: str, step: int | None) -> None:
    assert checkpoint_step(Path("/run") / name) == step


def test_size_signature_tracks_weight_files(tmp_path: Path) -> None:
    directory = _weights(tmp_path / "global_step1_hf")
    (directory / "config.json").write_text("{}")
    ref = CheckpointRef(1, directory, directory, "openrlhf")
    first = size_signature(ref)
    assert [(name, size) for name, size, _ in first] == [
        ("model.safetensors", (directory / "model.safetensors").stat().st_size)
    ]
    assert size_signature(ref) == first
    with open(directory / "model.safetensors", "ab") as file:
        file.write(b"\0")
    assert size_signature(ref) != first
    os.unlink(directory / "model.safetensors")
    assert size_signature(ref) == ()


def test_size_signature_of_single_file(tmp_path: Path) -> None:
    path = tmp_path / "step-3.safetensors"
    save_file({"w": torch.ones(2)}, path)
    ref = CheckpointRef(3, path, path, "file")
    [(name, size, _)] = size_signature(ref)
    assert (name, size) == ("step-3.safetensors", path.stat().st_size)


def test_trainer_state_save_steps_is_the_trainer_cadence(tmp_path: Path) -> None:
    from tests.daemon.trainer_sim import hf_save

    tensors = {"w": torch.zeros(2)}
    hf_save(tmp_path, 10, tensors, save_steps=5)
    hf_save(tmp_path, 15, tensors)
    bad = hf_save(tmp_path, 20, tensors)
    (bad / "trainer_state.json").write_text('{"global_step": 20, "save_steps": "5"}')
    cadence = {r.step: r.save_interval for r in scan_run(tmp_path).complete}
    assert cadence == {10: 5, 15: None, 20: None}


def test_checkpoint_of_names_the_checkpoint_an_event_path_lies_in(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert checkpoint_of(run / "checkpoint-12" / "model.safetensors.tmp7", run) == (12, run / "checkpoint-12")
    nested = run / "checkpoints" / "global_step_7"
    assert checkpoint_of(nested / "actor" / "huggingface" / "model.safetensors", run) == (7, nested)
    assert checkpoint_of(run / "step_3", run) == (3, run / "step_3")
    assert checkpoint_of(run / "tmp-checkpoint-3" / "x", run) is None  # a temporary name
    assert checkpoint_of(run / "runs" / "events.out.tfevents", run) is None
    assert checkpoint_of(tmp_path / "elsewhere" / "checkpoint-1", run) is None


def test_relex_paper_trajectories_have_no_tracker_and_are_marker_less(tmp_path: Path) -> None:
    """download_rlvr_trajectory.py lays out global_step_N/ with HF weights and no tracker file."""
    for step in (1, 2):
        _weights(tmp_path / f"global_step_{step}")
    result = scan_run(tmp_path)
    assert [(r.step, r.layout) for r in result.complete] == [(1, "trajectory"), (2, "trajectory")]
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("")  # a verl tracker mid-rewrite
    assert scan_run(tmp_path).complete == []  # now it is verl: wait for the tracker


def test_prime_rl_broadcasts_are_complete_with_their_stable_file(tmp_path: Path) -> None:
    broadcast = _weights(tmp_path / "broadcasts" / "step_5")
    assert [r.step for r in scan_run(tmp_path).pending] == [5]
    (broadcast / "STABLE").write_text("")
    [ref] = scan_run(tmp_path).complete
    assert (ref.step, ref.layout, ref.weights) == (5, "prime_rl", broadcast)


def test_verl_megatron_transient_files_are_not_weights(tmp_path: Path) -> None:
    hf = tmp_path / "global_step_3" / "actor" / "huggingface"
    _weights(hf, "hf_batch_0.safetensors")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    [pending] = scan_run(tmp_path).pending
    with pytest.raises(Exception, match="no weights file"):
        open_weights(pending.weights)
