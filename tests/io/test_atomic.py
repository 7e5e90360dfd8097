"""Atomic publishing leaves exactly the new content and nothing beside it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from relexd.io import atomic
from relexd.io.atomic import (
    fsync_dir,
    publish_dir,
    remove_tree,
    write_bytes_atomic,
    write_json_atomic,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def _staging(parent: Path, files: dict[str, bytes], name: str = "staging") -> Path:
    staging = parent / name
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return staging


def test_write_bytes_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_failed_write_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    write_bytes_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_write_json_atomic_format(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"b": [1, 2], "a": {"z": None, "y": "s"}})
    assert path.read_text() == (
        '{\n  "a": {\n    "y": "s",\n    "z": null\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    )


def test_publish_new_directory(tmp_path: Path) -> None:
    files = {"model.safetensors": b"weights", "sub/config.json": b"{}"}
    staging = _staging(tmp_path, files)
    publish_dir(staging, tmp_path / "preview")
    assert _tree(tmp_path / "preview") == files
    assert os.listdir(tmp_path) == ["preview"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_publish_replaces_exactly(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "preview"
    publish_dir(_staging(tmp_path, {"old.bin": b"old", "shared": b"v1"}), final)
    new = {"new.bin": b"new", "shared": b"v2", "deep/x": b"x"}
    publish_dir(_staging(tmp_path, new), final)
    assert _tree(final) == new
    assert os.listdir(tmp_path) == ["preview"]


def test_publish_fallback_window_is_the_documented_one(tmp_path: Path, monkeypatch) -> None:
    """Without renameat2 the old content is renamed aside first: final is briefly missing."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "preview"
    publish_dir(_staging(tmp_path, {"f": b"1"}), final)
    seen: list[bool] = []
    real_rename = os.rename

    def spying_rename(src: Path, dst: Path) -> None:
        real_rename(src, dst)
        seen.append(final.exists())

    monkeypatch.setattr(atomic.os, "rename", spying_rename)
    publish_dir(_staging(tmp_path, {"f": b"2"}), final)
    assert seen == [False, True]
    assert _tree(final) == {"f": b"2"}


def test_reader_never_sees_final_missing(tmp_path: Path) -> None:
    final = tmp_path / "preview"
    publish_dir(_staging(tmp_path, {"f": b"0"}), final)
    missing: list[int] = []
    looks = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal looks
        while not stop.is_set():
            looks += 1
            try:
                os.stat(final / "f")
            except FileNotFoundError:
                missing.append(looks)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(1, 60):
            publish_dir(_staging(tmp_path, {"f": str(i).encode()}), final)
    finally:
        stop.set()
        poller.join()
    assert looks > 0
    assert missing == []
    assert (final / "f").read_bytes() == b"59"


def test_remove_tree(tmp_path: Path) -> None:
    tree = _staging(tmp_path, {"a/b/c": b"x"}, name="tree")
    remove_tree(tree)
    assert not tree.exists()
    remove_tree(tree)  # already gone is fine
    file = tmp_path / "file"
    file.write_bytes(b"x")
    remove_tree(file)
    assert not file.exists()
    target = _staging(tmp_path, {"keep": b"x"}, name="target")
    link = tmp_path / "link"
    link.symlink_to(target)
    remove_tree(link)
    assert not link.exists()
    assert (target / "keep").exists()


def test_fsync_dir(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
