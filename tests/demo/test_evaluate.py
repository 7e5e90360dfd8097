"""The demo's scores: the expected reward must be the true expectation of training's sampled reward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from relexd.demo import task
from relexd.demo.evaluate import (
    answer_probabilities,
    greedy_accuracy,
    held_out_set,
    score_checkpoint,
)
from relexd.demo.model import ModelConfig, TinyCausalLM
from relexd.demo.train import configure_torch


@pytest.fixture(scope="module")
def half_taught() -> tuple[TinyCausalLM, torch.Tensor, torch.Tensor]:
    """A model taught a few held-out prompts just long enough to be right SOME of the time.

    The reference checks below need probabilities far from 0 and 1 (a tiny-budget base scores ~0,
    where any estimator agrees); overfitting eight prompts for a few steps gets there in ~1 s.
    """
    configure_torch(1)
    torch.manual_seed(0)
    model = TinyCausalLM(ModelConfig())
    a, b = held_out_set(8, 99)
    target, _ = task.answer_tokens(a, b)
    seq = torch.cat([task.encode_prompts(a, b), target], dim=1)
    mask = task.completion_mask(target).reshape(-1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        logits, _ = model(seq[:, :-1])
        pred = logits[:, task.PROMPT_LEN - 1 :, :].reshape(-1, task.VOCAB_SIZE)
        nll = torch.nn.functional.cross_entropy(pred, target.reshape(-1), reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if float(answer_probabilities(model, a, b).mean()) > 0.4:
            break
    return model, a, b


def test_expected_reward_matches_step_by_step_decoding(half_taught) -> None:
    """Independent route: the KV-cache decoder training samples with, fed the right answer token by
    token, multiplying the softmax probability it would have sampled each token with."""
    model, a, b = half_taught
    target, length = task.answer_tokens(a, b)
    with torch.no_grad():
        logits, past = model(task.encode_prompts(a, b))
        reference = torch.ones(a.shape[0], dtype=torch.float64)
        for j in range(task.MAX_ANSWER_LEN):
            probs = torch.softmax(logits[:, -1, :].double(), dim=-1)
            p = probs.gather(1, target[:, j : j + 1]).squeeze(1)
            reference *= torch.where(j < length, p, torch.ones_like(p))
            logits, past = model(target[:, j : j + 1], past)
    exact = answer_probabilities(model, a, b)
    assert float(exact.min()) > 0.05 and float(exact.max()) < 0.995, exact  # a non-trivial check
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-7)


def test_expected_reward_matches_sampled_training_reward(half_taught) -> None:
    """Monte Carlo with training's own sampler and reward: within 4.5 standard errors per prompt."""
    model, a, b = half_taught
    n = 1200
    exact = answer_probabilities(model, a, b)
    aa, bb = a.repeat_interleave(n), b.repeat_interleave(n)
    g = torch.Generator().manual_seed(5)
    completions = model.generate(task.encode_prompts(aa, bb), task.MAX_ANSWER_LEN, generator=g)
    sampled = task.reward(aa, bb, completions).view(-1, n).double().mean(dim=1)
    for p, m in zip(exact.tolist(), sampled.tolist(), strict=True):
        se = math.sqrt(max(p * (1 - p), 1e-4) / n)
        assert abs(m - p) < 4.5 * se, (p, m)


def test_greedy_accuracy_counts_argmax_answers(half_taught) -> None:
    model, a, b = half_taught
    completions = model.generate(task.encode_prompts(a, b), task.MAX_ANSWER_LEN, greedy=True)
    assert greedy_accuracy(model, a, b) == float(task.reward(a, b, completions).mean())


def test_score_is_deterministic(cached_base: Path) -> None:
    s1 = score_checkpoint(cached_base)
    assert s1 == score_checkpoint(cached_base)
    assert 0.0 <= s1.expected_reward <= 1.0 and 0.0 <= s1.greedy_accuracy <= 1.0


def test_untrained_model_scores_zero(tmp_path: Path) -> None:
    TinyCausalLM(ModelConfig()).save_pretrained(tmp_path)
    score = score_checkpoint(tmp_path, n_prompts=64)
    assert score.greedy_accuracy == 0.0
    assert score.expected_reward < 1e-3  # ≈ (1/13)^5: every token near uniform


def test_held_out_set_is_fixed() -> None:
    a, b = held_out_set(256, 7)
    assert bool(task.is_held_out(a, b).all())
    assert a.shape == (256,)
    a2, b2 = held_out_set.__wrapped__(256, 7)
    assert torch.equal(a, a2) and torch.equal(b, b2)
