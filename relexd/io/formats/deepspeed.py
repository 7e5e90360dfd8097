"""DeepSpeed ZeRO-1/2 checkpoints (OpenRLHF, TRL/accelerate with DeepSpeed): the ``"module"`` of
``global_stepN/mp_rank_00_model_states.pt``.

Facts relied on (DeepSpeed, ``deepspeed/runtime/engine.py``: ``_save_checkpoint`` and
``_get_ckpt_name``; ``deepspeed/utils/zero_to_fp32.py``; read in 2026):

* the engine ``torch.save``s one dict per model-parallel rank to
  ``<save_dir>/<tag>/mp_rank_{mp:02d}_model_states.pt``; its ``"module"`` is the module's full
  state dict (bf16/fp16 under ZeRO-1/2: parameters are not partitioned), beside entries relexd
  does not need and whose classes it never imports (``optimizer``, ``lr_scheduler``,
  ``param_shapes``, ``ds_config``, ``ds_version``, …). The tag defaults to ``global_step{N}``;
  ``<save_dir>/latest`` names the newest tag and is written before the final barrier.
* under ZeRO-3 parameters are partitioned into ``zero_pp_rank_*_mp_rank_00_optim_states.pt`` and
  ``"module"`` holds only placeholders unless ``stage3_gather_16bit_weights_on_model_save`` is set:
  refused with that advice.

The pickle is loaded by torch's zip reader (memory-mapped, tensors only paged in when read) with
a restricted unpickler: tensor and storage rebuild functions are resolved, every other class is
replaced by an inert stub, so nothing in the file can run code.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from relexd.errors import CheckpointError
from relexd.io.formats._unpickle import restricted_unpickler
from relexd.io.reader import TensorDict
from relexd.io.safetensors_file import os_error

MODEL_STATES = "mp_rank_00_model_states.pt"

_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
)  # fmt: skip
#: What a torch.save state dict needs (tensor rebuild, storages by dtype) and nothing else.
ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("torch.storage", "UntypedStorage"),
    ("torch", "UntypedStorage"),
    *(("torch", d) for d in _DTYPES),
    *(("torch", n) for n in (
        "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
        "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
    )),
}  # fmt: skip

#: A module with the pickle API torch.load calls (``Unpickler``, ``load``), restricted.
restricted_pickle = types.ModuleType("relexd_restricted_pickle")
restricted_pickle.Unpickler = restricted_unpickler(ALLOWED, stub=True)  # type: ignore[attr-defined]
restricted_pickle.load = lambda f, **kw: restricted_pickle.Unpickler(f, **kw).load()  # type: ignore[attr-defined]
restricted_pickle.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})


def is_deepspeed(directory: Path) -> bool:
    return (directory / MODEL_STATES).is_file()


class DeepSpeedCheckpoint(TensorDict):
    """The ``"module"`` tensors of one DeepSpeed tag directory."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / MODEL_STATES
        try:
            complete = zipfile.is_zipfile(self.path)
        except OSError as exc:
            raise os_error(self.path, exc, "opening") from exc
        if not complete:
            raise CheckpointError(self.path, "truncated", "not a complete torch.save zip file")
        try:
            state = torch.load(
                self.path, map_location="cpu", weights_only=False, mmap=True, pickle_module=restricted_pickle
            )
        except OSError as exc:
            raise os_error(self.path, exc, "loading") from exc
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise CheckpointError(self.path, "corrupt_header", f"cannot load: {exc}") from exc
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict | OrderedDict) or not module:
            raise CheckpointError(
                self.path, "unsupported", 'no "module" state dict in DeepSpeed model states'
            )
        tensors = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
        if not tensors or all(v.numel() == 0 for v in tensors.values()):
            partitioned = _zero_stage(state) == 3 or any(directory.glob("zero_pp_rank_*"))
            raise CheckpointError(
                self.path,
                "unsupported",
                "ZeRO-3 partitions the weights: enable stage3_gather_16bit_weights_on_model_save "
                "(or save HF weights) so that model_states holds the full module"
                if partitioned
                else '"module" holds no weights',
            )
        self.tensors = tensors


def _zero_stage(state: dict[str, Any]) -> int | None:
    config = state.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) else None
