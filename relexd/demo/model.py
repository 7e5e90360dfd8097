"""A tiny decoder-only transformer with Hugging Face-like weight names.

relexd ingests real trainer checkpoints, so the demo model's files look like a small HF causal LM:
``config.json`` plus ``model.safetensors`` with names such as ``model.embed_tokens.weight`` and
``model.layers.0.self_attn.q_proj.weight``. Pre-norm blocks, causal self-attention, learned
absolute positions, GELU MLP. ``lm_head`` is UNTIED from the embedding: every tensor then has its
own trajectory, which keeps the demo's per-tensor RELEX bookkeeping free of tied-weight special
cases. Linear layers have no bias (as in Llama); LayerNorms have weight and bias, so the state dict
contains 1-D tensors too, as real models do.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from relexd.demo import task

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: Per-layer key/value cache: one ``(k, v)`` pair of shape ``(batch, heads, time, head_dim)``.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; serialised verbatim as ``config.json``."""

    vocab_size: int = task.VOCAB_SIZE
    hidden_size: int = 96
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 16
    layer_norm_eps: float = 1e-5
    model_type: str = "relexd-demo-adder"
    tie_word_embeddings: bool = False

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (HF-style keys plus ``architectures``)."""
        d: dict[str, object] = asdict(self)
        d["architectures"] = ["TinyCausalLM"]
        d["torch_dtype"] = "float32"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # type: ignore[arg-type]


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache for lockstep decoding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend ``x`` (B, T, H) to itself and to ``past``; returns output and the new cache."""
        b, t, h = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # With a cache, the new tokens are the last ones, so a causal mask is only needed when more
        # than one query is fed; callers feed either a whole prefix (no cache) or one token.
        if past is not None and t > 1:
            raise ValueError("feed one token at a time when a KV cache is given")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and t > 1)
        y = y.transpose(1, 2).reshape(b, t, h)
        return self.o_proj(y), (k, v)


class MLP(nn.Module):
    """Position-wise GELU feed-forward block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.down_proj(F.gelu(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the block; returns hidden states and this layer's new cache."""
        a, cache = self.self_attn(self.input_layernorm(x), past)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Backbone(nn.Module):
    """Embeddings, blocks and final norm; registered as ``model`` for HF-like names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class TinyCausalLM(nn.Module):
    """Decoder-only LM; ``forward`` returns logits and the KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2-style small-normal init (stable for a tiny model trained with a high SFT lr)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits ``(B, T, V)`` for ``input_ids`` ``(B, T)`` continuing ``past`` (if given)."""
        start = 0 if past is None else past[0][0].shape[2]
        t = input_ids.shape[1]
        pos = torch.arange(start, start + t)
        x = self.model.embed_tokens(input_ids) + self.model.embed_positions(pos)
        new_past: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, cache = layer(x, None if past is None else past[i])
            new_past.append(cache)
        return self.lm_head(self.model.norm(x)), new_past

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor,
        max_new_tokens: int,
        *,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Continue position-aligned ``prompts`` ``(B, P)`` by ``max_new_tokens`` tokens.

        All sequences decode in lockstep with a KV cache (prompts have equal length, so no padding
        is needed); tokens after an EOS are produced but meaningless — mask them with
        :func:`relexd.demo.task.completion_mask`. Sampling uses ``generator`` for determinism.
        """
        logits, past = self(prompts)
        out: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            last = logits[:, -1, :]
            if greedy:
                nxt = last.argmax(dim=-1)
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, past = self(nxt.unsqueeze(1), past)
        return torch.stack(out, dim=1)

    def num_parameters(self) -> int:
        """Total parameter count."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: Path | str) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``.

        The weights go to a temporary name first and are renamed into place, so a watcher never
        sees a half-written ``model.safetensors`` (what HF/safetensors ≥ 0.8 does too).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / f"{WEIGHTS_NAME}.tmp{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: Path | str) -> TinyCausalLM:
        """Load a model written by :meth:`save_pretrained` (or any checkpoint dir with both files)."""
        directory = Path(directory)
        cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model
