"""Which file systems relexd maps its own files on."""

from __future__ import annotations

from pathlib import Path

import pytest

from relexd.io import filesystems


@pytest.mark.parametrize(
    ("kind", "safe"),
    [("ext4", True), ("xfs", True), ("overlay", True), ("nfs4", False), ("lustre", False),
     ("fuse.s3fs", False), (None, False)],
)  # fmt: skip
def test_mapping_is_safe_only_on_local_file_systems(
    monkeypatch: pytest.MonkeyPatch, kind: str | None, safe: bool
) -> None:
    """A mapped page that cannot be fetched (NFS, a cluster or FUSE file system) is SIGBUS, not
    an error: there, and where the type is unknown, relexd reads its state instead."""
    monkeypatch.setattr(filesystems, "fs_type", lambda path: kind)
    assert filesystems.mapping_is_safe(Path("/state/sketch.safetensors")) is safe
