"""The policy gradient must push probability towards rewarded completions.

Why a planted reward: with the real exact-sum reward a freshly initialised model never earns a
point, and a properly warmed-up base costs too much test time. Rewarding completions whose first
token is ``1`` (about 1 in 13 samples under the initial policy) exercises exactly the parts that can
silently break RL — the sign of the loss, log-probs of the sampled tokens, the per-group advantage,
sampling from the current weights — and a correct implementation raises that token's probability
within a few steps.
"""

from __future__ import annotations

import pytest
import torch

from relexd.demo import task, train
from relexd.demo.model import ModelConfig, TinyCausalLM


def _first_token_prob(model: TinyCausalLM, token: int) -> float:
    a, b = task.sample_operands(256, torch.Generator().manual_seed(99))
    with torch.no_grad():
        logits, _ = model(task.encode_prompts(a, b))
    return float(torch.softmax(logits[:, -1, :], dim=-1)[:, token].mean())


def planted_reward(a: torch.Tensor, b: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """1 for completions that start with the digit 1: learnable from scratch in a few steps."""
    return (completions[:, 0] == task.VOCAB.index("1")).float()


def test_policy_gradient_increases_rewarded_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    one = task.VOCAB.index("1")
    monkeypatch.setattr(train.task, "reward", planted_reward)
    train.configure_torch(1)
    torch.manual_seed(0)
    model = TinyCausalLM(ModelConfig())
    before = _first_token_prob(model, one)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pg, sg = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    rewards = [
        train.rl_step(model, opt, pg, sg, prompts_per_step=16, samples_per_prompt=8)[0] for _ in range(12)
    ]
    after = _first_token_prob(model, one)
    assert after > 2 * before, (before, after, rewards)
    assert sum(rewards[-3:]) / 3 > rewards[0]


def test_group_advantage_ignores_uniform_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward every sample earns carries no signal: the weights must not move at all."""
    monkeypatch.setattr(train.task, "reward", lambda a, b, c: torch.ones(c.shape[0]))
    train.configure_torch(1)
    torch.manual_seed(0)
    model = TinyCausalLM(ModelConfig())
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pg, sg = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    train.rl_step(model, opt, pg, sg, prompts_per_step=4, samples_per_prompt=4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
