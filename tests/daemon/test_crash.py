"""kill -9 at many moments of ingestion and of preview writing, restart, and the final state and
previews equal an uninterrupted run's (issue 3, requirement 3).

Each daemon run is a child of a multiprocessing *forkserver* that has already imported torch and
relexd, so a run costs milliseconds instead of an interpreter start. The child arms a tripwire on
one function (a state file's positional chunk write, an fsync, a rename, a preview chunk append, a
preview tensor, a preview publish, the preview prune) and SIGKILLs itself at its k-th call: a real
kill -9 (no cleanup, no atexit, lock released by the kernel) at a precisely chosen instant. With two
ingest workers the kill lands in whichever worker thread makes that call, mid-way through the other's
tensor.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.daemon.trainer_sim import hf_save, make_base

KINDS = ("write", "fsync", "replace", "rename", "append", "preview_tensor", "preview_publish", "prune")


def _arm(kind: str, k: int, counts: dict[str, int]) -> None:
    """Wrap the functions; count calls, and SIGKILL this process at call ``k`` of ``kind``."""
    import relexd.daemon.previews as previews_mod
    import relexd.engine.preview as preview_mod
    from relexd.io.safetensors_file import PositionalSafetensorsWriter, StreamingSafetensorsWriter

    lock = threading.Lock()  # worker threads call these concurrently

    def tripwire(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            with lock:
                counts[name] = counts.get(name, 0) + 1
                hit = name == kind and counts[name] == k
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)

        return wrapped

    PositionalSafetensorsWriter.write = tripwire("write", PositionalSafetensorsWriter.write)
    StreamingSafetensorsWriter.append = tripwire("append", StreamingSafetensorsWriter.append)
    os.fsync = tripwire("fsync", os.fsync)
    os.replace = tripwire("replace", os.replace)
    os.rename = tripwire("rename", os.rename)
    preview_mod._write_tensor = tripwire("preview_tensor", preview_mod._write_tensor)
    preview_mod.publish_dir = tripwire("preview_publish", preview_mod.publish_dir)
    previews_mod.prune = tripwire("prune", previews_mod.prune)


def daemon_child(
    root: str, run: str, state: str, kind: str, k: int, counts_file: str | None, threads: int = 1
) -> None:
    """One daemon lifetime: catch up with the run directory (``once``), unless killed first."""
    torch.set_num_threads(1)
    from relexd.daemon.config import WatchSettings
    from relexd.daemon.service import WatchService

    counts: dict[str, int] = {}
    _arm(kind, k, counts)
    settings = WatchSettings(
        run_dir=Path(run),
        base=Path(root) / "base",
        state_dir=Path(state),
        preview_ahead=(2.0,),
        preview_at=(100,),
        once=True,
        threads=threads,
    )
    service = WatchService(settings)
    service.open()
    service.pass_once(force_stable=True)
    service.engine.close()
    if counts_file:
        Path(counts_file).write_text(json.dumps(counts))


def _run(ctx: Any, *args: Any) -> int:
    proc = ctx.Process(target=daemon_child, args=args)
    proc.start()
    proc.join(120)
    assert proc.exitcode is not None, "daemon child hung"
    return proc.exitcode


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _state_arrays(state: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from relexd.state.store import read_snapshot

    snap = read_snapshot(state)
    arrays = {f"small:{k}": v for k, v in _tensors(snap.path / "small.safetensors").items()}
    arrays.update({f"sketch:{k}": v for k, v in _tensors(snap.path / "sketch.safetensors").items()})
    for anchor in snap.meta["anchors"]:
        with snap.anchor(anchor["step"]) as files:
            for path in files.paths:
                arrays.update({f"anchor{anchor['step']}:{k}": v for k, v in _tensors(path).items()})
    return snap.meta, arrays


def _previews(state: Path) -> dict[str, torch.Tensor]:
    out = {}
    root = state / "previews"
    for d in sorted(root.iterdir()):
        assert not d.name.startswith("."), f"unpublished leftover {d}"
        for f in sorted(d.glob("*.safetensors")):
            out.update({f"{d.name}/{f.name}/{k}": v for k, v in _tensors(f).items()})
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def ctx() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "relexd.daemon.service", "tests.daemon.test_crash"])
    return ctx


@pytest.mark.parametrize("threads", [1, 2])
def test_kill_9_at_many_moments_ends_in_the_uninterrupted_state(
    tmp_path: Path, ctx: Any, threads: int
) -> None:
    planted, _ = make_base(tmp_path, noise=0.002)
    run = tmp_path / "run"
    for step in (10, 20, 30, 40, 50, 60):
        hf_save(run, step, planted.at(step), shards=2)

    def grow(run_dir: Path, steps: tuple[int, ...]) -> None:
        for step in steps:
            shutil.copytree(run / f"checkpoint-{step}", run_dir / f"checkpoint-{step}")

    reference = tmp_path / "ref-state"
    counts_file = tmp_path / "counts.json"
    # the reference always runs on one worker: the state must not depend on the count
    assert _run(ctx, str(tmp_path), str(run), str(reference), "none", 0, str(counts_file)) == 0
    counts = json.loads(counts_file.read_text())
    assert (
        counts["write"] > 20
        and counts["append"] > 5
        and counts["preview_tensor"] >= 5
        and counts["preview_publish"] == 2
    )

    # kill points spread over the whole uninterrupted run, then kills during the resumed run
    plan: list[list[tuple[str, int]]] = []
    spreads = {kind: counts[kind] for kind in KINDS}
    for episode in range(10):
        first_kind = KINDS[episode % 4]  # write, fsync, replace, rename
        first_k = 1 + (episode * 37) % max(1, spreads[first_kind] - 1)
        if episode % 3 == 2:
            # no kill before the run grows: previews of the older state exist and must be redone
            first_kind, first_k = "none", 0
        second_kind = KINDS[(episode + 2) % len(KINDS)]
        second_k = 1 + episode % 3
        third = ("preview_publish", 1) if episode % 2 == 0 else ("preview_tensor", 2 + episode)
        plan.append([(first_kind, first_k), (second_kind, second_k), third])

    kills = 0
    moments: set[tuple[str, int, int]] = set()
    for episode, kill_points in enumerate(plan):
        state = tmp_path / f"state-{episode}"
        run_dir = tmp_path / f"run-{episode}"
        grow(run_dir, (10, 20, 30))  # the run grows while the daemon is killed and restarted
        for i, (kind, k) in enumerate(kill_points):
            if i == 1:
                grow(run_dir, (40, 50, 60))
            code = _run(ctx, str(tmp_path), str(run_dir), str(state), kind, k, None, threads)
            assert code in (0, -signal.SIGKILL)
            if code == -signal.SIGKILL:
                kills += 1
                moments.add((kind, k, episode))
        assert _run(ctx, str(tmp_path), str(run_dir), str(state), "none", 0, None, threads) == 0
        ref_meta, ref_arrays = _state_arrays(reference)
        meta, arrays = _state_arrays(state)
        assert meta["steps"] == ref_meta["steps"] == [10, 20, 30, 40, 50, 60]
        for name, rec in ref_meta["per_tensor"].items():
            for key in ("alpha", "beta"):
                assert meta["per_tensor"][name][key] == pytest.approx(rec[key], abs=1e-6)
        _assert_close(arrays, ref_arrays)
        _assert_close(_previews(state), _previews(reference))
        assert not [
            p
            for p in (state / "generations").iterdir()
            if p.name != json.loads((state / "CURRENT").read_text())["generation"]
        ]
    print(f"{kills} kills at", sorted(moments))
    assert kills >= 20, f"only {kills} kill points hit: {sorted(moments)}"
    assert {kind for kind, _, _ in moments} >= {
        "write",
        "fsync",
        "replace",
        "preview_tensor",
        "preview_publish",
    }
