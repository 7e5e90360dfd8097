"""LoRA: a real TRL GRPOTrainer with a peft LoraConfig saves adapter checkpoints; relexd follows
the trajectory in adapter space and its previews are adapters PeftModel loads (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.engine.preview import MANIFEST

ROOT = Path(__file__).resolve().parents[2]
WRITER = ROOT / "tests" / "daemon" / "trl_writer.py"


def _relexd(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relexd", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_lora_adapter_trajectory_gives_a_loadable_adapter_preview(tmp_path: Path) -> None:
    base_model, run = tmp_path / "base-model", tmp_path / "run"
    subprocess.run([sys.executable, str(WRITER), "base", str(base_model)], check=True, timeout=300, cwd=ROOT)
    subprocess.run(
        [sys.executable, str(WRITER), "train", str(base_model), str(run), "--steps", "8", "--lora",
         "--keep", "100"],
        check=True, timeout=600, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    # offline: θ₀ defaults to the earliest adapter checkpoint, which is then not an observation
    _relexd("extrapolate", str(run), "--target", "16", "--out", str(tmp_path / "offline"))
    # an adapter checkpoint as --base: it is also observed (its delta is zero), as by the daemon
    first = str(run / "checkpoint-1")
    _relexd("extrapolate", str(run), "--base", first, "--target", "16", "--out", str(tmp_path / "explicit"))
    _relexd("watch", str(run), "--base", first, "--once", "--listen", "", "--preview-at", "16",
            "--state-dir", str(tmp_path / "state"))  # fmt: skip
    observed = {"offline": list(range(2, 9)), "explicit": list(range(1, 9)), "state": list(range(1, 9))}
    for kind, preview in (
        ("offline", tmp_path / "offline" / "step-16"),
        ("explicit", tmp_path / "explicit" / "step-16"),
        ("state", tmp_path / "state" / "previews" / "step-16"),
    ):
        assert (preview / "adapter_model.safetensors").is_file() and (
            preview / "adapter_config.json"
        ).is_file()
        assert not (preview / "model.safetensors.index.json").exists()
        adapter = load_file(str(preview / "adapter_model.safetensors"))
        last = load_file(str(run / "checkpoint-8" / "adapter_model.safetensors"))
        assert adapter.keys() == last.keys()
        moved = [k for k in last if "lora_B" in k]
        assert moved and all(not torch.equal(adapter[k], last[k]) for k in moved)  # extrapolated past 8
        manifest = json.loads((preview / MANIFEST).read_text())
        assert manifest["observed_steps"] == observed[kind] and manifest["target_step"] == 16

        from peft import PeftModel
        from transformers import Qwen2ForCausalLM

        model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base_model), preview)
        loaded = dict(model.named_parameters())
        key = moved[0].replace(".weight", ".default.weight")
        assert torch.equal(loaded[key].detach(), adapter[moved[0]])  # the preview's weights are in use
        logits = model(input_ids=torch.tensor([[2, 3, 12, 4, 13]])).logits
        assert torch.isfinite(logits).all()
    offline = load_file(str(tmp_path / "explicit" / "step-16" / "adapter_model.safetensors"))
    daemon = load_file(str(tmp_path / "state" / "previews" / "step-16" / "adapter_model.safetensors"))
    assert all(torch.equal(offline[k], daemon[k]) for k in offline)  # same base, same steps
