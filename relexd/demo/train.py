"""The demo's RL run: short supervised warm-up, then group-relative policy gradient.

Why this shape: RELEX needs a BASE model θ₀ that is already partially competent (RL with verifiable
rewards sharpens what the model can sometimes do; from scratch it gets no reward signal). A few
hundred supervised steps on (reversed-answer) addition give a partly competent model; that model is
θ₀ and is saved in ``run_dir/base/``. (With one thread that warm-up takes ~25 s, so :func:`ensure_base`
caches it under ``~/.cache/relexd``; it is deterministic, so that is safe.) The RL loop then samples
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
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relexd.demo import task
from relexd.demo.evaluate import score_model
from relexd.demo.model import ModelConfig, TinyCausalLM

#: Default RL learning rate (Adam). STILL NOT A WORKING "EXTRAPOLATION HELPS" REGIME.
#: Measured 2026-11-22 on the reversed-answer task (64 prompts x 8 samples, seed 0, 1 thread; base =
#: SFT 220 x 128, greedy held-out acc 0.619, exact expected held-out reward 0.127):
#: lr 3e-5: greedy 0.619 → 0.620 (step 30) → 0.646 (step 90), expected reward 0.127 → 0.131 → 0.147.
#: Observing steps 1–15 (`relexd extrapolate --upto 15 --target 30,45,90`): rank-1 energy 0.947,
#: R² 0.961, forecast skill −0.35 (ratio 3.75); previews of 30/45/90 score 0.468/0.354/0.131 vs
#: trained 0.620/0.625/0.646, last observed 0.600 — extrapolation is worse than stopping.
#: Same on a stronger base (SFT 250 x 128, greedy 0.795): lr 3e-5 greedy 0.795 → 0.837 at step 90,
#: energy 0.900, R² 0.897, skill −0.75, previews 0.810/0.753/0.532 vs trained 0.829/0.825/0.837.
#: The exact gradients are now consistent across prompts, so what remains is the per-step noise of
#: the 512-sample policy-gradient estimate (Adam's early steps move every weight by ~lr).
DEFAULT_LR: float = 3e-5
#: Larger learning rate: RL improves the reward faster but the first steps are an Adam transient.
#: Measured as above: lr 1e-4: greedy 0.619 → 0.560 (step 20) → 0.647 (step 120), expected reward
#: 0.127 → 0.160 (step 60) → 0.218 (step 120). Observing 18 of 120: energy 0.923, R² 0.922,
#: forecast skill −0.37 (ratio 2.25); previews of 36/54/108 score 0.378/0.240/0.055 vs trained
#: 0.604/0.619/0.631, last observed 0.573.
COLLAPSE_LR: float = 1e-4

DEFAULT_STEPS = 200
DEFAULT_PROMPTS_PER_STEP = 64
DEFAULT_SAMPLES_PER_PROMPT = 8

SFT_STEPS = 220
SFT_BATCH = 128
SFT_LR = 3e-3

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
    sft_accuracy: float
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


def sft_warmup(
    seed: int = 0,
    *,
    steps: int = SFT_STEPS,
    batch_size: int = SFT_BATCH,
    lr: float = SFT_LR,
    config: ModelConfig | None = None,
) -> TinyCausalLM:
    """Train a fresh model on teacher-forced answers for a few seconds; returns θ₀.

    Deliberately stopped early (a fixed number of steps, not an accuracy target, so it is
    deterministic) to leave the model partially competent, giving RL room to improve.
    """
    torch.manual_seed(seed * 1_000_003 + _INIT_STREAM)  # nn.Module init uses the global RNG
    model = TinyCausalLM(config or ModelConfig())
    g = _generator(seed, _SFT_STREAM)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * max(0.0, 1.0 - i / steps)
    )
    model.train()
    for _ in range(steps):
        a, b = task.sample_operands(batch_size, g)
        target, _ = task.answer_tokens(a, b)
        seq = torch.cat([task.encode_prompts(a, b), target], dim=1)
        logits, _ = model(seq[:, :-1])
        pred = logits[:, task.PROMPT_LEN - 1 :, :]
        mask = task.completion_mask(target)
        nll = torch.nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none"
        )
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


#: Bump when anything that shapes the warm-up changes in a way the cache key below cannot see (the
#: task encoding, the SFT loss, the init): it invalidates every cached base.
BASE_CACHE_VERSION = 2  # 2: answers written least significant digit first


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/relexd`` or ``~/.cache/relexd``: where warm-up bases are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "relexd"


def base_cache_key(seed: int, *, steps: int, batch_size: int, lr: float, config: ModelConfig) -> str:
    """Short hash of everything the warm-up result depends on.

    The warm-up is deterministic for a given seed, budget, architecture and torch build (the thread
    count is fixed by :func:`configure_torch` callers, and the SFT math is deterministic), so a base
    cached under this key is the same model a fresh warm-up would produce; the torch version is part
    of the key because kernels may change bits between releases.
    """
    doc = {
        "version": BASE_CACHE_VERSION,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "config": config.to_dict(),
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base(
    dest: Path,
    seed: int = 0,
    *,
    steps: int = SFT_STEPS,
    batch_size: int = SFT_BATCH,
    lr: float = SFT_LR,
    config: ModelConfig | None = None,
    cache_dir: Path | None = None,
) -> bool:
    """Put the warm-up base model θ₀ into ``dest``; returns True if it came from the cache.

    The warm-up is the slowest part of a first demo run, and it is deterministic, so the result is
    kept in ``cache_dir/demo-base-<key>`` (default :func:`default_cache_dir`) and copied on later runs.
    ``cache_dir=None`` uses the default; pass a path to isolate (tests). The cache entry is written
    aside and renamed into place, so a killed run never leaves a half-written base behind.
    """
    cfg = config or ModelConfig()
    cache_root = cache_dir if cache_dir is not None else default_cache_dir()
    key = base_cache_key(seed, steps=steps, batch_size=batch_size, lr=lr, config=cfg)
    cached = cache_root / f"demo-base-{key}"
    if (cached / "model.safetensors").is_file() and (cached / "config.json").is_file():
        shutil.copytree(cached, dest, dirs_exist_ok=True)
        return True
    model = sft_warmup(seed, steps=steps, batch_size=batch_size, lr=lr, config=cfg)
    model.save_pretrained(dest)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-demo-base-", dir=cache_root))
        shutil.copytree(dest, staging, dirs_exist_ok=True)
        try:
            os.replace(staging, cached)
        except OSError:  # another run published it first: theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass  # an unwritable cache only costs the next run another warm-up
    return False


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
    normalize_std: bool = False,
) -> tuple[float, float]:
    """One on-policy group-relative policy-gradient update; returns (mean reward, loss).

    Advantage = reward − group mean (Dr. GRPO style, no division by the group std by default: with
    0/1 rewards the std division up-weights nearly-solved and nearly-hopeless prompts, which makes
    the update direction noisier). Loss = −mean over all completions of advantage × summed
    log-probability of the completion tokens up to EOS. Completions whose advantage is exactly 0
    contribute no gradient, so only groups with mixed rewards are re-run with autograd.
    """
    a, b = task.sample_operands(prompts_per_step, prompt_gen)
    a = a.repeat_interleave(samples_per_prompt)
    b = b.repeat_interleave(samples_per_prompt)
    prompts = task.encode_prompts(a, b)
    completions = model.generate(prompts, task.MAX_ANSWER_LEN, generator=sample_gen)
    rewards = task.reward(a, b, completions)
    grouped = rewards.view(prompts_per_step, samples_per_prompt)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (grouped.std(dim=1, keepdim=True) + 1e-4)
    adv = adv.reshape(-1)

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
    normalize_std: bool = False,
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
    sft_accuracy = score_model(model)
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
            normalize_std=normalize_std,
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
        sft_accuracy=sft_accuracy,
        rl_seconds=time.perf_counter() - t_rl,
        mean_rewards=rewards,
    )
