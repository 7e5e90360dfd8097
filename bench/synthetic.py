"""Synthetic checkpoints with the tensor shapes of Qwen2.5-0.5B, -1.5B and -7B.

A run is a planted trajectory per tensor, θ_s = θ₀ + (a + b·s)·u + noise·ε_s, stored in bfloat16:
θ₀ and u are drawn once from per-tensor seeded generators and kept on disk (``base`` and
``direction``); a checkpoint then costs one read of each plus one fresh normal draw per element.
Everything is written tensor by tensor and in chunks with relexd's streaming writer, so a 3 GB
model never has to fit in memory. At 0.5B and 1.5B lm_head is tied to the embedding
(``tie_word_embeddings``) and, as in the real checkpoints, not saved; the 7B shape has its own, as
Qwen2.5-7B does (its config.json: ``"tie_word_embeddings": false``).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from relexd.io.safetensors_file import SafetensorsFile, StreamingSafetensorsWriter

CHUNK = 1 << 22  # elements generated at once (16 MiB of float32)
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ModelShape:
    """The shape hyper-parameters of a Qwen2-style decoder."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True  # lm_head is the embedding (not saved) or a tensor of its own

    def specs(self) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape, in the order HF writes them."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.heads * self.head_dim, h),
                p + "self_attn.q_proj.bias": (self.heads * self.head_dim,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, self.heads * self.head_dim),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
            }
        out["model.norm.weight"] = (h,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.specs().values())

    @property
    def largest(self) -> int:
        return max(math.prod(s) for s in self.specs().values())

    def smaller(self, layers: int, vocab: int | None = None) -> ModelShape:
        """The same layer shapes with fewer layers (and optionally a smaller vocabulary)."""
        return replace(
            self, name=f"{self.name}-{layers}L", layers=layers, vocab=vocab if vocab else self.vocab
        )


QWEN25_05B = ModelShape("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 64, 151936)
QWEN25_15B = ModelShape("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 128, 151936)
QWEN25_7B = ModelShape("qwen2.5-7b", 28, 3584, 18944, 28, 4, 128, 152064, tied=False)


def _generator(name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + salt)


@dataclass(frozen=True)
class Trajectory:
    """θ_s = θ₀ + (a + b·s)·u + noise·ε_s per element; θ₀ ~ N(0, 0.02²), u ~ N(0, scale²)."""

    shape: ModelShape
    a: float = 0.5
    b: float = 0.1
    scale: float = 1e-4
    noise: float = 2e-5
    seed: int = 0

    def write_base(self, directory: Path) -> Path:
        """Write θ₀ (``model.safetensors`` + config.json with tied embeddings) and u aside."""
        directory.mkdir(parents=True, exist_ok=True)
        specs = self.shape.specs()
        for fname, salt, std in (("model.safetensors", 1, 0.02), ("direction.safetensors", 2, self.scale)):
            with StreamingSafetensorsWriter(
                directory / fname, {n: (DTYPE, s) for n, s in specs.items()}, {"format": "pt"}
            ) as w:
                for name, shape in specs.items():
                    g = _generator(name, salt + 10 * self.seed)
                    numel = math.prod(shape)
                    for i in range(0, numel, CHUNK):
                        chunk = torch.empty(min(CHUNK, numel - i)).normal_(0.0, std, generator=g)
                        w.append(name, chunk.to(DTYPE))
        (directory / "direction.safetensors").rename(directory.parent / f"{directory.name}.direction")
        shape = self.shape
        config = {"model_type": "qwen2", "tie_word_embeddings": shape.tied, "bench_shape": shape.name}
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    def write_checkpoint(self, base_dir: Path, directory: Path, step: int) -> Path:
        """Write the checkpoint at ``step`` as an HF-style directory (weights, config, trainer_state)."""
        directory.mkdir(parents=True, exist_ok=True)
        specs = self.shape.specs()
        coef = self.a + self.b * step
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        with (
            SafetensorsFile(base_dir / "model.safetensors") as base,
            SafetensorsFile(base_dir.parent / f"{base_dir.name}.direction") as direction,
            StreamingSafetensorsWriter(
                directory / "model.safetensors", {n: (DTYPE, s) for n, s in specs.items()}, {"format": "pt"}
            ) as w,
        ):
            for name, shape in specs.items():
                numel = math.prod(shape)
                for i in range(0, numel, CHUNK):
                    j = min(i + CHUNK, numel)
                    theta = base.read_range(name, i, j).float()
                    theta += coef * direction.read_range(name, i, j).float()
                    theta += torch.empty(j - i).normal_(0.0, self.noise, generator=g)
                    w.append(name, theta.to(DTYPE))
        (directory / "config.json").write_text((base_dir / "config.json").read_text())
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return directory


def steps_irregular(count: int, first: int = 10) -> list[int]:
    """Irregular save steps (gaps alternate 10, 20, 10, 30, …) like a trainer with a changing cadence."""
    gaps = [10, 20, 10, 30]
    out = [first]
    for i in range(count - 1):
        out.append(out[-1] + gaps[i % len(gaps)])
    return out
