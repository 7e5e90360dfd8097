"""Greedy held-out accuracy — the same exact-answer reward that RL optimises.

Used to score a checkpoint or a relexd preview: the held-out prompts come from the slice of the
input space that training never samples (:func:`relexd.demo.task.is_held_out`), drawn with a fixed
seed, so every checkpoint of every run is scored on the same set.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from relexd.demo import task
from relexd.demo.model import TinyCausalLM

DEFAULT_EVAL_PROMPTS = 1024
DEFAULT_EVAL_SEED = 1234


@lru_cache(maxsize=8)
def held_out_set(n_prompts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out operand pairs ``(a, b)`` for ``(n_prompts, seed)``."""
    g = torch.Generator().manual_seed(seed)
    return task.sample_operands(n_prompts, g, held_out=True)


@torch.no_grad()
def score_model(
    model: TinyCausalLM, n_prompts: int = DEFAULT_EVAL_PROMPTS, seed: int = DEFAULT_EVAL_SEED
) -> float:
    """Greedy exact-match accuracy of an in-memory model on the held-out set."""
    a, b = held_out_set(n_prompts, seed)
    was_training = model.training
    model.eval()
    completions = model.generate(task.encode_prompts(a, b), task.MAX_ANSWER_LEN, greedy=True)
    model.train(was_training)
    return float(task.reward(a, b, completions).mean())


def score_checkpoint(
    path: Path | str, n_prompts: int = DEFAULT_EVAL_PROMPTS, seed: int = DEFAULT_EVAL_SEED
) -> float:
    """Greedy exact-match accuracy of the checkpoint directory ``path`` (config + safetensors).

    Deterministic, and fast (well under a second) because decoding is batched with a KV cache.
    """
    return score_model(TinyCausalLM.from_pretrained(path), n_prompts, seed)
