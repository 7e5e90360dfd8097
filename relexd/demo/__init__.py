"""A tiny, real RL-with-verifiable-rewards run for ``relexd demo``.

The demo needs checkpoints that come from genuine RL, not synthetic noise, yet the whole run must
finish in well under two minutes on a laptop CPU. So: a few-hundred-thousand-parameter decoder-only
transformer learns 3-digit addition, first by a short supervised warm-up (the BASE model, θ₀), then
by group-relative policy gradient with an exact-answer reward, writing a Hugging Face Trainer-style
checkpoint after every step.

Modules: :mod:`.task` (tokenizer, prompts, reward), :mod:`.model` (the transformer and HF-like
save/load), :mod:`.train` (warm-up + RL loop), :mod:`.evaluate` (greedy held-out accuracy).
"""

from relexd.demo.evaluate import score_checkpoint, score_model
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
    "StepInfo",
    "TinyCausalLM",
    "score_checkpoint",
    "score_model",
    "train_run",
]
