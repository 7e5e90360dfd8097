"""NeMo-RL (DTensor v2 policy) weights: per-rank safetensors slices with their global offsets.

Facts relied on (torch 2.13 ``torch/distributed/checkpoint/hf_storage.py`` and ``_hf_utils.py``,
the ``HuggingFaceStorageWriter`` that NeMo Automodel saves with; NeMo-RL's
``step_N/policy/weights/model/`` layout):

* with ``save_distributed=True`` and no consolidation every rank writes
  ``shard-{rank:05d}-model-{i:05d}-of-{n:05d}.safetensors``, a real safetensors file holding that
  rank's local slices, and no index (``HuggingFaceStorageWriter.finish`` returns early);
* each file's ``__metadata__["DCP_SHARDING_INFO"]`` is JSON ``{fqn: {"saved_offsets": [...]}}``,
  the slice's offset in the global tensor; the global shape is the elementwise maximum of
  ``offset + local shape`` over all slices of a name.

Every shard file goes through the safetensors validation of DESIGN.md §5; slices are read with
plain ``pread`` and placed at their offsets, one tensor at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from relexd.errors import CheckpointError
from relexd.io.formats._assembled import AssembledFile, place
from relexd.io.reader import RANK_SHARD, TensorMeta
from relexd.io.safetensors_file import SafetensorsFile

SHARD = RANK_SHARD
SHARDING_KEY = "DCP_SHARDING_INFO"


def shard_files(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if SHARD.fullmatch(p.name))
    except OSError:
        return []


def is_nemo_rl(directory: Path) -> bool:
    return bool(shard_files(directory))


class NemoRlCheckpoint(AssembledFile):
    """The full tensors of one directory of DCP-sharded safetensors."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._files: list[SafetensorsFile] = []
        self._slices: dict[str, list[tuple[SafetensorsFile, tuple[int, ...]]]] = {}
        paths = shard_files(directory)
        numbers = sorted(int(SHARD.fullmatch(p.name).group(1)) for p in paths)  # type: ignore[union-attr]
        absent = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))
        if (
            absent
        ):  # ranks are numbered from 1 (HuggingFaceStorageWriter's shard_index); no index says how many
            raise CheckpointError(
                directory / paths[0].name.replace(f"shard-{numbers[0]:05d}", f"shard-{absent[0]:05d}"),
                "missing_shard",
                f"rank shard missing (have {numbers})",
            )
        try:
            for path in paths:
                file = SafetensorsFile(path)
                self._files.append(file)
                info = self._sharding(file)
                for name in file.names():
                    if name not in info:
                        raise CheckpointError(path, "corrupt_header", f"no {SHARDING_KEY} entry for {name!r}")
                    offsets = tuple(info[name].get("saved_offsets", ()))
                    if len(offsets) != len(file.info(name).shape):
                        raise CheckpointError(path, "corrupt_header", f"{name!r}: offsets {list(offsets)}")
                    self._slices.setdefault(name, []).append((file, offsets))
            self._infos = {name: self._describe(name) for name in self._slices}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _sharding(file: SafetensorsFile) -> dict[str, dict]:
        raw = (file.header.metadata or {}).get(SHARDING_KEY)
        try:
            info = json.loads(raw) if raw is not None else None
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise CheckpointError(file.path, "corrupt_header", f"__metadata__ has no JSON {SHARDING_KEY}")
        return info

    def _describe(self, name: str) -> TensorMeta:
        slices = self._slices[name]
        first = slices[0][0]
        dtypes = {f.info(name).dtype for f, _ in slices}
        if len(dtypes) != 1:
            raise CheckpointError(first.path, "corrupt_header", f"{name!r} has slices of dtypes {dtypes}")
        dims = len(first.info(name).shape)
        shape = tuple(max(off[d] + f.info(name).shape[d] for f, off in slices) for d in range(dims))
        covered = sum(math.prod(f.info(name).shape) for f, _ in slices)
        if covered != math.prod(shape):
            raise CheckpointError(
                first.path,
                "missing_shard",
                f"slices of {name!r} cover {covered} of {math.prod(shape)} elements",
            )
        return TensorMeta(dtypes.pop(), shape, first.path)

    def assemble(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        whole = torch.empty(info.shape, dtype=info.dtype)
        for file, offsets in self._slices[name]:
            place(whole, file.read(name), offsets)
        return whole

    def close(self) -> None:
        super().close()
        for file in self._files:
            file.close()
        self._files.clear()
