"""The reward is the whole RL signal, so its edge cases are pinned by hand-made examples."""

from __future__ import annotations

import torch

from relexd.demo import task


def _completion(text: str) -> torch.Tensor:
    ids = task.encode(text)
    ids += [task.EOS_ID] * (task.MAX_ANSWER_LEN - len(ids))
    return torch.tensor([ids])


def _reward(a: int, b: int, text: str) -> float:
    return float(task.reward(torch.tensor([a]), torch.tensor([b]), _completion(text))[0])


def test_reward_exact_answers() -> None:
    # The sum is written least significant digit first.
    assert _reward(123, 456, "975$") == 1.0
    assert _reward(999, 999, "8991$") == 1.0
    assert _reward(0, 0, "0$") == 1.0
    assert _reward(5, 7, "21$") == 1.0
    assert _reward(500, 500, "0001$") == 1.0


def test_reward_rejects_wrong_or_malformed() -> None:
    assert _reward(123, 456, "579$") == 0.0  # most significant digit first
    assert _reward(123, 456, "875$") == 0.0
    assert _reward(123, 456, "9750$") == 0.0  # trailing zero (a leading zero of the sum)
    assert _reward(123, 456, "97$") == 0.0  # truncated
    assert _reward(999, 999, "89911") == 0.0  # no EOS within the budget
    assert _reward(1, 2, "+$") == 0.0


def test_reward_ignores_tokens_after_eos() -> None:
    assert _reward(1, 2, "3$99") == 1.0
    assert _reward(100, 200, "003$1") == 1.0


def test_prompt_encoding_and_mask() -> None:
    prompts = task.encode_prompts(torch.tensor([7]), torch.tensor([123]))
    assert task.decode(prompts[0]) == "007+123="
    mask = task.completion_mask(_completion("12$9"))
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]


def test_held_out_split_is_disjoint_and_deterministic() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = task.sample_operands(500, g1)
    assert not bool(task.is_held_out(a, b).any())
    a2, b2 = task.sample_operands(500, g2)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    ha, hb = task.sample_operands(100, torch.Generator().manual_seed(0), held_out=True)
    assert bool(task.is_held_out(ha, hb).all())
