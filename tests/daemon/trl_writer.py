"""A real TRL GRPOTrainer run on a tiny local Qwen2, saving every step (the issue-10 writer).

Run as a separate process, like a trainer beside relexd::

    python tests/daemon/trl_writer.py base BASE_DIR              # write θ₀ (model + tokenizer)
    python tests/daemon/trl_writer.py train BASE_DIR RUN_DIR --steps 24 [--aside DIR]

``train`` starts from ``BASE_DIR`` and saves ``RUN_DIR/checkpoint-N`` after every step with
``save_total_limit=2`` and ``save_only_model=True`` (no optimizer state: the fastest pace TRL
manages). ``--aside`` copies every checkpoint there from a ``TrainerCallback.on_save`` — called
after the Trainer wrote the checkpoint and rotated older ones away — so a test keeps all of them.
Everything is built locally (word-level tokenizer, random init): no hub, no network.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

VOCAB = ["<pad>", "<eos>", *"0123456789", "+", "="]


def build_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def write_base(base: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(base)
    build_tokenizer().save_pretrained(base)


def ones_reward(completions: list[str], **_: object) -> list[float]:
    """A smooth verifiable reward (share of '1' characters): groups rarely tie, so every step moves."""
    return [c.count("1") / max(len(c), 1) for c in completions]


def train(base: Path, run: Path, steps: int, aside: Path | None, lora: bool = False, keep: int = 2) -> None:
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)  # leave the other core to relexd, as on a shared training host

    class KeepAside(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            shutil.copytree(src, aside / src.name)

    prompts = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(8) for b in range(8)]})
    args = GRPOConfig(
        output_dir=str(run), max_steps=steps, save_steps=1, save_total_limit=keep, save_only_model=True,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=4, learning_rate=3e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, bf16=False,
    )  # fmt: skip
    peft_config = None
    if lora:  # TRL + peft: the checkpoints hold adapter_model.safetensors + adapter_config.json
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = GRPOTrainer(
        model=Qwen2ForCausalLM.from_pretrained(base),
        reward_funcs=ones_reward,
        args=args,
        train_dataset=prompts,
        processing_class=build_tokenizer(),
        callbacks=[KeepAside()] if aside is not None else [],
        peft_config=peft_config,
    )
    started = time.perf_counter()
    trainer.train()
    print(f"trained {steps} steps in {time.perf_counter() - started:.2f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    verbs = ap.add_subparsers(dest="verb", required=True)
    b = verbs.add_parser("base")
    b.add_argument("base", type=Path)
    t = verbs.add_parser("train")
    t.add_argument("base", type=Path)
    t.add_argument("run", type=Path)
    t.add_argument("--steps", type=int, default=24)
    t.add_argument("--aside", type=Path)
    t.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead")
    t.add_argument("--keep", type=int, default=2, help="save_total_limit")
    args = ap.parse_args(argv)
    if args.verb == "base":
        write_base(args.base)
    else:
        train(args.base, args.run, args.steps, args.aside, args.lora, args.keep)


if __name__ == "__main__":
    main()
