"""Planted trajectories θ_s = θ₀ + f(s)·u + noise: checkpoints whose right answer is known."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "model.embed_tokens.weight": ((64, 32), torch.bfloat16),
    "model.layers.0.mlp.up_proj.weight": ((48, 32), torch.float32),
    "model.layers.0.input_layernorm.weight": ((32,), torch.bfloat16),
    "model.layers.0.mlp.up_proj.bias": ((48,), torch.float32),
    "model.norm.weight": ((32,), torch.float32),
}


@dataclass
class Planted:
    """θ_s = θ₀ + (a + b·s)·u + noise·ε_s per tensor (u unit, ε_s standard normal)."""

    base: dict[str, torch.Tensor]
    directions: dict[str, torch.Tensor]
    a: float = 0.0
    b: float = 0.02
    noise: float = 0.0
    seed: int = 0

    @classmethod
    def make(cls, shapes=SHAPES, seed: int = 0, **kw) -> Planted:
        g = torch.Generator().manual_seed(seed)
        base, dirs = {}, {}
        for name, (shape, dtype) in shapes.items():
            base[name] = torch.randn(shape, generator=g).to(dtype)
            u = torch.randn(shape, generator=g, dtype=torch.float64)
            dirs[name] = u / u.norm()
        return cls(base, dirs, seed=seed, **kw)

    def exact(self, step: float) -> dict[str, torch.Tensor]:
        """The noise-free θ_step in float64 (ground truth of a preview)."""
        return {n: self.base[n].double() + (self.a + self.b * step) * self.directions[n] for n in self.base}

    turn_at: float | None = None  # from this step on the motion continues along turn_dirs
    turn_dirs: dict[str, torch.Tensor] | None = None

    def turn(self, at: float, seed: int = 7) -> Planted:
        """From step ``at`` on, move at the same speed along a direction ⟂ u (a 90° turn): the
        straight line stops holding, and forecasts made before the turn lose their skill once the
        new leg is longer than their anchor's distance to the turn."""
        g = torch.Generator().manual_seed(seed)
        self.turn_dirs = {}
        for name, u in self.directions.items():
            w = torch.randn(u.shape, generator=g, dtype=torch.float64)
            w -= (w * u).sum() * u
            self.turn_dirs[name] = w / w.norm()
        self.turn_at = at
        return self

    def at(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        out = {}
        for n, t in self.exact(step).items():
            eps = torch.randn(t.shape, generator=g, dtype=torch.float64) * self.noise
            if self.turn_at is not None and self.turn_dirs is not None and step > self.turn_at:
                t = t + self.b * (step - self.turn_at) * (self.turn_dirs[n] - self.directions[n])
            out[n] = (t + eps).to(self.base[n].dtype)
        return out


def write_hf_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], step: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (directory / "config.json").write_text(json.dumps({"model_type": "planted"}))
    if step is not None:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return directory
