"""Training-run contracts relexd relies on: determinism, HF checkpoint layout, learning signal."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.demo import train
from relexd.demo.model import TinyCausalLM
from relexd.demo.train import StepInfo, train_run


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_two_runs_are_bitwise_identical(
    tmp_path: Path, cached_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same arguments ⇒ identical checkpoints; the cached base is reused losslessly.

    The tests' tiny-budget base never earns the real reward (so RL would not move at all); the
    planted reward makes the updates non-trivial, which is what determinism must hold for.
    """
    import shutil

    from tests.demo.test_rl_signal import planted_reward

    monkeypatch.setattr(train.task, "reward", planted_reward)
    dirs = []
    for name in ("a", "b"):
        run = tmp_path / name
        shutil.copytree(cached_base, run / train.BASE_DIR_NAME)
        train_run(run, steps=3, prompts_per_step=8, num_threads=1)
        dirs.append(run)
    for step in (1, 2, 3):
        wa = _weights(dirs[0] / f"checkpoint-{step}")
        wb = _weights(dirs[1] / f"checkpoint-{step}")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (step, k)
    # RL actually moved the weights away from the base.
    base = _weights(cached_base)
    moved = _weights(dirs[0] / "checkpoint-3")
    assert any(not torch.equal(base[k], moved[k]) for k in base)


def test_sft_warmup_is_deterministic_short() -> None:
    """The warm-up itself is deterministic (checked on a short warm-up to keep tests fast)."""
    train.configure_torch(1)
    m1 = train.sft_warmup(5, train.Warmup(steps=4, batch_size=16))
    m2 = train.sft_warmup(5, train.Warmup(steps=4, batch_size=16))
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_checkpoint_layout_and_marker_written_last(
    run_dir_with_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint-N has weights + config, and trainer_state.json appears only after both."""
    seen_when_marker_written: list[set[str]] = []
    real_replace = Path.replace

    def spy_replace(self: Path, target: Path | str) -> Path:
        if Path(target).name == train.TRAINER_STATE_NAME:
            seen_when_marker_written.append({p.name for p in Path(target).parent.iterdir()})
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", spy_replace)
    infos: list[StepInfo] = []
    summary = train_run(run_dir_with_base, steps=2, prompts_per_step=4, on_step=infos.append)

    assert summary.steps_completed == 2 and not summary.stopped_early
    assert [i.step for i in infos] == [1, 2]
    assert len(seen_when_marker_written) == 2
    for names in seen_when_marker_written:
        assert {"model.safetensors", "config.json"} <= names
        assert train.TRAINER_STATE_NAME not in names
    for step in (1, 2):
        ckpt = run_dir_with_base / f"checkpoint-{step}"
        assert sorted(p.name for p in ckpt.iterdir()) == [
            "config.json",
            "model.safetensors",
            "trainer_state.json",
        ]
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step
        assert [h["step"] for h in state["log_history"]] == list(range(1, step + 1))
        ckpt_mtime = (ckpt / "trainer_state.json").stat().st_mtime_ns
        assert ckpt_mtime >= (ckpt / "model.safetensors").stat().st_mtime_ns
    model = TinyCausalLM.from_pretrained(run_dir_with_base / "checkpoint-2")
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert "lm_head.weight" in model.state_dict()


def test_stop_event_ends_run(run_dir_with_base: Path) -> None:
    stop = threading.Event()

    def on_step(info: StepInfo) -> None:
        if info.step == 1:
            stop.set()

    summary = train_run(run_dir_with_base, steps=50, prompts_per_step=4, on_step=on_step, stop=stop)
    assert summary.steps_completed == 1 and summary.stopped_early
    assert not (run_dir_with_base / "checkpoint-2").exists()
