"""LoRA adapters as peft saves them, for ``python -m bench.per_tensor --model peft``.

Its own module because it needs the test extras (peft, transformers), which relexd itself must not
import: deptry leaves this file out (pyproject.toml), and checks every other one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.synthetic import ModelShape

#: the adapted model: Qwen2.5-0.5B's shape, a small vocabulary (the adapter leaves it alone)
PEFT_MODEL = ModelShape("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 64, 1024)


class PeftRun:
    """LoRA adapters saved by peft (``save_pretrained``) along a planted line: rank 16 on every
    linear layer, each adapter tensor θ_s = θ₀ + (0.5 + 0.1·s)·u with θ₀ peft's own initialisation
    (lora_B zero) and u ~ N(0, (10⁻⁴)²) per element. The base is the adapter at step 0."""

    def __init__(self, directory: Path) -> None:
        shape = PEFT_MODEL
        config = Qwen2Config(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
            tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        self.model = get_peft_model(
            Qwen2ForCausalLM(config).to(torch.bfloat16), LoraConfig(r=16, target_modules=targets)
        )
        self.params = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.direction = {n: torch.randn_like(p) * 1e-4 for n, p in self.params.items()}
        self.base = self.checkpoint(directory / "base", 0)

    def checkpoint(self, directory: Path, step: int) -> Path:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.start[n] + (0.5 + 0.1 * step) * self.direction[n])
        self.model.save_pretrained(directory)
        return directory

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params.values()]
