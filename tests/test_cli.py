"""`relexd extrapolate` end to end, and its errors: one clear line naming the file, exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.planted import Planted, write_hf_checkpoint

STEPS = [10, 20, 30, 40]


def relexd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "relexd", *args], capture_output=True, text=True, env=env)


def extrapolate_to_80(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`relexd extrapolate` of the fixture's run against its base, one preview at step 80."""
    return relexd(
        "extrapolate", str(root / "run"), "--base", str(root / "base"), "--target", "80",
        "--out", str(root / "out"), *extra,
    )  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> Path:
    planted = Planted.make(noise=1e-4)
    write_hf_checkpoint(tmp_path / "base", planted.base)
    for s in STEPS:
        write_hf_checkpoint(tmp_path / "run" / f"checkpoint-{s}", planted.at(s), s)
    return tmp_path


def test_extrapolate_writes_previews_and_summary(run: Path) -> None:
    res = relexd(
        "extrapolate",
        str(run / "run"),
        "--base",
        str(run / "base"),
        "--target",
        "80,120",
        "--out",
        str(run / "out"),
        "--upto",
        "30",
    )
    assert res.returncode == 0, res.stderr
    assert "rank-1 energy ratio" in res.stdout and "fit R²" in res.stdout
    for t in (80, 120):
        manifest = json.loads((run / "out" / f"step-{t}" / "relexd-preview.json").read_text())
        assert manifest["observed_steps"] == [10, 20, 30]  # --upto respected
        assert manifest["target_step"] == t


def test_extrapolate_without_base_uses_earliest_checkpoint(run: Path) -> None:
    res = relexd("extrapolate", str(run / "run"), "--target", "80", "--out", str(run / "out"))
    assert res.returncode == 0, res.stderr
    assert "checkpoint-10" in res.stderr and "θ₀" in res.stderr
    manifest = json.loads((run / "out" / "step-80" / "relexd-preview.json").read_text())
    assert manifest["observed_steps"] == [20, 30, 40]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))


def shard_and_drop_one(path: Path) -> None:
    tensors = load_file(str(path))
    names = sorted(tensors)
    half = {n: tensors[n] for n in names[:2]}, {n: tensors[n] for n in names[2:]}
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {n: shard_names[0] for n in half[0]} | {n: shard_names[1] for n in half[1]}
    save_file(half[0], str(path.parent / shard_names[0]))  # the second shard is missing
    (path.parent / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    path.unlink()


def change_shape(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = torch.zeros(33)
    save_file(tensors, str(path))


def plant_nan(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("damage", "file_shown", "words"),
    [
        (truncate, "model.safetensors", "truncated"),
        (corrupt_header, "model.safetensors", "header"),
        (shard_and_drop_one, "model-00002-of-00002.safetensors", "missing"),
        (change_shape, "model.safetensors", "shape"),
        (plant_nan, "model.safetensors", "NaN"),
    ],
)
def test_bad_checkpoint_is_a_clear_error(run: Path, damage, file_shown: str, words: str) -> None:
    damage(run / "run" / "checkpoint-30" / "model.safetensors")
    res = extrapolate_to_80(run)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr + res.stdout
    assert f"checkpoint-30/{file_shown}" in res.stderr
    assert words.lower() in res.stderr.lower()
    assert not (run / "out" / "step-80").exists()


def test_skip_bad_continues_and_reports_failure(run: Path) -> None:
    plant_nan(run / "run" / "checkpoint-30" / "model.safetensors")
    res = extrapolate_to_80(run, "--skip-bad")
    assert res.returncode == 1  # something was skipped: say so in the exit code
    manifest = json.loads((run / "out" / "step-80" / "relexd-preview.json").read_text())
    assert manifest["observed_steps"] == [10, 20, 40]


def test_bad_target_is_a_usage_error(run: Path) -> None:
    res = relexd("extrapolate", str(run / "run"), "--target", "ten", "--out", str(run / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
