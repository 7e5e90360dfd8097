"""Durable, atomic publishing of files and directories.

relexd must survive ``kill -9`` at any instant and a reader (an eval job, a person) must never see a
half-written state file or preview. Everything here therefore follows one pattern: write aside under
a name nobody reads (``.tmp-…`` / a staging directory), fsync the data, rename into place, fsync the
parent directory so that the rename itself is durable.

Leftovers of a crash are siblings named ``.tmp-<name>-…`` (from :func:`write_bytes_atomic`) and
``.old-<name>-<pid>`` (from the fallback of :func:`publish_dir`); the owner of the directory removes
them on start.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_dir(path: Path) -> None:
    """fsync a directory, making renames and creations inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some file systems cannot fsync directories: nothing to do
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: readers see the old content or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: object) -> None:
    """:func:`write_bytes_atomic` of ``obj`` as JSON (sorted keys, indent 2, trailing newline),
    so that files are stable to diff and to compare."""
    write_bytes_atomic(path, (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8"))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` with Linux renameat2(RENAME_EXCHANGE).

    Returns False where the system cannot (not Linux, glibc < 2.28, a file system without
    support), so that the caller falls back.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish_dir(staging: Path, final: Path) -> None:
    """Make ``final`` hold the content of ``staging`` (same file system), durably and atomically.

    Every file in ``staging`` and ``staging`` itself are fsync'd first, so the published content
    is on disk before its name is. A new ``final`` is a plain rename. An existing ``final`` is
    swapped with renameat2(RENAME_EXCHANGE) where Linux supports it, so a reader opening ``final``
    at any instant sees the complete old or the complete new directory, never a missing one; the
    old content (now at ``staging``) is then removed. Where the exchange is unavailable the old
    ``final`` is renamed aside to ``.old-<name>-<pid>`` and staging renamed in: between those two
    renames ``final`` is briefly missing, so readers must retry on FileNotFoundError there.
    """
    staging, final = Path(staging), Path(final)
    _fsync_tree(staging)
    parent = final.parent
    if not os.path.lexists(final):
        os.rename(staging, final)
        fsync_dir(parent)
        return
    if _exchange(staging, final):
        old = staging
    else:
        old = parent / f".old-{final.name}-{os.getpid()}"
        remove_tree(old)
        os.rename(final, old)
        os.rename(staging, final)
    fsync_dir(parent)
    remove_tree(old)


def remove_tree(path: Path) -> None:
    """Remove a directory tree (or a file); one that is already gone is fine."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
