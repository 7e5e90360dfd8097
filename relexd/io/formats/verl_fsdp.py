"""verl's FSDP actor checkpoints: ``model_world_size_{W}_rank_{R}.pt``, one per rank.

Facts relied on (verl, ``verl/utils/checkpoint/fsdp_checkpoint_manager.py`` and
``verl/model_merger/fsdp_model_merger.py``, read in 2026):

* every rank ``torch.save``s its ``model.state_dict()`` to ``model_world_size_{W}_rank_{R}.pt`` in
  ``global_step_N/actor/``, beside ``fsdp_config.json`` (``{"FSDP_version": …, "world_size": W}``)
  and ``huggingface/`` (config and tokenizer only, unless ``hf_model`` is in ``save_contents``);
  ``latest_checkpointed_iteration.txt`` in the checkpoint root is advanced afterwards.
* the values are DTensors with a ``Shard(0)`` placement on a 1-D mesh (FSDP1 with
  ``SHARDED_STATE_DICT`` and FSDP2 alike), ``[Replicate(), Shard(0)]`` on a 2-D mesh under HSDP,
  and plain tensors when ``W == 1``. Shards follow ``torch.chunk``: uneven, and empty on the last
  ranks of a tensor with fewer rows than ranks. The full tensor is the concatenation of the shard
  group's local tensors along the shard dim, in mesh order; ``Replicate`` is a copy (the first
  replica group is read).
* fp32 unless the trainer changed ``mixed_precision``.

Loading: ``torch.load(weights_only=True, mmap=True)`` — DTensor and DeviceMesh are on torch's own
allow-list once ``torch.distributed.tensor`` is imported, and nothing else is unpickled. Mapping is
safe here although checkpoints are rotated: a rotation *unlinks* files, and mapped pages of an
unlinked file stay valid; only truncating a mapped file raises SIGBUS, and a trainer never rewrites
a saved rank file in place (each step has its own directory). Each file is checked zip-complete
before it is mapped. Mapped pages count towards RSS once touched, so the mappings are dropped and
re-made whenever the bytes read through them exceed a budget: peak RSS stays near one tensor.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.tensor  # puts DTensor on torch.load's weights_only allow-list

from relexd.errors import CheckpointError
from relexd.io.formats._assembled import AssembledFile
from relexd.io.reader import TensorMeta
from relexd.io.safetensors_file import os_error

RANK_FILE = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")
CONFIG = "fsdp_config.json"
#: Bytes read through the current mappings before they are dropped and re-made: at least this,
#: else the largest tensor's size (re-mapping costs one unpickling of each rank file's keys).
REMAP_MIN_BYTES = 16 << 20

# Unpickling a DeviceMesh outside a process group logs a torch.compile warning on every load.
logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)


def rank_files(directory: Path) -> dict[int, dict[int, Path]]:
    """World size -> rank -> file, from the names in ``directory``."""
    found: dict[int, dict[int, Path]] = {}
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return {}
    for name in names:
        match = RANK_FILE.fullmatch(name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = directory / name
    return found


def is_verl_fsdp(directory: Path) -> bool:
    return bool(rank_files(directory))


class VerlFsdpCheckpoint(AssembledFile):
    """The full tensors of one verl FSDP actor checkpoint, each put together from its rank shards."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        by_world = rank_files(directory)
        if len(by_world) != 1:
            sizes = sorted(by_world)
            raise CheckpointError(
                directory, "corrupt_header", f"rank files of different world sizes {sizes} in one checkpoint"
            )
        ((world, ranks),) = by_world.items()
        missing = sorted(set(range(world)) - set(ranks))
        if missing:
            raise CheckpointError(
                directory / f"model_world_size_{world}_rank_{missing[0]}.pt",
                "missing_shard",
                f"rank file missing ({len(ranks)} of {world} ranks present)",
            )
        self._check_config(directory / CONFIG, world)
        self.world = world
        self._files = [ranks[r] for r in range(world)]
        for file in self._files:
            try:
                complete = zipfile.is_zipfile(file)
            except OSError as exc:
                raise os_error(file, exc, "opening") from exc
            if not complete:
                raise CheckpointError(file, "truncated", "not a complete torch.save zip file")
        self._states: list[dict[str, Any]] | None = None
        self._read_since_map = 0
        states = self._map()
        self._names = list(states[0])
        for rank, state in enumerate(states[1:], start=1):
            if list(state) != self._names:
                odd = sorted(set(state) ^ set(self._names))[:3]
                raise CheckpointError(
                    self._files[rank], "corrupt_header", f"tensor names differ from rank 0: {odd}"
                )
        self._infos = {name: self._describe(name, states) for name in self._names}
        largest = max((math.prod(i.shape) * i.dtype.itemsize for i in self._infos.values()), default=0)
        self._remap_bytes = max(largest, REMAP_MIN_BYTES)

    @staticmethod
    def _check_config(path: Path, world: int) -> None:
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return  # older verl versions did not write it
        except (OSError, ValueError) as exc:
            raise CheckpointError(path, "corrupt_header", f"unreadable: {exc}") from exc
        stated = config.get("world_size") if isinstance(config, dict) else None
        if stated is not None and stated != world:
            raise CheckpointError(path, "corrupt_header", f"says world_size {stated}, rank files say {world}")

    def _map(self) -> list[dict[str, Any]]:
        if self._states is None:
            states = []
            for file in self._files:
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except OSError as exc:
                    raise os_error(file, exc, "loading") from exc
                except pickle.UnpicklingError as exc:
                    raise CheckpointError(file, "unsupported", f"refused pickle content: {exc}") from exc
                except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
                    raise CheckpointError(file, "corrupt_header", f"cannot load torch file: {exc}") from exc
                if not isinstance(state, dict):
                    raise CheckpointError(file, "unsupported", "not a state dict")
                states.append(state)
            self._states = states
            self._read_since_map = 0
        return self._states

    def _describe(self, name: str, states: list[dict[str, Any]]) -> TensorMeta:
        value = states[0][name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                self._files[0], "unsupported", f"{name!r} is a {type(value).__name__}, not a tensor"
            )
        return TensorMeta(value.dtype, tuple(value.shape), self._files[0])

    def assemble(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if self._read_since_map >= self._remap_bytes:
            self._states = None  # let the touched pages go
        states = self._map()
        value = states[0][name]
        placements = getattr(value, "placements", None)
        if placements is None:  # a plain tensor: W == 1 (or a buffer every rank holds whole)
            whole = value.clone(memory_format=torch.contiguous_format)
        else:
            whole = self._concat(name, value, states)
        if tuple(whole.shape) != info.shape:
            raise CheckpointError(
                self._files[0],
                "corrupt_header",
                f"{name!r}: shards make {list(whole.shape)}, not {list(info.shape)}",
            )
        self._read_since_map += math.prod(info.shape) * info.dtype.itemsize
        return whole

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements of the flattened tensor, straight from the ranks' mapped shards when they are
        consecutive in flat order (a plain tensor, or ``Shard(0)``: FSDP's placement) — no whole
        tensor is built; other placements go through :meth:`assemble`."""
        pieces = self._flat_pieces(name)
        if pieces is None:
            return super().read_range(name, start, stop)
        out = torch.empty(stop - start, dtype=self._infos[name].dtype)
        at = 0  # flat offset of the current piece
        for piece in pieces:
            lo, hi = max(start, at), min(stop, at + piece.numel())
            if lo < hi:
                out[lo - start : hi - start].copy_(piece[lo - at : hi - at])
            at += piece.numel()
        self._read_since_map += out.numel() * out.element_size()
        return out

    def _flat_pieces(self, name: str) -> list[torch.Tensor] | None:
        if self._read_since_map >= self._remap_bytes:
            self._states = None  # let the touched pages go
        states = self._map()
        value = states[0][name]
        placements = getattr(value, "placements", None)
        if placements is None:
            return [value.reshape(-1)]
        if [p.dim for p in placements if p.is_shard()] != [0] or not all(
            p.is_shard() or p.is_replicate() for p in placements
        ):
            return None
        pieces = [
            states[rank][name].to_local().reshape(-1) for rank in self._shard_group(name, value, states)
        ]
        if sum(p.numel() for p in pieces) != math.prod(self._infos[name].shape):
            raise CheckpointError(
                self._files[0], "corrupt_header", f"{name!r}: shards do not add up to its shape"
            )
        return pieces

    def _shard_group(self, name: str, value: Any, states: list[dict[str, Any]]) -> list[int]:
        """Ranks holding the shards of the first replica group (index 0 on every other mesh dim,
        all positions on the shard dim), in mesh order."""
        mesh = value.device_mesh.mesh
        mesh_dim = next(i for i, p in enumerate(value.placements) if p.is_shard())
        group = mesh.movedim(mesh_dim, -1).reshape(-1, mesh.shape[mesh_dim])[0].tolist()
        if max(group) >= len(states):
            raise CheckpointError(
                self._files[0],
                "missing_shard",
                f"{name!r}: the mesh names rank {max(group)} of {len(states)}",
            )
        return group

    def _concat(self, name: str, value: Any, states: list[dict[str, Any]]) -> torch.Tensor:
        shard_dims = [i for i, p in enumerate(value.placements) if p.is_shard()]
        if any(not (p.is_shard() or p.is_replicate()) for p in value.placements) or len(shard_dims) > 1:
            raise CheckpointError(self._files[0], "unsupported", f"{name!r}: placements {value.placements}")
        if not shard_dims:
            return value.to_local().clone(memory_format=torch.contiguous_format)
        tensor_dim = value.placements[shard_dims[0]].dim
        pieces = [states[rank][name].to_local() for rank in self._shard_group(name, value, states)]
        return torch.cat(pieces, dim=tensor_dim)
