"""Scores of a checkpoint or a relexd preview on held-out prompts.

The primary score is the **expected training reward**: the probability that one completion sampled
exactly as training samples it (temperature 1, :meth:`TinyCausalLM.generate`) is exactly right,
averaged over the held-out prompts. Training's reward is 1 for an exact answer, so this is the
expectation of that very reward under the policy — computed exactly, by one teacher-forced forward
pass (the product of the per-token probabilities of the right answer and its EOS), instead of being
estimated from samples. That matters: the differences the demo must resolve (a preview vs. the trained
checkpoint) are a few thousandths, below the noise of any affordable sample average. Greedy
exact-match accuracy is reported next to it; it is what a user of the model sees, but RL moves it in
jumps (one prompt at a time crosses its decision boundary) and it is not what RL optimises.

The held-out prompts come from the slice of the input space that training never samples
(:func:`relexd.demo.task.is_held_out`), drawn with a fixed seed, so every checkpoint of every run is
scored on the same set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from relexd.demo import task
from relexd.demo.model import TinyCausalLM

DEFAULT_EVAL_PROMPTS = 1024
DEFAULT_EVAL_SEED = 1234


@dataclass(frozen=True)
class Score:
    """Both scores of one model on the held-out set."""

    expected_reward: float
    greedy_accuracy: float


@lru_cache(maxsize=8)
def held_out_set(n_prompts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out operand pairs ``(a, b)`` for ``(n_prompts, seed)``."""
    g = torch.Generator().manual_seed(seed)
    return task.sample_operands(n_prompts, g, held_out=True)


@contextmanager
def _eval_mode(model: TinyCausalLM) -> Iterator[None]:
    """Evaluation mode for the duration, then the caller's mode back (scoring runs mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def answer_probabilities(model: TinyCausalLM, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per prompt, the probability that a temperature-1 sample is exactly the right answer (float64).

    Tokens after the answer's EOS are never scored by the reward, so they carry no factor here.
    """
    target, _ = task.answer_tokens(a, b)
    seq = torch.cat([task.encode_prompts(a, b), target], dim=1)
    with _eval_mode(model):
        logits, _ = model(seq[:, :-1])
    logp = torch.log_softmax(logits[:, task.PROMPT_LEN - 1 :, :].double(), dim=-1)
    token_logp = torch.gather(logp, 2, target.unsqueeze(2)).squeeze(2)
    return torch.exp((token_logp * task.completion_mask(target).double()).sum(dim=1))


@torch.no_grad()
def greedy_accuracy(model: TinyCausalLM, a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of prompts whose greedy (argmax) completion is exactly right."""
    with _eval_mode(model):
        completions = model.generate(task.encode_prompts(a, b), task.MAX_ANSWER_LEN, greedy=True)
    return float(task.reward(a, b, completions).mean())


def score_model(
    model: TinyCausalLM, n_prompts: int = DEFAULT_EVAL_PROMPTS, seed: int = DEFAULT_EVAL_SEED
) -> Score:
    """Expected reward and greedy accuracy of an in-memory model on the held-out set."""
    a, b = held_out_set(n_prompts, seed)
    return Score(float(answer_probabilities(model, a, b).mean()), greedy_accuracy(model, a, b))


def score_checkpoint(
    path: Path | str, n_prompts: int = DEFAULT_EVAL_PROMPTS, seed: int = DEFAULT_EVAL_SEED
) -> Score:
    """Scores of the checkpoint directory ``path`` (config + safetensors); deterministic, < 1 s."""
    return score_model(TinyCausalLM.from_pretrained(path), n_prompts, seed)
