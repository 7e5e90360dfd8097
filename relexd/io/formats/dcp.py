"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``__{rank}_{i}.distcp``.

Written by torchtitan, prime-rl's checkpoints and accelerate's FSDP ``SHARDED_STATE_DICT``.
Facts relied on (torch 2.13, ``torch/distributed/checkpoint/``):

* ``.metadata`` is a plain pickle of ``metadata.Metadata`` (``FileSystemReader.read_metadata``
  calls ``pickle.load``), written to ``.metadata.tmp`` and renamed last (``FileSystemWriter``): its
  existence is the completion marker. relexd unpickles it with an allow-list of DCP's own
  dataclasses, never with plain ``pickle``.
* ``Metadata.state_dict_metadata[fqn]`` is a ``TensorStorageMetadata`` (dtype in ``properties``,
  global ``size``, ``chunks`` of ``ChunkStorageMetadata(offsets, sizes)``) or a
  ``BytesStorageMetadata`` (a non-tensor value such as a step counter: skipped).
* ``Metadata.storage_data[MetadataIndex(fqn, offsets)]`` is a ``_StorageInfo(relative_path,
  offset, length, transform_descriptors)``; with the default ``SerializationFormat.TORCH_SAVE``
  each chunk is one ``torch.save`` of the chunk tensor at that offset (``filesystem._write_item``),
  loaded here with ``weights_only=True``. Chunks with transform descriptors (compression
  extensions) are refused as unsupported.

Each tensor is assembled from its chunks at their global offsets when it is read — one tensor at a
time, never the whole checkpoint (unlike ``dcp_to_torch_save``).
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from relexd.errors import CheckpointError
from relexd.io.formats._assembled import AssembledFile, place
from relexd.io.formats._unpickle import Refused, loads
from relexd.io.reader import TensorMeta
from relexd.io.safetensors_file import os_error

METADATA = ".metadata"
_MD = "torch.distributed.checkpoint.metadata"
#: Everything a DCP ``.metadata`` pickle names (measured on torch 2.13 saves), nothing that runs code.
ALLOWED = {
    (_MD, n)
    for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
} | {("torch", str(d).removeprefix("torch.")) for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)}  # fmt: skip


def is_dcp(directory: Path) -> bool:
    try:
        return (directory / METADATA).is_file() and any(n.endswith(".distcp") for n in os.listdir(directory))
    except OSError:
        return False


class DcpCheckpoint(AssembledFile):
    """The tensors of one DCP directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        md_path = directory / METADATA
        try:
            raw = md_path.read_bytes()
        except OSError as exc:
            raise os_error(md_path, exc, "reading the DCP metadata") from exc
        try:
            metadata = loads(raw, ALLOWED)
        except Refused as exc:
            raise CheckpointError(md_path, "unsupported", f"DCP metadata refused: {exc}") from exc
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(md_path, "corrupt_header", f"unreadable DCP metadata: {exc}") from exc
        try:
            entries = metadata.state_dict_metadata
            storage = metadata.storage_data
        except AttributeError as exc:
            raise CheckpointError(md_path, "corrupt_header", "not a DCP Metadata object") from exc
        self._meta: dict[str, Any] = {k: v for k, v in entries.items() if hasattr(v, "chunks")}
        self._pieces: dict[str, list[tuple[Any, Any]]] = {}
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        located = {
            (getattr(i, "fqn", None), tuple(getattr(i, "offset", None) or ())): w for i, w in storage.items()
        }
        try:
            for fqn, tmd in self._meta.items():
                pieces = []
                covered = sum(math.prod(c.sizes) for c in tmd.chunks)
                if covered != math.prod(tmd.size):
                    raise CheckpointError(
                        md_path,
                        "missing_shard",
                        f"chunks of {fqn!r} cover {covered} of {math.prod(tmd.size)} elements",
                    )
                for chunk in tmd.chunks:
                    where = located.get((fqn, tuple(chunk.offsets)))
                    if where is None:
                        raise CheckpointError(md_path, "corrupt_header", f"no storage for a chunk of {fqn!r}")
                    if getattr(where, "transform_descriptors", None):
                        raise CheckpointError(
                            md_path,
                            "unsupported",
                            f"{fqn!r} is stored with transforms {where.transform_descriptors}",
                        )
                    self._check_extent(where)
                    pieces.append((chunk, where))
                self._pieces[fqn] = pieces
                first = pieces[0][1].relative_path if pieces else METADATA
                self._infos[fqn] = TensorMeta(tmd.properties.dtype, tuple(tmd.size), self.path / str(first))
        except BaseException:
            self.close()
            raise

    def _check_extent(self, where: Any) -> None:
        rel = str(where.relative_path)
        file = self.path / rel
        if rel not in self._fds:
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise CheckpointError(self.path / METADATA, "corrupt_header", f"storage outside: {rel!r}")
            try:
                self._fds[rel] = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise CheckpointError(
                    file, "missing_shard", "a .distcp file named by .metadata is missing"
                ) from exc
            except OSError as exc:
                raise os_error(file, exc, "opening") from exc
            self._sizes[rel] = os.fstat(self._fds[rel]).st_size
        if where.offset + where.length > self._sizes[rel]:
            raise CheckpointError(
                file, "truncated", f"{self._sizes[rel]} bytes, .metadata needs {where.offset + where.length}"
            )

    def assemble(self, name: str) -> torch.Tensor:
        tmd = self._meta[name]
        whole = torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)
        for chunk, where in self._pieces[name]:
            rel = str(where.relative_path)
            file = self.path / rel
            try:
                data = os.pread(self._fds[rel], where.length, where.offset)
            except OSError as exc:
                raise os_error(file, exc, "reading") from exc
            if len(data) != where.length:
                raise CheckpointError(file, "truncated", f"short read of {name!r}")
            try:
                piece = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    file, "unsupported", f"{name!r}: refused pickle content: {exc}"
                ) from exc
            except (RuntimeError, EOFError, ValueError) as exc:
                raise CheckpointError(file, "corrupt_header", f"{name!r}: unreadable chunk: {exc}") from exc
            if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != tuple(chunk.sizes):
                raise CheckpointError(
                    file, "corrupt_header", f"{name!r}: chunk is not a tensor of {list(chunk.sizes)}"
                )
            place(whole, piece, tuple(chunk.offsets))
        return whole

    def close(self) -> None:
        super().close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


#: Top-level keys of a DCP state dict that hold no model weights.
NON_MODEL_CONTAINERS = ("optimizer.", "optim.", "lr_scheduler.", "scheduler.", "dataloader.", "train_state.")


def model_names(names: list[str]) -> dict[str, str]:
    """Stored fqn -> model tensor name: the model's container of a DCP state dict, unwrapped.

    Trainers save ``{"model": ..., "optimizer": ...}`` (torchtitan, prime-rl) or an
    ``app``-keyed Stateful (``app.model.…``, the DCP tutorial's ``AppState``); a bare
    ``model.state_dict()`` has HF names already (``model.layers.…``, ``lm_head.weight``).
    """
    if any(n.startswith("app.model.") for n in names):
        return {n: n[len("app.model.") :] for n in names if n.startswith("app.model.")}
    others = [n for n in names if not n.startswith("model.")]
    if others and all(n.startswith(NON_MODEL_CONTAINERS) for n in others):
        return {n: n[len("model.") :] for n in names if n.startswith("model.")}
    if names and all(n.startswith("model.model.") for n in names):  # {"model": hf_state_dict}, tied
        return {n: n[len("model.") :] for n in names}
    return {n: n for n in names}
