"""Soak: 300 small checkpoints through a real daemon; RSS and open file descriptors stay flat."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.daemon.trainer_sim import Daemon, hf_save, make_base, rotate

N = 300
BATCH = 20


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_soak_300_checkpoints_rss_and_fds_flat(tmp_path: Path) -> None:
    planted, base = make_base(tmp_path, noise=0.001)
    run = tmp_path / "run"
    run.mkdir()
    daemon = Daemon(
        tmp_path, run, base, "--preview-ahead", "2", "--preview-every", "10", "--debounce", "0.05",
        "--reconcile-interval", "2",
    )  # fmt: skip
    samples: list[tuple[int, int, int]] = []
    try:
        daemon.wait_url()
        step = 0
        while step < N:
            for _ in range(BATCH):
                step += 1
                hf_save(run, step, planted.at(step))
                rotate(run, keep=BATCH)  # save_total_limit: old ones vanish
                time.sleep(0.01)
            daemon.wait_for(
                lambda target=step: (daemon.steps() or [0])[-1] >= target, timeout=120, what=f"step {step}"
            )
            daemon.get("/metrics")
            samples.append((step, _rss_kib(daemon.proc.pid), _fds(daemon.proc.pid)))
        observed = daemon.metric("relexd_observed_checkpoints")
        missed = daemon.metric("relexd_checkpoints_missed_total", reason="rotated")
    finally:
        assert daemon.stop() == 0
    assert observed == N  # every checkpoint went through
    assert missed == 0  # rotation kept 20: nothing was deleted unread
    warm = samples[2]  # after 60 checkpoints: imports, caches and arenas have settled
    last = samples[-1]
    rss_growth_mib = (last[1] - warm[1]) / 1024
    assert rss_growth_mib < 40, samples
    assert last[2] <= warm[2] + 4, samples
    print("soak samples (step, VmRSS KiB, fds):", samples)
