"""Hold a complete checkpoint's files open so the trainer's rotation cannot take them away unread.

A trainer that saves every step with ``save_total_limit=2`` deletes each checkpoint two saves after
writing it: under a second at a small model's pace, often less than one ingest of relexd. Deleting a
file only removes its name; on a local file system its data stays readable through any descriptor
already open on it until the last one closes. So as soon as a checkpoint is complete relexd opens
the files it will read (the weights, their index, the config and tokenizer files it copies) and
keeps them open until the checkpoint is ingested.

The engine reads checkpoints by path, so the pin offers a *view*: a private directory of symbolic
links, one per pinned file, to ``/proc/self/fd/N``. Opening such a link opens the very file the
descriptor holds, even after the trainer unlinked it (Linux's proc(5) "magic links"). Nothing is
written into the trainer's directories.

Costs and limits: a pinned checkpoint that the trainer deleted still occupies its disk space until
relexd releases it, so the number of pins is bounded (``--max-pinned``). Network file systems do not
keep a file alive for a descriptor held on another host (NFS answers ESTALE), so there pins only
narrow the window; ingestion still counts such a checkpoint as rotated, never as corrupt.

A pin taken late (the pins were all in use when the checkpoint completed) can land in the middle of
the trainer's rotation, which unlinks entries one by one. A pin therefore holds every weights file
the checkpoint had when it was found complete, or none: a partial view could be read as a smaller
model, or reported as a corrupt one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from relexd._closeable import Closeable
from relexd.engine.ingest import AUX_FILES
from relexd.io.formats.dcp import METADATA as DCP_METADATA
from relexd.io.formats.verl_fsdp import CONFIG as VERL_CONFIG
from relexd.io.formats.verl_fsdp import RANK_FILE
from relexd.io.layouts import CheckpointRef, Signature
from relexd.io.reader import is_temp_name

#: Where descriptors can be reopened by path (Linux). Without it nothing is pinned.
PROC_FD = Path("/proc/self/fd")


def pinning_supported() -> bool:
    return PROC_FD.is_dir()


def _wanted(name: str) -> bool:
    """Files of a checkpoint directory the reader or the engine may open (never optimizer states)."""
    if name in (DCP_METADATA, VERL_CONFIG):
        return True
    if is_temp_name(name):
        return False
    return (
        name.endswith((".safetensors", ".index.json", ".distcp"))  # adapter_model.safetensors too
        or (name.startswith("pytorch_model") and name.endswith(".bin"))
        or RANK_FILE.fullmatch(name) is not None
        or name in AUX_FILES
    )


class CheckpointPin(Closeable):
    """Open descriptors on one checkpoint's files and a view directory that reads through them.

    Raises FileNotFoundError when the checkpoint, or a weights file of its ``signature`` (taken
    when it was found complete), vanishes before or while it is being pinned (nothing is left open
    then).
    """

    def __init__(self, ref: CheckpointRef, view_root: Path, signature: Signature = ()) -> None:
        self.ref = ref
        self.view = Path(view_root) / f"step-{ref.step}"
        self._fds: list[int] = []
        self.nbytes = 0
        source = ref.weights
        self._directory = source.is_dir()
        if self._directory:
            files = sorted(p for p in source.iterdir() if _wanted(p.name))
            self.weights = self.view
        else:
            files = [source]
            self.weights = self.view / source.name
        shutil.rmtree(self.view, ignore_errors=True)
        self.view.mkdir(parents=True)
        try:
            for file in files:
                try:
                    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
                except IsADirectoryError:
                    continue
                self._fds.append(fd)
                self.nbytes += os.fstat(fd).st_size
                (self.view / file.name).symlink_to(PROC_FD / str(fd))
            pinned = {file.name for file in files}
            gone = sorted(name for name, _, _ in signature if _wanted(name) and name not in pinned)
            if gone:
                raise FileNotFoundError(
                    errno.ENOENT, f"being rotated away: {', '.join(gone)} already deleted", str(source)
                )
        except BaseException:
            self.close()
            raise

    def original(self, path: str | Path) -> Path:
        """The trainer's path for a path inside the view (error messages name the real file)."""
        path = Path(path)
        try:
            rel = path.relative_to(self.view)
        except ValueError:
            return path
        source = self.ref.weights
        return source / rel if self._directory else source.parent / rel

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.view, ignore_errors=True)
