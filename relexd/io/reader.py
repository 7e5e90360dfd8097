"""Lazy, validated access to the weights of one checkpoint (or of the base model).

:func:`open_weights` finds the weights in what a trainer wrote (single or sharded safetensors, or a
legacy ``pytorch_model.bin``), validates every file up front and returns a :class:`WeightReader`
that reads one tensor, or one element range, at a time. Opening is the completeness check of
layouts without a marker, so it refuses anything not fully written with a
:class:`~relexd.errors.CheckpointError` that names the file.

``.bin`` files are loaded with ``torch.load(weights_only=True, mmap=True)``: arbitrary pickles are
never executed, and tensors stay on disk until read. torch offers no plain-read lazy path for
them, so unlike safetensors they are memory-mapped; they are the legacy format.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from relexd._closeable import Closeable
from relexd.errors import CheckpointError
from relexd.io.safetensors_file import SafetensorsFile, os_error

#: A PEFT adapter checkpoint (TRL + peft): ``adapter_model.safetensors`` + ``adapter_config.json``.
#: Its trajectory is followed in adapter space: the adapter tensors are the weights.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Weight files of an adapter (PEFT/LoRA), not of the full model: never taken as weights.
ADAPTER_NAMES = frozenset({"adapter_model.safetensors", "adapter_model.bin"})
#: One rank's slices written by torch's HuggingFaceStorageWriter (NeMo-RL): relexd.io.formats.nemo_rl.
RANK_SHARD = re.compile(r"shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors")


def is_temp_name(name: str) -> bool:
    """Names that writers use for files not yet complete (renamed into place when done)."""
    return (
        name.startswith(".")
        or ".tmp" in name
        or name.startswith(("tmp-checkpoint-", "tmp_step_"))
        # verl's Megatron backend (mbridge) stages these in actor/huggingface/ while it saves
        or name.startswith(("mcore_batch_", "hf_batch_"))
    )


def find_weights_file(directory: Path) -> Path | None:
    """The file that describes the weights in ``directory``, in transformers' order of preference,
    else the only ``*.safetensors`` file; None when there is none (or several without an index)."""
    for name in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX):
        if (directory / name).is_file():
            return directory / name
    candidates = [
        entry
        for entry in directory.iterdir()
        if entry.suffix == ".safetensors"
        and not is_temp_name(entry.name)
        and entry.name not in ADAPTER_NAMES
        and not RANK_SHARD.fullmatch(entry.name)  # one rank's slices, not the weights
        and entry.is_file()
    ]
    return candidates[0] if len(candidates) == 1 else None


@dataclass(frozen=True)
class WeightInfo:
    """Name, dtype, shape and file of one weight tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorMeta(NamedTuple):
    """What a tensor file says of one tensor before it is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path  # the file an error about this tensor names (a rank file, a shard)


class TensorFile(Protocol):
    """One source of tensors inside a checkpoint: a safetensors file, a torch.save state dict, or
    a format module's assembly of shards (:mod:`relexd.io.formats`). Reads return new tensors the
    caller owns; nothing is held between reads beyond what the format needs to find its bytes."""

    path: Path
    #: whether reads may run from several threads at once (positional reads, no shared cursor or
    #: cache); files without the attribute are read by one thread at a time
    thread_safe: bool

    def names(self) -> list[str]: ...
    def info(self, name: str) -> Any: ...  # has .dtype and .shape (and, optionally, .file)
    def read(self, name: str) -> torch.Tensor: ...
    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor: ...
    def close(self) -> None: ...


class TensorDict:
    """Tensors of a loaded (memory-mapped) state dict: copies are handed out, never the mapping."""

    path: Path
    tensors: dict[str, torch.Tensor]
    thread_safe = True  # copies out of loaded tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorMeta:
        tensor = self.tensors[name]
        return TensorMeta(tensor.dtype, tuple(tensor.shape), self.path)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone(memory_format=torch.contiguous_format)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name].reshape(-1)[start:stop].clone()

    def close(self) -> None:
        self.tensors = {}


class _BinFile(TensorDict):
    """One zip-format torch.save state dict, memory-mapped, loaded without unpickling objects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if not zipfile.is_zipfile(path):
                raise CheckpointError(
                    path,
                    "unsupported",
                    "not a zip-format torch.save file (legacy format or truncated): it cannot be "
                    "memory-mapped; re-save it with a current torch or convert it to safetensors",
                )
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except OSError as exc:
            raise os_error(path, exc, "loading") from exc
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                path,
                "unsupported",
                f"pickle holds objects other than tensors, refused without running it: {exc}",
            ) from exc
        except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise CheckpointError(path, "corrupt_header", f"cannot load torch file: {exc}") from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(
                path, "unsupported", "not a flat dict of tensor names to tensors (a state dict)"
            )
        self.tensors: dict[str, torch.Tensor] = state


class WeightReader(Closeable):
    """The weights of one checkpoint, tensor by tensor; every file was validated on open.

    ``names()`` is stable: files in sorted order, tensors within a file in storage order.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        files: Mapping[str, TensorFile],
        shards: dict[str, list[str]],
        *,
        aux_dir: Path | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        """``names`` maps the names stored in ``files`` to the names this reader offers (wrapper
        prefixes of native checkpoints stripped); ``aux_dir`` holds the config and tokenizer files
        (default: ``path`` when it is a directory)."""
        self.path = path
        self.format = fmt
        self.aux_dir = aux_dir if aux_dir is not None else (path if path.is_dir() else None)
        self._files = dict(files)
        rename = dict(names or {})
        self._stored: dict[str, str] = {}  # offered name -> stored name
        self._shards: dict[str, list[str]] = {}
        self._infos: dict[str, WeightInfo] = {}
        self._file_of: dict[str, TensorFile] = {}
        for rel, stored_names in shards.items():
            offered = []
            for stored in stored_names:
                name = rename.get(stored, stored)
                info = files[rel].info(stored)
                file = getattr(info, "file", None) or files[rel].path
                self._infos[name] = WeightInfo(name, info.dtype, tuple(info.shape), Path(file))
                self._stored[name] = stored
                self._file_of[name] = files[rel]
                offered.append(name)
            self._shards[rel] = offered

    def renamed(self, names: Mapping[str, str]) -> WeightReader:
        """The same files offering other names (``current name -> new name``); names not in the
        mapping are dropped. The files are shared: closing either reader closes them."""
        shards = {
            rel: [self._stored[n] for n in offered if n in names] for rel, offered in self._shards.items()
        }
        stored_to_new = {self._stored[old]: new for old, new in names.items()}
        return WeightReader(
            self.path,
            self.format,
            self._files,
            {rel: ns for rel, ns in shards.items() if ns},
            aux_dir=self.aux_dir,
            names=stored_to_new,
        )

    @property
    def concurrent_reads(self) -> bool:
        """Whether tensors may be read from several threads at once (else: one at a time)."""
        return all(getattr(f, "thread_safe", False) for f in self._files.values())

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> WeightInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, owned by the caller, in its stored dtype and shape."""
        self.info(name)
        return self._file_of[name].read(self._stored[name])

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, 1-D, in the stored dtype.

        ``out``: a byte buffer to read into where the file supports it (safetensors); the result
        may then be a view of it, valid until the buffer is reused."""
        numel = self.info(name).numel
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"range [{start}, {stop}) is outside {name!r} of {numel} elements")
        file = self._file_of[name]
        if out is not None and isinstance(file, SafetensorsFile):
            return file.read_range(self._stored[name], start, stop, out)
        return file.read_range(self._stored[name], start, stop)

    def shard_files(self) -> dict[str, list[str]]:
        """Weights file name (relative to the directory) -> its tensor names, so that a writer
        can mirror the source's shard layout."""
        return {rel: list(names) for rel, names in self._shards.items()}

    def total_bytes(self) -> int:
        """Bytes of tensor data (numel × itemsize over every tensor)."""
        return sum(info.numel * info.dtype.itemsize for info in self._infos.values())

    def close(self) -> None:
        for file in self._files.values():
            file.close()


def _open_file(path: Path) -> SafetensorsFile | _BinFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _BinFile(path)


def _file_names(file: SafetensorsFile | _BinFile) -> list[str]:
    return file.names()


def _read_index(index: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names (index order) from a ``*.index.json``, shards sorted by name."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except OSError as exc:
        raise os_error(index, exc, "reading the index") from exc
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise CheckpointError(index, "corrupt_header", f"index is not a JSON object: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(index, "corrupt_header", "index has no weight_map of strings")
    shards: dict[str, list[str]] = {}
    for name, rel in weight_map.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(index, "corrupt_header", f"index names a shard outside: {rel!r}")
        shards.setdefault(rel, []).append(name)
    return dict(sorted(shards.items()))


def _open_sharded(index: Path, fmt: str, root: Path) -> WeightReader:
    directory = index.parent
    by_index = _read_index(index)
    files: dict[str, SafetensorsFile | _BinFile] = {}
    shards: dict[str, list[str]] = {}
    try:
        for rel, indexed in by_index.items():
            shard = directory / rel
            if not shard.is_file():
                raise CheckpointError(shard, "missing_shard", f"shard named by {index.name} does not exist")
            files[rel] = _open_file(shard)
            stored = _file_names(files[rel])
            absent = sorted(set(indexed) - set(stored))
            if absent:
                raise CheckpointError(
                    shard, "corrupt_header", f"{index.name} puts tensors {absent[:5]} here, absent"
                )
            wanted = set(indexed)  # the index is authoritative: stray extra tensors are ignored
            shards[rel] = [name for name in stored if name in wanted]
    except BaseException:
        for file in files.values():
            file.close()
        raise
    return WeightReader(root, fmt, files, shards)


def _single_file(path: Path) -> tuple[dict[str, TensorFile], dict[str, list[str]]]:
    file = _open_file(path)
    return {path.name: file}, {path.name: _file_names(file)}


def _open_single(path: Path, root: Path) -> WeightReader:
    fmt = "safetensors" if path.suffix == ".safetensors" else "bin"
    return WeightReader(root, fmt, *_single_file(path))


def open_weights(path: Path) -> WeightReader:
    """Open the weights at ``path``: a checkpoint directory, a ``*.safetensors``/``*.bin`` file or
    an ``*.index.json``. Every file is validated now; a vanished path is trainer rotation."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "rotated", "does not exist (rotated away?)")
    if path.is_dir():
        try:
            found = find_weights_file(path)
        except OSError as exc:
            raise os_error(path, exc, "listing") from exc
        if found is None and (path / ADAPTER_WEIGHTS).is_file():
            return WeightReader(path, "peft", *_single_file(path / ADAPTER_WEIGHTS))
        if found is None:
            from relexd.io.formats import detect, open_native  # the formats build on this module

            native = detect(path)
            if native is not None:
                return open_native(path, native)
            raise CheckpointError(
                path,
                "missing_shard",
                f"no weights file ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, {BIN_INDEX} or a "
                f"single *.safetensors; no verl FSDP rank files or torch DCP checkpoint either) in {path}",
            )
        root = path
    else:
        found, root = path, path
    if found.name.endswith(".index.json"):
        fmt = "bin" if found.name.endswith(".bin.index.json") else "safetensors"
        return _open_sharded(found, fmt, root)
    if found.suffix in (".safetensors", ".bin"):
        return _open_single(found, root)
    raise CheckpointError(path, "unsupported", "not a .safetensors, .bin or .index.json file")
