"""Save rank files as verl's FSDP checkpoint manager does, for a big model, without training.

``torchrun --nproc_per_node 2 dtensor_writer.py OUT`` writes ``OUT/base`` (HF safetensors of θ₀,
rank 0) and ``OUT/ckpt{1,2}/model_world_size_2_rank_R.pt``: each rank ``torch.save``s a state
dict of DTensors distributed with ``Shard(0)``, the placement of ``model.state_dict()`` under
FSDP2 — what verl writes. Tensors are made and saved one at a time on each rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from relexd.io.safetensors_file import StreamingSafetensorsWriter
from tests.engine.test_memory import LARGEST, OTHER, OTHERS

NAMES = {"big.weight": LARGEST} | {f"layer{i}.weight": OTHER for i in range(OTHERS)}


def tensor(i: int, numel: int, scale: float) -> torch.Tensor:
    base = torch.randn(numel, generator=torch.Generator().manual_seed(i))
    return (base * (1.0 + scale)).to(torch.bfloat16).reshape(numel // 100, 100)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    if rank == 0:
        (out / "base").mkdir(parents=True)
        specs = {n: (torch.bfloat16, (numel // 100, 100)) for n, numel in NAMES.items()}
        with StreamingSafetensorsWriter(out / "base" / "model.safetensors", specs, {"format": "pt"}) as w:
            for i, (name, numel) in enumerate(NAMES.items()):
                w.append(name, tensor(i, numel, 0.0))
    for step in (1, 2):
        state = {
            name: distribute_tensor(tensor(i, numel, 0.01 * step), mesh, [Shard(0)])
            for i, (name, numel) in enumerate(NAMES.items())
        }
        actor = out / f"ckpt{step}"
        actor.mkdir(parents=True, exist_ok=True)
        torch.save(state, actor / f"model_world_size_{world}_rank_{rank}.pt")
        del state
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
