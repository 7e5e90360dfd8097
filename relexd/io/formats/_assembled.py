"""A tensor file whose tensors exist only as pieces (rank shards, DCP chunks).

The engine reads a tensor as consecutive element ranges (``read_range``); assembling the whole
tensor for every range would be quadratic, so the last assembled tensor is kept until another one
is asked for. Peak memory is one tensor in its stored dtype plus the piece being placed — beside
the engine's float32 delta buffer, at most 1.5x the largest tensor in float32 for bf16 weights,
as for safetensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from relexd.io.reader import TensorMeta


class AssembledFile(ABC):
    """Tensors put together from pieces on demand; subclasses say where the pieces are."""

    path: Path
    thread_safe = False  # one assembled tensor is cached at a time

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[str, torch.Tensor] | None = None
        self._infos: dict[str, TensorMeta] = {}  # filled by the subclass, in storage order

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorMeta:
        return self._infos[name]

    @abstractmethod
    def assemble(self, name: str) -> torch.Tensor:
        """The whole tensor, contiguous, in its stored dtype and shape."""

    def _whole(self, name: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # free the previous tensor before building the next
            self._cached = (name, self.assemble(name))
        return self._cached[1]

    def read(self, name: str) -> torch.Tensor:
        tensor = self._whole(name)
        self._cached = None  # a whole read hands the tensor over
        return tensor

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._whole(name).reshape(-1)[start:stop].clone()

    def close(self) -> None:
        self._cached = None


def place(whole: torch.Tensor, piece: torch.Tensor, offsets: tuple[int, ...]) -> None:
    """Copy ``piece`` into ``whole`` at the global ``offsets`` of its first element."""
    region = whole
    for dim, (start, size) in enumerate(zip(offsets, piece.shape, strict=True)):
        region = region.narrow(dim, start, size)
    region.copy_(piece)
