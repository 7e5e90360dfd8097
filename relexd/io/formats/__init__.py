"""Native (non-Hugging Face) checkpoint formats, one module each, behind :class:`WeightReader`.

Each module states the facts about its trainer's writer that it relies on, with the file they
come from. :func:`detect` names the format of a directory; :func:`open_native` opens it. Adding the
next trainer is adding one module and one line to :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from relexd.io.formats.dcp import DcpCheckpoint, is_dcp, model_names
from relexd.io.formats.deepspeed import DeepSpeedCheckpoint, is_deepspeed
from relexd.io.formats.nemo_rl import NemoRlCheckpoint, is_nemo_rl
from relexd.io.formats.verl_fsdp import VerlFsdpCheckpoint, is_verl_fsdp
from relexd.io.names import strip_wrappers
from relexd.io.reader import TensorFile, WeightReader

#: name -> (is this directory in the format?, open it). First match wins.
FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], TensorFile]]] = {
    "verl_fsdp": (is_verl_fsdp, VerlFsdpCheckpoint),
    "dcp": (is_dcp, DcpCheckpoint),
    "deepspeed": (is_deepspeed, DeepSpeedCheckpoint),
    "nemo_rl": (is_nemo_rl, NemoRlCheckpoint),
}


def detect(directory: Path) -> str | None:
    """The native format of ``directory``, or None (HF weights, or nothing relexd reads)."""
    for name, (matches, _) in FORMATS.items():
        if matches(directory):
            return name
    return None


def open_native(directory: Path, fmt: str) -> WeightReader:
    """A reader over the native checkpoint in ``directory``, offering the model's tensors under
    their names without wrapper segments (the engine still matches them to the base's,
    :mod:`relexd.io.names`). Config and tokenizer come from ``huggingface/`` where verl puts them."""
    file = FORMATS[fmt][1](directory)
    stored = file.names()
    chosen = model_names(stored) if fmt == "dcp" else {n: n for n in stored}
    aux = directory / "huggingface"
    # keyed as one HF weights file: a native base's previews are written as model.safetensors
    reader = WeightReader(
        directory,
        fmt,
        {"model.safetensors": file},
        {"model.safetensors": list(chosen)},
        aux_dir=aux if aux.is_dir() else None,
    )
    return reader.renamed({n: strip_wrappers(chosen[n]) for n in chosen})
