"""Every kind of bad input is logged, counted under its reason, leaves the state untouched, and the
next good checkpoint is ingested normally (issue 3, requirement 7). Runs the service in-process,
one scan pass at a time, so each case is deterministic and fast."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from relexd.daemon.config import WatchSettings
from relexd.daemon.service import WatchService
from relexd.errors import REASONS
from relexd.io import safetensors_file
from relexd.state import store
from relexd.state.store import read_snapshot
from tests.daemon.trainer_sim import hf_save, make_base


class Harness:
    def __init__(self, tmp: Path, **options: object) -> None:
        self.planted, self.base = make_base(tmp)
        self.run = tmp / "run"
        self.run.mkdir()
        self.state = tmp / "state"
        settings = WatchSettings(
            run_dir=self.run,
            base=self.base,
            state_dir=self.state,
            preview_ahead=(2.0,),
            debounce=0.0,
            **options,  # type: ignore[arg-type]
        )
        self.svc = WatchService(settings)
        self.svc.open()

    def save(self, step: int, tensors: dict[str, torch.Tensor] | None = None) -> Path:
        return hf_save(self.run, step, tensors if tensors is not None else self.planted.at(step))

    def scan(self) -> None:
        self.svc._retry_at = 0.0
        self.svc.pass_once(force_stable=True)

    def errors(self, reason: str) -> float:
        value = self.svc.metrics.registry.get_sample_value(
            "relexd_checkpoint_errors_total", {"reason": reason}
        )
        return value or 0.0

    def missed(self, reason: str) -> float:
        value = self.svc.metrics.registry.get_sample_value(
            "relexd_checkpoints_missed_total", {"reason": reason}
        )
        return value or 0.0

    def steps(self) -> list[int]:
        return read_snapshot(self.state).meta.get("steps", [])


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    harness.save(10)
    harness.scan()
    assert harness.steps() == [10]
    yield harness
    if harness.svc.engine is not None:
        harness.svc.engine.close()


def _generation(h: Harness) -> str | None:
    return read_snapshot(h.state).name


def _truncate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    os.truncate(f, f.stat().st_size - 7)


def _corrupt_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"#garbage"
    f.write_bytes(bytes(data))


def _tensors(h: Harness, step: int, change: str) -> dict[str, torch.Tensor]:
    t = h.planted.at(step)
    name = "model.layers.0.mlp.up_proj.weight"
    if change == "non_finite":
        t[name][0, 0] = float("nan")
    elif change == "inf":
        t[name][1, 1] = float("inf")
    elif change == "shape_mismatch":
        t[name] = t[name][:, :16].contiguous()
    elif change == "dtype_mismatch":
        t[name] = t[name].to(torch.float16)
    elif change == "missing_tensor":
        del t[name]
    return t


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "truncated"),
        ("corrupt_header", "corrupt_header"),
        ("non_finite", "non_finite"),
        ("inf", "non_finite"),
        ("shape_mismatch", "shape_mismatch"),
        ("dtype_mismatch", "dtype_mismatch"),
        ("missing_tensor", "missing_tensor"),
    ],
)
def test_bad_checkpoint_is_counted_skipped_and_next_good_one_ingested(
    h: Harness, case: str, reason: str
) -> None:
    before = _generation(h)
    if case in ("truncated", "corrupt_header"):
        ckpt = h.save(20)
        (_truncate if case == "truncated" else _corrupt_header)(ckpt)
    else:
        h.save(20, _tensors(h, 20, case))
    h.scan()
    assert h.errors(reason) == 1
    assert h.steps() == [10] and _generation(h) == before  # state untouched
    h.scan()  # unchanged bad checkpoint: not retried in a loop
    assert h.errors(reason) == 1
    h.save(30)
    h.scan()
    assert h.steps() == [10, 30]
    assert sum(h.errors(r) for r in ("truncated", "corrupt_header", "non_finite")) <= 1


def test_bad_checkpoint_retried_when_its_files_change(h: Harness) -> None:
    ckpt = h.save(20)
    _truncate(ckpt)
    h.scan()
    assert h.errors("truncated") == 1 and h.steps() == [10]
    h.save(20)  # the trainer rewrote it (different size now)
    h.scan()
    assert h.steps() == [10, 20]


def test_out_of_order_checkpoint_warned_counted_once(h: Harness) -> None:
    h.save(30)
    h.scan()
    h.save(20)
    h.scan()
    h.scan()
    assert h.steps() == [10, 30]
    assert h.errors("out_of_order") == 1


def test_rotated_mid_read_counts_missed_and_leaves_state(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer deletes the checkpoint while relexd reads it and the file system does not keep
    it for the open descriptor (NFS answers ESTALE): a miss, not an error."""
    ckpt = h.save(20)
    real_preadv = os.preadv
    calls = {"n": 0}

    def preadv(fd: int, buffers: list, offset: int, *flags: int) -> int:  # flags: the page-cache probe
        calls["n"] += 1
        if calls["n"] == 3 and ckpt.exists():
            shutil.rmtree(ckpt)  # rotation happens between two reads
        if not ckpt.exists() and os.readlink(f"/proc/self/fd/{fd}").startswith(str(ckpt)):
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(safetensors_file.os, "preadv", preadv)
    before = _generation(h)
    h.scan()
    monkeypatch.undo()
    assert h.missed("rotated") == 1
    assert sum(h.errors(r) for r in ("rotated", "truncated", "corrupt_header", "io")) == 0
    assert h.steps() == [10] and _generation(h) == before
    h.save(30)
    h.scan()
    assert h.steps() == [10, 30]


def _half_rotate(ckpt: Path) -> None:
    """Where ``shutil.rmtree`` may be when relexd looks: the weights unlinked, the directory, its
    config and its trainer_state.json not yet (rmtree removes entries in directory order)."""
    (ckpt / "model.safetensors").unlink()


def _rotate_right_before_ingest(
    h: Harness, ckpt: Path, monkeypatch: pytest.MonkeyPatch, rotate: Callable[[Path], None] = shutil.rmtree
) -> None:
    real = h.svc.engine.ingest

    def ingest(weights: Path, step: int, **kw: object) -> object:
        rotate(ckpt)
        return real(weights, step, **kw)

    monkeypatch.setattr(h.svc.engine, "ingest", ingest)


def test_rotated_after_completion_is_still_read_through_its_pin(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Complete → pinned at once; the trainer's rotation then only removes names."""
    ckpt = h.save(20)
    _rotate_right_before_ingest(h, ckpt, monkeypatch)
    h.scan()
    assert not ckpt.exists()
    assert h.steps() == [10, 20]
    assert h.missed("rotated") == 0 and h.errors("rotated") == 0
    assert not any((h.state / "pins").iterdir())  # the pin is released after the ingest


@pytest.mark.parametrize("rotate", [shutil.rmtree, _half_rotate], ids=["whole", "half-done"])
def test_rotated_before_open_without_pins_counts_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotate: Callable[[Path], None]
) -> None:
    h = Harness(tmp_path, max_pinned=0)
    h.save(10)
    h.scan()
    ckpt = h.save(20)
    _rotate_right_before_ingest(h, ckpt, monkeypatch, rotate)
    h.scan()
    assert h.missed("rotated") == 1 and sum(h.errors(r) for r in REASONS) == 0 and h.steps() == [10]
    h.svc.engine.close()


def test_pinned_while_being_rotated_counts_missed_not_corrupt(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin taken late (the pins were busy) can find the rotation under way: what is left of the
    checkpoint is not bad input, and the trainer's rotation is no error of the trainer."""
    from relexd.daemon import intake

    ckpt = h.save(20)
    real_pin = intake.CheckpointPin

    def late_pin(*args: object) -> object:
        _half_rotate(ckpt)
        return real_pin(*args)

    monkeypatch.setattr(intake, "CheckpointPin", late_pin)
    h.scan()
    assert h.missed("rotated") == 1
    assert sum(h.errors(r) for r in REASONS) == 0
    assert h.steps() == [10]


def test_permission_denied(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = h.save(20)
    weights = ckpt / "model.safetensors"
    if os.geteuid() != 0:
        weights.chmod(0)
    else:  # root reads anything: simulate what open(2) would answer
        real_open = os.open

        def deny(path: object, *args: object, **kw: object) -> int:
            if str(path) == str(weights):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kw)

        monkeypatch.setattr(safetensors_file.os, "open", deny)
    h.scan()
    monkeypatch.undo()
    weights.chmod(0o644)
    assert h.errors("permission") == 1 and h.steps() == [10]
    h.save(30)
    h.scan()
    assert h.steps()[-1] == 30


def test_disk_full_keeps_previous_state_and_retries(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    before = read_snapshot(h.state)
    real_commit = store.Transaction.commit

    def full(self: store.Transaction, *a: object, **kw: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.Transaction, "commit", full)
    h.save(20)
    h.svc.pass_once(force_stable=True)
    after = read_snapshot(h.state)
    assert after.name == before.name and after.meta["steps"] == [10]
    assert h.svc._retry_at > 0  # backoff scheduled, no error counted against the checkpoint
    assert h.svc.intake.backlog() == 1  # waiting to be retried, not rejected
    gen_dir = h.state / "generations"
    assert [p.name for p in gen_dir.iterdir()] == [before.name]  # no half generation left
    monkeypatch.setattr(store.Transaction, "commit", real_commit)
    h.scan()
    assert h.steps() == [10, 20]


def test_corrupt_dcp_metadata_counted_once(h: Harness) -> None:
    dcp = h.run / "checkpoint-20"
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(b"x")
    (dcp / ".metadata").write_bytes(b"x")
    (dcp / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    h.scan()
    h.scan()
    assert h.errors("corrupt_header") == 1
    h.save(30)
    h.scan()
    assert h.steps() == [10, 30]


def test_preview_disk_full_keeps_previous_preview_and_retries(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    previews = h.state / "previews"
    assert (previews / "step-20").is_dir()
    from relexd.engine import preview as preview_mod

    real = preview_mod.publish_dir

    def full(*a: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preview_mod, "publish_dir", full)
    h.save(20)
    h.scan()
    assert h.steps() == [10, 20]
    assert (previews / "step-20").is_dir()  # old target still there: nothing half-written published
    assert not (previews / "step-40").exists()
    assert not [p for p in previews.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(preview_mod, "publish_dir", real)
    h.scan()  # retried without a new checkpoint
    assert (previews / "step-40").is_dir()
    assert not (previews / "step-20").exists()


def test_tensor_unexpected_name_does_not_stop(h: Harness) -> None:
    t = h.planted.at(20)
    t["extra.weight"] = torch.zeros(3)
    h.save(20, t)
    h.scan()
    assert h.errors("unexpected_tensor") == 1
    assert h.steps() == [10]
