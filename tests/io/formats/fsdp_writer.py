"""Real FSDP2 training on CPU (gloo), saving like verl and like torch DCP users, plus references.

Run with ``torchrun --nproc_per_node W tests/io/formats/fsdp_writer.py OUT --steps N``; also runs
as one plain process (``W = 1``: no process group, no FSDP, as verl's single-GPU case). For each
model (``qwen2``: a tiny transformers Qwen2 whose previews must load; ``odd``: a 1-row weight
that leaves rank 1's shard empty) it writes, per step:

* ``OUT/<model>/verl/global_step_N/actor/model_world_size_W_rank_R.pt`` — every rank's
  ``torch.save(model.state_dict())`` (DTensors under FSDP2), ``fsdp_config.json``,
  ``huggingface/config.json``, then ``latest_checkpointed_iteration.txt`` — verl's checkpoint
  manager's order;
* ``OUT/<model>/dcp/step_N/`` — ``torch.distributed.checkpoint.save`` of
  ``{"model": ..., "optimizer": ...}`` from ``get_state_dict`` (DTensor state), torchtitan-style;
* ``OUT/<model>/nemo/step_N/policy/weights/model/`` (two ranks only) — torch's
  ``HuggingFaceStorageWriter(save_distributed=True)``, what NeMo Automodel saves with: per-rank
  ``shard-…safetensors`` with ``DCP_SHARDING_INFO``, written to ``tmp_step_N`` and renamed;
* ``OUT/<model>/hf/checkpoint-N/`` — the same weights gathered (``full_tensor``) and saved as HF
  safetensors with ``trainer_state.json``: the reference every native reader must equal;
* ``OUT/<model>/base/`` — θ₀ as HF safetensors (and config); ``--base-only`` writes just that, so
  a watcher can be started on θ₀ before the run begins.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file


def build(kind: str) -> tuple[torch.nn.Module, object | None]:
    torch.manual_seed(0)
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
            tie_word_embeddings=False,
        )  # fmt: skip
        return Qwen2ForCausalLM(config), config
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 1)), None


def loss_of(kind: str, model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    if kind == "qwen2":
        ids = torch.randint(0, 61, (2, 8), generator=g)
        return model(input_ids=ids, labels=ids).loss
    return model(torch.randn(4, 5, generator=g)).square().mean()


def full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--base-only", action="store_true", help="write θ₀ of each model and stop")
    args = ap.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    torch.set_num_threads(1)
    for kind in ("qwen2", "odd"):
        root = args.out / kind
        model, config = build(kind)
        if rank == 0 and not (root / "base" / "model.safetensors").exists():  # never under a reader
            (root / "base").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().clone() for k, v in model.state_dict().items()},
                str(root / "base" / "model.safetensors"),
            )
            if config is not None:
                config.save_pretrained(root / "base")
        if args.base_only:
            continue
        if distributed:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for module in model.modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optim = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(1, args.steps + 1):
            loss_of(kind, model, step).backward()
            optim.step()
            optim.zero_grad()
            state = model.state_dict()
            actor = root / "verl" / f"global_step_{step}" / "actor"
            actor.mkdir(parents=True, exist_ok=True)
            torch.save(state, actor / f"model_world_size_{world}_rank_{rank}.pt")
            gathered = {k: full(v).detach().clone() for k, v in state.items()}
            if distributed:
                from torch.distributed.checkpoint.state_dict import get_state_dict

                msd, osd = get_state_dict(model, optim)
                dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(root / "dcp" / f"step_{step}"))
                # NeMo-RL (DTensor v2): every rank's slices as safetensors, written to tmp_step_N,
                # renamed to step_N when complete
                from torch.distributed.checkpoint import HuggingFaceStorageWriter

                tmp = root / "nemo" / f"tmp_step_{step}"
                writer = HuggingFaceStorageWriter(
                    path=str(tmp / "policy" / "weights" / "model"), save_distributed=True
                )
                dcp.save(state, storage_writer=writer)
                dist.barrier()
                if rank == 0:
                    tmp.rename(root / "nemo" / f"step_{step}")
                dist.barrier()
            else:
                dcp.save({"model": state}, checkpoint_id=str(root / "dcp" / f"step_{step}"), no_dist=True)
            if rank == 0:
                (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
                if config is not None:
                    config.save_pretrained(actor / "huggingface")
                (root / "verl" / "latest_checkpointed_iteration.txt").write_text(str(step))
                hf = root / "hf" / f"checkpoint-{step}"
                hf.mkdir(parents=True, exist_ok=True)
                save_file(gathered, str(hf / "model.safetensors"))
                if config is not None:
                    config.save_pretrained(hf)
                (hf / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            if distributed:
                dist.barrier()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
