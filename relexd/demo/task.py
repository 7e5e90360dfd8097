"""The verifiable task: 3-digit addition with an exact-answer reward.

Prompts are fixed-width (``"007+123="``, 8 tokens) so that a whole batch is position-aligned: the
model then needs no padding or attention masks and can sample every sequence in lockstep with a KV
cache, which is what makes 300 RL steps affordable on two CPU cores. The answer is the decimal sum
written LEAST significant digit first (``123+456=`` → ``975$``), followed by an end-of-sequence
token, so the model has to decide where the answer stops; the reward is 1 only for the exact
reversed digits followed by EOS. Reversed order makes every output digit a function of two operand
digits plus the carry just produced, so a partly trained model's errors concentrate on one skill
shared by all prompts (carrying) instead of being prompt-specific: measured on a partly trained base, exact
expected-reward gradients of two disjoint 512-prompt batches have cosine 0.69–0.88 (most-significant
first: 0.02).

A fixed slice of the input space (see :func:`is_held_out`) is never used for training, so that the
evaluation set is genuinely held out.
"""

from __future__ import annotations

import torch

#: Symbols of the vocabulary; the index of a symbol is its token id.
VOCAB: str = "0123456789+=$"
EOS_ID: int = VOCAB.index("$")
PLUS_ID: int = VOCAB.index("+")
EQUALS_ID: int = VOCAB.index("=")
VOCAB_SIZE: int = len(VOCAB)

N_DIGITS: int = 3
#: Prompt length: ``ddd+ddd=``.
PROMPT_LEN: int = 2 * N_DIGITS + 2
#: Longest answer (``999+999=1998``) plus the EOS token.
MAX_ANSWER_LEN: int = N_DIGITS + 2
MAX_SEQ_LEN: int = PROMPT_LEN + MAX_ANSWER_LEN

_MAX_OPERAND = 10**N_DIGITS
_HELD_OUT_MODULUS = 16

_TOKEN_OF = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    """Token ids of ``text``; every character must be in :data:`VOCAB`."""
    return [_TOKEN_OF[ch] for ch in text]


def decode(ids: list[int] | torch.Tensor) -> str:
    """Text of token ids (EOS is rendered as ``$``)."""
    return "".join(VOCAB[int(i)] for i in ids)


def is_held_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Boolean mask of operand pairs reserved for evaluation (1/16 of all pairs).

    A hash-like residue rather than a range keeps the held-out pairs spread over the whole input
    space, so held-out accuracy measures the same skill as training reward.
    """
    return ((a * 7919 + b * 104729) % _HELD_OUT_MODULUS) == 0


def sample_operands(
    n: int, generator: torch.Generator, *, held_out: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` operand pairs from the training split (or the held-out split).

    Rejection sampling with a seeded generator: deterministic for a given generator state.
    """
    a_parts: list[torch.Tensor] = []
    b_parts: list[torch.Tensor] = []
    have = 0
    while have < n:
        want = 2 * (n - have) if not held_out else _HELD_OUT_MODULUS * 2 * (n - have)
        a = torch.randint(0, _MAX_OPERAND, (want,), generator=generator)
        b = torch.randint(0, _MAX_OPERAND, (want,), generator=generator)
        keep = is_held_out(a, b) if held_out else ~is_held_out(a, b)
        a_parts.append(a[keep])
        b_parts.append(b[keep])
        have += int(keep.sum())
    return torch.cat(a_parts)[:n], torch.cat(b_parts)[:n]


def _digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-padded decimal digits of ``x`` (most significant first), shape ``(n, width)``."""
    powers = 10 ** torch.arange(width - 1, -1, -1)
    return (x.unsqueeze(1) // powers) % 10


def encode_prompts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Prompt token ids ``(n, PROMPT_LEN)`` for operand pairs."""
    n = a.shape[0]
    plus = torch.full((n, 1), PLUS_ID, dtype=torch.long)
    eq = torch.full((n, 1), EQUALS_ID, dtype=torch.long)
    return torch.cat([_digits(a, N_DIGITS), plus, _digits(b, N_DIGITS), eq], dim=1)


def answer_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target answer ids ``(n, MAX_ANSWER_LEN)`` (sum digits REVERSED, EOS, then EOS padding) and lengths.

    The sum is written least significant digit first (``123+456=`` → ``975$``; ``999+999=`` →
    ``8991$``), without leading zeros. The length counts the EOS token: it is the number of target
    positions that carry a loss.
    """
    s = a + b
    n_digits = torch.where(s >= 1000, 4, torch.where(s >= 100, 3, torch.where(s >= 10, 2, 1)))
    pos = torch.arange(MAX_ANSWER_LEN).unsqueeze(0)
    rev = (s.unsqueeze(1) // 10**pos) % 10  # digit j = 10**j place
    out = torch.where(pos < n_digits.unsqueeze(1), rev, EOS_ID)
    return out, n_digits + 1


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """Mask of completion tokens up to and including the first EOS (float, same shape).

    Tokens sampled after EOS are an artefact of lockstep decoding; they must carry neither reward
    nor gradient.
    """
    is_eos = (completions == EOS_ID).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before position
    return (eos_before == 0).float()


def reward(a: torch.Tensor, b: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Exact-answer reward: 1.0 if the completion is the sum's digits followed by EOS, else 0.0.

    ``completions`` has shape ``(n, L)`` with ``L <= MAX_ANSWER_LEN``; anything after the first EOS
    is ignored. A missing EOS, a leading zero or an extra digit all score 0.
    """
    target, length = answer_tokens(a, b)
    n, width = completions.shape
    if width < MAX_ANSWER_LEN:
        pad = torch.full((n, MAX_ANSWER_LEN - width), -1, dtype=completions.dtype)
        completions = torch.cat([completions, pad], dim=1)
    completions = completions[:, :MAX_ANSWER_LEN]
    pos = torch.arange(MAX_ANSWER_LEN).unsqueeze(0)
    relevant = pos < length.unsqueeze(1)
    match = (completions == target) | ~relevant
    return match.all(dim=1).float()
