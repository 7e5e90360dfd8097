"""The same weights in every checkpoint format relexd reads, for bench/formats.py.

``torchrun --nproc_per_node 2 -m bench.format_writer OUT LAYERS VOCAB`` writes, for steps 1 and 2
of a Qwen2.5-0.5B-shaped model with LAYERS layers and a VOCAB vocabulary (bf16):
``OUT/base`` and ``OUT/hf/step_N`` (HF safetensors, rank 0), ``OUT/verl/step_N``
(``torch.save`` of each rank's ``Shard(0)`` DTensor state dict), ``OUT/dcp/step_N``
(``torch.distributed.checkpoint.save``), ``OUT/nemo/step_N`` (``HuggingFaceStorageWriter``,
per-rank shards) and ``OUT/deepspeed/step_N`` (``mp_rank_00_model_states.pt`` with ``"module"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from bench.synthetic import QWEN25_05B


def weights(layers: int, vocab: int, step: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape) in enumerate(QWEN25_05B.smaller(layers, vocab).specs().items()):
        g = torch.Generator().manual_seed(i)
        base = torch.randn(shape, generator=g)
        move = torch.randn(shape, generator=g) * 0.01
        out[name] = (base + step * move).to(torch.bfloat16)
    return out


def main() -> None:
    out, layers, vocab = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for step in (0, 1, 2):
        full = weights(layers, vocab, step)
        if rank == 0:
            target = out / "base" if step == 0 else out / "hf" / f"step_{step}"
            target.mkdir(parents=True, exist_ok=True)
            save_file(full, str(target / "model.safetensors"))
            if step:
                ds = out / "deepspeed" / f"step_{step}"
                ds.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {"module": full, "ds_version": "0.16.4", "global_steps": step},
                    ds / "mp_rank_00_model_states.pt",
                )
        if step:
            sharded = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
            verl = out / "verl" / f"step_{step}"
            verl.mkdir(parents=True, exist_ok=True)
            torch.save(sharded, verl / f"model_world_size_{world}_rank_{rank}.pt")
            dcp.save(sharded, checkpoint_id=str(out / "dcp" / f"step_{step}"))
            writer = HuggingFaceStorageWriter(path=str(out / "nemo" / f"step_{step}"), save_distributed=True)
            dcp.save(sharded, storage_writer=writer)
            del sharded
        del full
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
