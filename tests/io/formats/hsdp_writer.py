"""FSDP2 with a 2-D mesh (HSDP: replicate × shard) on four gloo ranks, saved as verl saves.

``torchrun --nproc_per_node 4 hsdp_writer.py OUT`` writes ``OUT/actor/model_world_size_4_rank_R.pt``
(DTensors placed ``[Replicate(), Shard(0)]``) and ``OUT/reference.safetensors`` (the same weights
gathered), after one optimizer step so that the shards hold trained values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Linear(9, 3))
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 6, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    optim.step()
    state = model.state_dict()
    (out / "actor").mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "actor" / f"model_world_size_{world}_rank_{rank}.pt")
    full = {k: v.full_tensor().detach().clone() for k, v in state.items()}
    if rank == 0:
        save_file(full, str(out / "reference.safetensors"))
        print({k: str(v.placements) for k, v in state.items()})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
