"""A tiny, real RL-with-verifiable-rewards run for ``relexd demo``.

The demo needs checkpoints that come from genuine RL, not synthetic noise, yet the whole run must
finish in under three minutes on two CPU cores. So: a few-hundred-thousand-parameter decoder-only
transformer learns 3-digit addition, first by a supervised warm-up (the BASE model, θ₀, cached), then
by group-relative policy gradient with an exact-answer reward, writing a Hugging Face Trainer-style
checkpoint after every step.

Modules: :mod:`.task` (tokenizer, prompts, reward), :mod:`.model` (the transformer and HF-like
save/load), :mod:`.train` (warm-up + RL loop), :mod:`.evaluate` (expected reward and greedy accuracy
on held-out prompts).
"""

from relexd.demo.evaluate import Score, score_checkpoint, score_model
from relexd.demo.model import ModelConfig, TinyCausalLM
from relexd.demo.train import (
    COLLAPSE_LR,
    DEFAULT_LR,
    RunSummary,
    StepInfo,
    train_run,
)

__all__ = [
    "COLLAPSE_LR",
    "DEFAULT_LR",
    "ModelConfig",
    "RunSummary",
    "Score",
    "StepInfo",
    "TinyCausalLM",
    "score_checkpoint",
    "score_model",
    "train_run",
]
