"""Which file system holds a path, and whether it is a network or cluster one.

Two things change there (DESIGN.md §5): inotify does not see writes made by other hosts, so the
watcher polls (:mod:`relexd.daemon.watcher`); and a mapped page that cannot be fetched kills the
process with SIGBUS, so relexd's own state files are read, not mapped
(:class:`relexd.state.store.SketchFile`). The type comes from ``/proc/mounts``, the longest mount
point holding the path: ``statfs`` magic numbers do not tell FUSE file systems apart.
"""

from __future__ import annotations

import os
from pathlib import Path

#: File system types on which inotify misses remote writes (DESIGN.md §5).
POLLING_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "9p"})


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def fs_type(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the file system holding ``path`` (longest matching mount point), or None."""
    target = os.path.realpath(Path(path).absolute())  # resolves the existing part of the path
    best: tuple[int, str] | None = None
    try:
        with open(mounts, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point, kind = _unescape(parts[1]), parts[2]
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= best[0]):
                    best = (len(point), kind)
    except OSError:
        return None
    return best[1] if best else None


def needs_polling(kind: str | None) -> bool:
    """True for network/cluster file systems and FUSE mounts (s3fs, gcsfuse, sshfs…)."""
    return kind is not None and (kind in POLLING_FS or kind.startswith("fuse"))


def mapping_is_safe(path: Path) -> bool:
    """Whether files under ``path`` may be memory-mapped: not on a network, cluster or FUSE file
    system, where a page that cannot be fetched raises SIGBUS in whatever touches it (DESIGN.md
    §5). Where the type is unknown, no."""
    kind = fs_type(path)
    return kind is not None and not needs_polling(kind)
