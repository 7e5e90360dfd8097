"""Previews of a real (tiny, locally built) Hugging Face model load and run with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.engine import Engine, EngineConfig

transformers = pytest.importorskip("transformers")

STEPS = [10, 20, 30, 45, 60]
TARGET = 150


def tiny_qwen2(tie: bool = True):
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def save_run(model, root: Path, **save_kwargs) -> tuple[Path, Path]:
    base = root / "base"
    model.save_pretrained(base, **save_kwargs)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    for s in STEPS:
        model.load_state_dict(planted_state_from(theta0, s))
        ckpt = root / "run" / f"checkpoint-{s}"
        model.save_pretrained(ckpt, **save_kwargs)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": s}))
    model.load_state_dict(theta0)
    return base, root / "run"


def planted_state_from(theta0: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, p) in enumerate(theta0.items()):
        g = torch.Generator().manual_seed(1000 + i)
        out[name] = p + 1e-3 * step * torch.randn(p.shape, generator=g).to(p.dtype)
    if "lm_head.weight" in out and torch.equal(theta0["lm_head.weight"], theta0["model.embed_tokens.weight"]):
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied: one parameter
    return out


def extrapolate(base: Path, run: Path, tmp: Path) -> Path:
    with Engine(tmp / "state", base, EngineConfig()) as engine:
        for s in STEPS:
            engine.ingest(run / f"checkpoint-{s}", s)
        return engine.write_preview(TARGET, tmp / "previews")


def check_loads_and_predicts(preview: Path, theta0: dict[str, torch.Tensor]) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(preview).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, 96) and torch.isfinite(logits).all()
    truth = planted_state_from(theta0, TARGET)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, truth[name], atol=1e-4), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_preview_loads_as_hf_model_with_tied_embeddings(tmp_path: Path) -> None:
    model = tiny_qwen2(tie=True)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    base, run = save_run(model, tmp_path)
    preview = extrapolate(base, run, tmp_path)
    assert {p.name for p in preview.iterdir()} >= {"config.json", "model.safetensors", "relexd-preview.json"}
    manifest = json.loads((preview / "relexd-preview.json").read_text())
    assert manifest["target_step"] == TARGET and manifest["observed_steps"] == STEPS
    check_loads_and_predicts(preview, theta0)


def test_sharded_source_gives_sharded_preview_with_valid_index(tmp_path: Path) -> None:
    model = tiny_qwen2(tie=False)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    base, run = save_run(model, tmp_path, max_shard_size="40KB")
    source_index = json.loads((run / "checkpoint-60" / "model.safetensors.index.json").read_text())
    assert len(set(source_index["weight_map"].values())) > 1
    preview = extrapolate(base, run, tmp_path)
    index = json.loads((preview / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"]
    shards = set(index["weight_map"].values())
    assert shards == {p.name for p in preview.glob("model-*.safetensors")}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in theta0.values())
    check_loads_and_predicts(preview, theta0)


def test_bin_source_gives_safetensors_preview(tmp_path: Path) -> None:
    model = tiny_qwen2(tie=True)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    base, run = save_run(model, tmp_path)
    for directory in [base, *(run / f"checkpoint-{s}" for s in STEPS)]:
        tensors = load_file(str(directory / "model.safetensors"))
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # .bin state dicts keep both
        torch.save(tensors, directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    preview = extrapolate(base, run, tmp_path)
    assert (preview / "model.safetensors").exists() and not list(preview.glob("*.bin"))
    check_loads_and_predicts(preview, theta0)
