"""Write a preview checkpoint θ̂_τ = θ₀ + (α + β·τ)·v as a Hugging Face-loadable directory.

The preview mirrors the newest checkpoint's shard layout (same file names for safetensors; ``.bin``
shards become ``model-…safetensors``), writes an index whenever the weights are not one
``model.safetensors`` (transformers finds nothing else without one), copies the loader's
non-weight files (config, tokenizer) and a ``relexd-preview.json`` manifest. It is built in a hidden
staging directory beside its final path and published by an atomic rename, so a reader never sees a
half-written preview. Tensors are computed and written chunk by chunk (like mergekit's shard writer,
but without holding a shard in memory).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from relexd import __version__
from relexd.engine.base import BaseModel
from relexd.engine.ingest import CHUNK_ELEMS, Interrupted, spans
from relexd.io.atomic import publish_dir, remove_tree
from relexd.io.safetensors_file import DTYPES, StreamingSafetensorsWriter
from relexd.state.store import SketchFile, Snapshot

if TYPE_CHECKING:
    from relexd.engine.backend import TensorBackend

MANIFEST = "relexd-preview.json"


def preview_name(target: int) -> str:
    return f"step-{target}"


def output_file_name(source_name: str) -> str:
    """Source weight file name → preview file name (always safetensors)."""
    if source_name.endswith(".safetensors"):
        keep = source_name.startswith("model") or source_name == "adapter_model.safetensors"
        return source_name if keep else "model.safetensors"
    if source_name == "pytorch_model.bin":
        return "model.safetensors"
    if source_name.startswith("pytorch_model-") and source_name.endswith(".bin"):
        return "model-" + source_name[len("pytorch_model-") : -len(".bin")] + ".safetensors"
    return Path(source_name).stem + ".safetensors"


def predicted_coefficient(snapshot: Snapshot, name: str, target: int) -> float:
    rec = snapshot.meta["per_tensor"][name]
    return 0.0 if rec["rank"] == 0 else rec["alpha"] + rec["beta"] * target


def write_preview(
    snapshot: Snapshot,
    base: BaseModel,
    target: int,
    out_dir: Path,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    backend: TensorBackend | None = None,
) -> Path:
    """Compute and publish the preview for step ``target`` at ``out_dir/step-<target>``.

    ``should_stop`` is polled before each tensor; when it says stop, the staging directory is
    removed and :class:`Interrupted` raised — nothing is published, the previous preview stays.
    ``backend`` writes the shard files (cluster workers write their share into the staging
    directory); the index, the loader's files, the manifest and the publishing stay here.
    """
    meta = snapshot.meta
    if not meta.get("steps"):
        raise ValueError("no checkpoint observed yet: nothing to extrapolate from")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / preview_name(target)
    # unique per try: a cluster worker of an abandoned try can never write into a later one
    staging = out_dir / f".tmp-{preview_name(target)}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        files = meta["layout"]["files"]
        write = write_preview_files if backend is None else backend.write_preview_files
        weight_map, total = write(snapshot, base, target, staging, files, should_stop)
        # a single model.safetensors or adapter needs no index; shard files (even one) do
        if set(weight_map.values()) - {"model.safetensors", "adapter_model.safetensors"}:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, digest in meta.get("aux", {}).items():
            shutil.copyfile(snapshot.aux_path(digest), staging / fname)
        (staging / MANIFEST).write_text(json.dumps(manifest(snapshot, target), indent=2) + "\n")
        publish_dir(staging, final)
    except BaseException:
        remove_tree(staging)
        raise
    return final


def write_preview_files(
    snapshot: Snapshot,
    base: BaseModel,
    target: int,
    staging: Path,
    files: Mapping[str, Sequence[str]],
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[dict[str, str], int]:
    """Write the shard ``files`` (source file name → its tensors) of the preview for ``target``
    into ``staging``, each fsync'd; returns (tensor → output file, bytes written)."""
    meta = snapshot.meta
    weight_map: dict[str, str] = {}
    total = 0
    sketch = snapshot.sketch()
    try:
        for source_name, names in files.items():
            out_name = output_file_name(source_name)
            specs = tensor_specs(meta, names)
            with StreamingSafetensorsWriter(staging / out_name, specs, {"format": "pt"}) as writer:
                for name in names:
                    if should_stop():
                        raise Interrupted(f"stopped before tensor {name!r} of the preview for step {target}")
                    dtype, _shape = specs[name]
                    _write_tensor(writer, name, dtype, snapshot, sketch, base, target)
                    weight_map[name] = out_name
                    total += _nbytes(specs[name])
    finally:
        if sketch is not None:
            sketch.close()
    return weight_map, total


def tensor_specs(
    meta: dict[str, Any], names: Sequence[str]
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of the newest checkpoint's tensors ``names``, as the preview writes them."""
    return {n: (DTYPES[meta["tensors"][n]["dtype"]], tuple(meta["tensors"][n]["shape"])) for n in names}


def shard_bytes(meta: dict[str, Any], names: Sequence[str]) -> int:
    """Bytes of a preview shard holding the tensors ``names``."""
    return sum(_nbytes(spec) for spec in tensor_specs(meta, names).values())


def _nbytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    dtype, shape = spec
    return math.prod(shape) * dtype.itemsize


def _write_tensor(
    writer: StreamingSafetensorsWriter,
    name: str,
    dtype: torch.dtype,
    snapshot: Snapshot,
    sketch: SketchFile | None,
    base: BaseModel,
    target: int,
) -> None:
    source = base.aliases.get(name, name)  # tied tensors: predicted once, written identically
    numel = base.reader.info(source).numel
    tracked = source in snapshot.meta["per_tensor"]
    coef = predicted_coefficient(snapshot, source, target) if tracked else 0.0
    for i, j in spans(numel, CHUNK_ELEMS):
        theta0 = base.reader.read_range(source, i, j)
        if coef == 0.0 or sketch is None:
            # frozen or non-float tensors: θ₀ exactly, converted only if the checkpoint's dtype differs
            writer.append(name, theta0.to(dtype))
            continue
        v = sketch.columns(source, i, j, count=1)[0]  # only the direction: one vector read
        pred = torch.add(theta0.to(torch.float32), v, alpha=coef)
        writer.append(name, pred.to(dtype))


def manifest(snapshot: Snapshot, target: int) -> dict[str, Any]:
    """What a preview is: provenance, the fit behind it, and how far it reaches."""
    meta = snapshot.meta
    steps = meta["steps"]
    return {
        "relexd_version": __version__,
        "target_step": target,
        "observed_steps": steps,
        "newest_observed_step": steps[-1],
        "extrapolation_ratio": target / steps[-1] if steps[-1] > 0 else None,
        "base": meta["base"]["path"],
        "estimator": meta["config"],
        # >1: relexd deliberately ingested only checkpoints this many steps apart (--every)
        "ingest_every": meta["config"].get("every", 1),
        "figures": meta.get("figures", {}),
        "forecasts": meta.get("forecasts", []),
        "state_generation": snapshot.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_manifest(preview: Path) -> dict[str, Any]:
    return json.loads((preview / MANIFEST).read_text())
