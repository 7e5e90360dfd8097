"""The base model θ₀: which tensors are tracked, which are tied, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relexd.io.reader import WeightReader, open_weights
from relexd.io.safetensors_file import dtype_code

#: Elements hashed per tensor for the fingerprint's content sample: enough to tell two models of the
#: same architecture apart, cheap enough to compute on every start.
SAMPLE_ELEMS = 4096

#: Names of output and input embeddings of common architectures, for ``tie_word_embeddings``.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


@dataclass
class BaseModel:
    """θ₀, read lazily. ``tracked`` are the floating-point tensors whose trajectory is modelled;
    ``aliases`` maps a tied tensor to the one it is tied to (predicted once, written identically);
    ``frozen`` are non-float tensors (buffers), copied unchanged into previews."""

    path: Path
    reader: WeightReader
    tracked: list[str]
    aliases: dict[str, str]
    frozen: list[str]

    @classmethod
    def load(cls, path: Path) -> BaseModel:
        reader = open_weights(path)
        floats = [n for n in reader.names() if reader.info(n).dtype.is_floating_point]
        frozen = [n for n in reader.names() if not reader.info(n).dtype.is_floating_point]
        aliases = _tied_embeddings(reader, _config_dir(path))
        tracked = [n for n in floats if n not in aliases]
        return cls(Path(path), reader, tracked, aliases, frozen)

    @property
    def names(self) -> set[str]:
        """Every tensor name a checkpoint of this model has (tied copies included)."""
        return set(self.tracked) | set(self.frozen) | set(self.aliases)

    def fingerprint(self) -> dict[str, Any]:
        """Names, shapes, dtypes and a content sample: a state built on another base is refused."""
        digest = hashlib.sha256()
        tensors = {}
        for name in self.reader.names():
            info = self.reader.info(name)
            tensors[name] = [dtype_code(info.dtype), list(info.shape)]
            sample = self.reader.read_range(name, 0, min(info.numel, SAMPLE_ELEMS))
            digest.update(name.encode())
            digest.update(_raw_bytes(sample))
        return {"tensors": tensors, "sample_sha256": digest.hexdigest(), "aliases": self.aliases}

    def close(self) -> None:
        self.reader.close()


def _config_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _tied_embeddings(reader: WeightReader, config_dir: Path) -> dict[str, str]:
    """lm_head ↔ input embedding when the config says they are tied and the base agrees.

    Usually a tied lm_head is simply not saved (then there is nothing to alias); when both are
    present (e.g. ``.bin`` state dicts) the output one rides along with the input one.
    """
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not config.get("tie_word_embeddings", False):
        return {}
    names = reader.names()
    inputs = [n for n in names if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
    aliases = {}
    for out in OUTPUT_EMBEDDINGS:
        if out in names and len(inputs) == 1:
            src = inputs[0]
            if reader.info(out).shape == reader.info(src).shape and torch.equal(
                reader.read(out), reader.read(src)
            ):
                aliases[out] = src
    return aliases


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()
