"""The demo's RL run: a supervised warm-up, then group-relative policy gradient.

Why this shape: RELEX needs a BASE model θ₀ that is already partially competent (RL with verifiable
rewards sharpens what the model can sometimes do; from scratch it gets no reward signal). The
warm-up trains (reversed-answer) addition to convergence with label smoothing, which leaves a model
that knows the answer — its greedy answer is right — but spreads probability over wrong digits, so a
sampled answer is exactly right only ~1 time in 4: the situation of a pretrained model RLVR starts
from, where RL sharpens a distribution rather than teaching a new skill. That model is θ₀, saved in
``run_dir/base/``. (With one thread the warm-up takes 50-130 s, so the demo's default bases ship with
relexd, like any pretrained model a user starts RL from; :mod:`relexd.demo.bases`.) The RL loop then samples
a group of completions per prompt, rewards exact answers, and pushes up the log-probability of
completions that beat their group's mean — GRPO without clipping/KL, which is exact on-policy policy
gradient because every batch is sampled from the current weights and used for one update.

After every step the run writes ``run_dir/checkpoint-<step>/`` like the Hugging Face Trainer:
``model.safetensors`` (temp name, then rename), ``config.json``, and ``trainer_state.json`` LAST —
the completion marker relexd waits for.

Determinism: all randomness comes from explicit ``torch.Generator`` objects seeded from ``seed``
(separate streams for init, SFT data, RL prompts, RL sampling), deterministic algorithms are on,
and the thread count is fixed. Two runs with equal arguments (including ``num_threads``) produce
bitwise-identical checkpoints. The thread count is a process-wide torch setting.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from relexd.demo import task
from relexd.demo.evaluate import Score, score_model
from relexd.demo.model import ModelConfig, TinyCausalLM

#: Default RL learning rate (Adam): the regime where extrapolation helps. Measured with
#: `python -m bench.run_all --only demo` (64 prompts x 8 samples, 200 steps, previews made from steps
#: 1-30): the previews of steps 60 / 90 / 180 recover 97/96/89 % (seed 0), 99/99/90 % (seed 1) and
#: 90/85/62 % (seed 2) of the expected reward training gains after step 30; forecast skill +0.42 to
#: +0.48 at step 30 (bench/README.md). No learning-rate warm-up: a 20-step ramp was tried and bent
#: the start of the path (the coefficient grows quadratically while the rate ramps): 68/71/71 %.
DEFAULT_LR: float = 8e-6
#: A learning rate at which the straight line does not hold: RL gains reward much faster (sampled
#: reward 0.33 -> 0.94, first vs. last 10 steps) and the path turns. Measured as above (seed 0): every
#: preview is worse than the last observed checkpoint (2x: 0.54 vs 0.63 expected reward, 6x: 0.006)
#: and relexd's forecast skill is already negative at step 30 (-0.56; -1.8 at step 200). At 1e-4 the
#: 2x preview still recovers 27 %, 3x and 6x lose, and the skill turns from +0.22 (step 30) to -1.56.
COLLAPSE_LR: float = 3e-4

DEFAULT_STEPS = 200
DEFAULT_PROMPTS_PER_STEP = 64
DEFAULT_SAMPLES_PER_PROMPT = 8

#: Warm-up budget: long enough that the seeds measured (0, 1, 2) all converge (greedy held-out
#: accuracy ≥ 0.99). Greedy accuracy crosses 0.5 between steps ~200 and ~500 depending on the seed,
#: and seed 2 passes 0.99 only after step 700.
#: A base stopped mid-learning was tried first: its RL path saturated within the observed steps
#: and the previews lost to the last observed checkpoint.
SFT_STEPS = 800
SFT_BATCH = 128
SFT_LR = 3e-3
#: Label smoothing of the warm-up: the converged model puts ~0.72 on each right token, so the
#: expected reward of θ₀ is ~0.23 with greedy accuracy ~1 (see the module docstring).
SFT_LABEL_SMOOTHING = 0.3

TRAINER_STATE_NAME = "trainer_state.json"
BASE_DIR_NAME = "base"

# Offsets that derive independent random streams from one user seed.
_INIT_STREAM, _SFT_STREAM, _PROMPT_STREAM, _SAMPLE_STREAM = 0, 1, 2, 3


@dataclass(frozen=True)
class StepInfo:
    """Progress report for one finished RL step (passed to ``on_step``)."""

    step: int
    mean_reward: float
    seconds: float
    loss: float
    checkpoint: Path


@dataclass
class RunSummary:
    """Outcome of :func:`train_run`."""

    run_dir: Path
    base_dir: Path
    steps_completed: int
    stopped_early: bool
    sft_seconds: float
    base_score: Score
    rl_seconds: float
    mean_rewards: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of one RL step, checkpoint writing included."""
        return self.rl_seconds / max(self.steps_completed, 1)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def configure_torch(num_threads: int) -> None:
    """Fix the global torch settings that bitwise determinism depends on."""
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class Warmup:
    """Everything the warm-up's result depends on besides the seed (and the torch build)."""

    steps: int = SFT_STEPS
    batch_size: int = SFT_BATCH
    lr: float = SFT_LR
    label_smoothing: float = SFT_LABEL_SMOOTHING
    model: ModelConfig = field(default_factory=ModelConfig)

    def recipe(self, seed: int) -> dict[str, object]:
        """Everything the warm-up result depends on except the torch build, as plain JSON.

        Built from the fields themselves, so a field added later cannot be left out of it.
        """
        doc: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return doc | {"version": BASE_CACHE_VERSION, "seed": seed, "config": self.model.to_dict()}

    def cache_key(self, seed: int) -> str:
        """Short hash of the recipe and the torch build: the name of a cached base.

        The warm-up is deterministic for a given recipe and torch build (the thread count is fixed
        by :func:`configure_torch` callers, and the SFT math is deterministic), so a base cached under
        this key is the same model a fresh warm-up would produce; the torch version is part of the
        key because kernels may change bits between releases.
        """
        doc = self.recipe(seed) | {"torch": torch.__version__}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def sft_warmup(seed: int = 0, warmup: Warmup | None = None) -> TinyCausalLM:
    """Train a fresh model on teacher-forced, label-smoothed answers; returns θ₀.

    A fixed number of steps on a schedule that decays to zero (deterministic, and converged for the
    default budget); the smoothing keeps the converged model's sampled answers imperfect, which is
    the room RL has to improve.
    """
    w = warmup or Warmup()
    torch.manual_seed(seed * 1_000_003 + _INIT_STREAM)  # nn.Module init uses the global RNG
    model = TinyCausalLM(w.model)
    g = _generator(seed, _SFT_STREAM)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * max(0.0, 1.0 - i / w.steps)
    )
    model.train()
    for _ in range(w.steps):
        a, b = task.sample_operands(w.batch_size, g)
        target, _ = task.answer_tokens(a, b)
        seq = torch.cat([task.encode_prompts(a, b), target], dim=1)
        logits, _ = model(seq[:, :-1])
        pred = logits[:, task.PROMPT_LEN - 1 :, :]
        mask = task.completion_mask(target)
        nll = torch.nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]),
            target.reshape(-1),
            reduction="none",
            label_smoothing=w.label_smoothing,
        )
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


#: Bump when anything that shapes the warm-up changes in a way :meth:`Warmup.cache_key` cannot see
#: (the task encoding, the SFT loss, the init): it invalidates every cached and shipped base.
BASE_CACHE_VERSION = 3  # 2: answers least significant digit first; 3: label smoothing


def _write_checkpoint(
    model: TinyCausalLM, ckpt_dir: Path, step: int, log_history: list[dict[str, float]]
) -> None:
    """Save like the HF Trainer: weights (atomic rename), config, then ``trainer_state.json``."""
    model.save_pretrained(ckpt_dir)
    state = {"global_step": step, "max_steps": None, "log_history": log_history}
    tmp = ckpt_dir / f"{TRAINER_STATE_NAME}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(ckpt_dir / TRAINER_STATE_NAME)


def rl_step(
    model: TinyCausalLM,
    opt: torch.optim.Optimizer,
    prompt_gen: torch.Generator,
    sample_gen: torch.Generator,
    *,
    prompts_per_step: int,
    samples_per_prompt: int,
) -> tuple[float, float]:
    """One on-policy group-relative policy-gradient update; returns (mean reward, loss).

    Advantage = reward − group mean (Dr. GRPO style, no division by the group std: with 0/1 rewards
    the std division up-weights nearly-solved and nearly-hopeless prompts, which makes the update
    direction noisier). Loss = −mean over all completions of advantage × summed log-probability of
    the completion tokens up to EOS. Completions whose advantage is exactly 0
    contribute no gradient, so only groups with mixed rewards are re-run with autograd.
    """
    a, b = task.sample_operands(prompts_per_step, prompt_gen)
    a = a.repeat_interleave(samples_per_prompt)
    b = b.repeat_interleave(samples_per_prompt)
    prompts = task.encode_prompts(a, b)
    completions = model.generate(prompts, task.MAX_ANSWER_LEN, generator=sample_gen)
    rewards = task.reward(a, b, completions)
    grouped = rewards.view(prompts_per_step, samples_per_prompt)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)

    opt.zero_grad(set_to_none=False)
    sel = adv != 0
    loss_value = 0.0
    if bool(sel.any()):
        seq = torch.cat([prompts[sel], completions[sel]], dim=1)
        logits, _ = model(seq[:, :-1])
        logp = torch.log_softmax(logits[:, task.PROMPT_LEN - 1 :, :], dim=-1)
        tok_logp = torch.gather(logp, 2, completions[sel].unsqueeze(2)).squeeze(2)
        seq_logp = (tok_logp * task.completion_mask(completions[sel])).sum(dim=1)
        loss = -(adv[sel] * seq_logp).sum() / adv.shape[0]
        loss.backward()
        loss_value = float(loss.detach())
    else:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    opt.step()
    return float(rewards.mean()), loss_value


def train_run(
    run_dir: Path | str,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    prompts_per_step: int = DEFAULT_PROMPTS_PER_STEP,
    samples_per_prompt: int = DEFAULT_SAMPLES_PER_PROMPT,
    num_threads: int = 2,
    on_step: Callable[[StepInfo], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """SFT warm-up (saved as ``run_dir/base``) then ``steps`` RL steps, one checkpoint per step.

    If ``run_dir/base`` already holds a model (an earlier call with the same ``run_dir``), the
    warm-up is skipped and that model is reused — reloading float32 safetensors is lossless, and the
    RL random streams do not depend on the warm-up, so the result is identical. ``stop`` ends the run
    cleanly after the current step.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    configure_torch(num_threads)
    base_dir = run_dir / BASE_DIR_NAME

    t0 = time.perf_counter()
    if (base_dir / "model.safetensors").exists() and (base_dir / "config.json").exists():
        model = TinyCausalLM.from_pretrained(base_dir)
    else:
        model = sft_warmup(seed)
        model.save_pretrained(base_dir)
    base_score = score_model(model)
    sft_seconds = time.perf_counter() - t0

    prompt_gen = _generator(seed, _PROMPT_STREAM)
    sample_gen = _generator(seed, _SAMPLE_STREAM)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    log_history: list[dict[str, float]] = []
    rewards: list[float] = []
    stopped = False
    t_rl = time.perf_counter()
    done = 0
    for step in range(1, steps + 1):
        if stop is not None and stop.is_set():
            stopped = True
            break
        t_step = time.perf_counter()
        mean_reward, loss = rl_step(
            model,
            opt,
            prompt_gen,
            sample_gen,
            prompts_per_step=prompts_per_step,
            samples_per_prompt=samples_per_prompt,
        )
        rewards.append(mean_reward)
        log_history.append({"step": step, "reward": mean_reward, "loss": loss, "learning_rate": lr})
        ckpt = run_dir / f"checkpoint-{step}"
        _write_checkpoint(model, ckpt, step, log_history)
        done = step
        if on_step is not None:
            on_step(StepInfo(step, mean_reward, time.perf_counter() - t_step, loss, ckpt))
    return RunSummary(
        run_dir=run_dir,
        base_dir=base_dir,
        steps_completed=done,
        stopped_early=stopped,
        sft_seconds=sft_seconds,
        base_score=base_score,
        rl_seconds=time.perf_counter() - t_rl,
        mean_rewards=rewards,
    )
