"""Ingest time per worker count on one state, N = 1, 2, 4 … up to every core of the host, and a
check that the largest N commits the state of N = 1 bit for bit.

Why this and not bench.ingest's "vs 1 thread" column: bench.ingest keeps a state per configuration,
which at 16 configurations of a 0.5B rank-2 run (~10 GB each) outgrows any disk, and measures a
floor before every ingest. Here one state follows the run; each steady checkpoint (the trainer's
fresh one, in the page cache as a real trainer's is) is ingested by the next worker count in a
rotating order, so every N meets the same mix of early and late checkpoints. Anchor checkpoints (the
8th, 16th … observed) also write an anchor: they are ingested with the most workers and not counted.
Every ingest does the same work on a steady checkpoint, so the rows compare N, not checkpoints.

The floor (issue 12's definition: the larger of a plain read of checkpoint + base + old sketch and
writing + fsync'ing a new file the size of the new sketch) is measured once per round, right before
its first ingest, leaving the page cache as it found it (:func:`bench.common.plain_read`,
:func:`bench.ingest.write_floor`: until 4 Dec, night, it evicted what the ingest then read from disk).
With ``--at-once`` the round also times those reads and that write at once, the
old sketch dropped from the page cache first: the I/O of an ingest whose state outgrows the page
cache, on a disk that must serve both (the floor assumes one that serves them in parallel at full
speed). An old sketch that was cached is read back afterwards, untimed, so the ingest finds it
where the engine left it.

The equality check: the state is copied once, the next checkpoint is ingested with N = 1 into one
copy and with the largest N into the other, and every committed file is compared byte for byte
(``meta.json`` without its clock fields).

Why a tensor bounds the speed-up: a tensor is one task on one core (:mod:`relexd.engine.pool`), so
an ingest takes at least as long as its largest tensor alone — the embedding is 28 % of a 0.5B
model's elements (at most ~3.6× from any N), 15 % of a 1.5B model's and ~7 % of an 8B model's.
The table prints that bound beside each N.

Run alone: ``python -m bench.scaling [--model 0.5b] [--rank 2] [--threads 1 2 4 8 16] [--rounds 2]
[--layers L] [--no-equality] [--at-once]`` (``--threads 0``: relexd's default, which computes one
tensor per core where the state fits the page cache); ``RELEXD_BENCH_SYNTH_THREADS`` sets torch's threads for
writing the synthetic checkpoints (not the engine's: its workers are single-threaded whatever it says).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import itertools
import json
import os
import resource
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.common import MB, markdown_table, plain_read, vm_hwm_bytes
from bench.common import scratch_dir as scratch
from bench.ingest import MODELS, current_sketch, read_while_writing, write_floor
from bench.synthetic import ModelShape, Trajectory
from relexd.engine import Engine, EngineConfig
from relexd.engine.config import DEFAULT_RANK, default_workers
from relexd.engine.cores import available_cores
from relexd.math.confidence import is_anchor_count

BUILD_CHECKPOINTS = 4
SYNTH_THREADS = int(os.environ.get("RELEXD_BENCH_SYNTH_THREADS", str(torch.get_num_threads())))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Run:
    """The synthetic run's base, state and next checkpoint."""

    def __init__(self, shape: ModelShape, rank: int, tmp: Path) -> None:
        self.traj, self.rank, self.tmp = Trajectory(shape), rank, tmp
        self.state, self.ckpt_dir = tmp / "state", tmp / "checkpoint"
        self.steps = itertools.count(10, 10)
        self.observed = 0  # checkpoints the run's own state has taken
        with torch_threads(SYNTH_THREADS):
            self.base = self.traj.write_base(tmp / "base")

    def checkpoint(self) -> tuple[Path, int]:
        """The trainer's next checkpoint, freshly written (the previous one is deleted)."""
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        step = next(self.steps)
        with torch_threads(SYNTH_THREADS):
            return self.traj.write_checkpoint(self.base, self.ckpt_dir, step), step

    def engine(self, threads: int, state: Path | None = None) -> Engine:
        """An engine on ``state`` (default: the run's own) with ``threads`` workers
        (:data:`DEFAULT`: relexd's default)."""
        workers = None if threads == DEFAULT else threads
        return Engine(state or self.state, self.base, EngineConfig(rank=self.rank), threads=workers)

    def ingest(
        self,
        threads: int,
        state: Path | None = None,
        ckpt_step: tuple[Path, int] | None = None,
        engine: Engine | None = None,
    ) -> tuple[float, float]:
        """Ingest the next checkpoint (or ``ckpt_step``) into ``state`` (default: the run's own)
        with ``threads`` workers (:data:`DEFAULT`: relexd's default), in an engine opened for it,
        or in ``engine`` (on the run's own state: kept open from one ingest to the next, as
        ``relexd watch`` keeps it); returns (seconds of the ingest, CPU seconds of the process)."""
        ckpt, step = ckpt_step or self.checkpoint()
        with contextlib.nullcontext(engine) if engine is not None else self.engine(threads, state) as opened:
            cpu = _cpu()
            report = opened.ingest(ckpt, step)
            cpu = _cpu() - cpu
        if state is None:
            self.observed += 1
        return report.seconds, cpu

    def next_is_anchor(self) -> bool:
        """Whether the run's state takes an anchor at its next checkpoint."""
        return is_anchor_count(self.observed + 1)

    def floor(self, at_once: bool) -> dict[str, float]:
        """Issue 12's floor for the next ingest of this state (before its checkpoint exists, the
        current base stands in for it: the same bytes) and, with ``at_once``, the same reads and
        write on the disk at once with the old sketch read from the disk
        (:func:`bench.ingest.read_while_writing`)."""
        sketch = current_sketch(self.state)
        files = [self.base / "model.safetensors"] * 2 + ([sketch] if sketch else [])
        nbytes = self.traj.shape.params * self.rank * 4
        _, read_s = plain_read(files, leave_cache=True)
        write_s = write_floor(nbytes, self.tmp)
        out = {"floor_s": max(read_s, write_s), "read_s": read_s, "write_s": write_s}
        if at_once:
            out["at_once_s"] = read_while_writing(files, sketch, nbytes, self.tmp)
        print(", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
        return out


def committed_files_equal(a: Path, b: Path) -> list[str]:
    """Files of two states' committed generation and anchors that differ (``meta.json`` compared
    without its clock fields); empty when the states are equal bit for bit."""

    def files(state: Path) -> dict[str, Path]:
        gen = json.loads((state / "CURRENT").read_text())["generation"]
        out = {f"generation/{f.name}": f for f in (state / "generations" / gen).iterdir()}
        return out | {str(f.relative_to(state)): f for f in (state / "anchors").rglob("*") if f.is_file()}

    def meta(path: Path) -> dict[str, Any]:
        m = json.loads(path.read_text())
        for rec in m["history"]:
            rec.pop("time", None), rec.pop("seconds", None)
        for key in ("last_time", "created"):
            m.pop(key, None)
        return m

    fa, fb = files(a), files(b)
    differ = sorted(set(fa) ^ set(fb))
    for name in sorted(set(fa) & set(fb)):
        same = (
            meta(fa[name]) == meta(fb[name])
            if name.endswith("meta.json")
            else filecmp.cmp(fa[name], fb[name], shallow=False)
        )
        if not same:
            differ.append(name)
    return differ


#: ``--threads 0``: relexd's default, as ``relexd watch`` runs it (a pool of default_workers(), one
#: task per core computing where the state fits the page cache: relexd.engine.config)
DEFAULT = 0


def label(n: int) -> str:
    return "default" if n == DEFAULT else str(n)


def thread_counts() -> list[int]:
    """relexd's default, 1, 2, 4, 8 … up to every core this process may use, that count itself and
    the default pool size."""
    cores = available_cores()
    return sorted({DEFAULT, 1, *(n for n in (2, 4, 8, 16, 32, 64) if n <= cores), cores, default_workers()})


def run(
    shape: ModelShape, rank: int, threads: list[int], rounds: int, equality: bool, at_once: bool = False
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    floors: list[dict[str, float]] = []
    with scratch(f"scaling-{shape.name}-k{rank}") as tmp:
        r = Run(shape, rank, tmp)
        for _ in range(BUILD_CHECKPOINTS):
            r.ingest(max(threads))
        for rnd in range(rounds):
            floors.append(r.floor(at_once))
            order = threads[rnd % len(threads) :] + threads[: rnd % len(threads)]
            for n in order:
                while r.next_is_anchor():  # an anchor checkpoint: not counted
                    r.ingest(max(threads))
                seconds, cpu = r.ingest(n)
                records.append({"round": rnd + 1, "threads": n, "seconds": seconds, "cpu_s": cpu})
                print(f"round {rnd + 1}, {label(n)} workers: {seconds:.2f} s, CPU {cpu:.1f} s", flush=True)
        differ: list[str] | None = None
        if equality and max(threads) > 1:
            nxt = r.checkpoint()
            copies = {n: tmp / f"state-{n}" for n in (1, max(threads))}
            r.state.rename(copies[1])  # one copy, not two: a 1.5B state is ~30 GB
            shutil.copytree(copies[1], copies[max(threads)])
            for n, copy in copies.items():
                r.ingest(n, copy, nxt)
            differ = committed_files_equal(*copies.values())
            print(f"1 vs {max(threads)} workers, committed files that differ: {differ or 'none'}")
    return {
        "model": shape.name,
        "rank": rank,
        "records": records,
        "floor_s": statistics.median(f["floor_s"] for f in floors),
        "at_once_s": statistics.median(f["at_once_s"] for f in floors) if at_once else None,
        "largest_share": shape.largest / shape.params,
        "differ": differ,
        "peak_rss": vm_hwm_bytes(),
        "largest_f32": shape.largest * 4,
        "cores": available_cores(),
        "default": default_workers(),
    }


def report(result: dict[str, Any]) -> str:
    by_n: dict[int, list[dict[str, Any]]] = {}
    for rec in result["records"]:
        by_n.setdefault(rec["threads"], []).append(rec)
    med = {n: statistics.median(x["seconds"] for x in rs) for n, rs in sorted(by_n.items())}
    one = med.get(1)
    at_once = result.get("at_once_s")
    rows = [
        [result["model"], result["rank"], label(n), len(by_n[n]), s,
         min(x["seconds"] for x in by_n[n]), max(x["seconds"] for x in by_n[n]),
         statistics.median(x["cpu_s"] for x in by_n[n]),
         one / s if one else None,
         min(n or result["default"], result["cores"], 1 / result["largest_share"]),
         s / result["floor_s"], *([s / at_once] if at_once else [])]
        for n, s in med.items()
    ]  # fmt: skip
    table = markdown_table(
        ["model", "rank", "workers", "ingests", "median s", "min s", "max s", "median CPU s",
         "speed-up vs 1", "bound: min(N, cores, 1 / largest share)", "ingest / floor",
         *(["ingest / read and write at once"] if at_once else [])],
        rows,
    )  # fmt: skip
    differ = result["differ"]
    equal = (
        "not checked"
        if differ is None
        else "equal bit for bit"
        if not differ
        else "DIFFER: " + ", ".join(differ)
    )
    return (
        f"{table}\n\nHost: {result['cores']} cores usable. Floor (median of the rounds): "
        f"{result['floor_s']:.2f} s"
        + (f"; reads and write at once, old sketch from the disk: {at_once:.2f} s" if at_once else "")
        + f". Largest tensor: {result['largest_share']:.1%} of the elements. "
        f"State after one more checkpoint, 1 vs {max(by_n)} workers: {equal}. Peak RSS of the "
        f"process: {result['peak_rss'] / MB:.0f} MB ({result['peak_rss'] / result['largest_f32']:.2f}× the "
        f"largest tensor in float32; the synthetic writer's buffers included)."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument(
        "--threads", type=int, nargs="+", default=thread_counts(), help="worker counts; 0: relexd's default"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers", type=int, help="the model's shapes with fewer layers (a quick run)")
    p.add_argument("--no-equality", action="store_true", help="skip the 1-vs-most-workers state check")
    p.add_argument(
        "--at-once",
        action="store_true",
        help="also time the floor's reads and write at once, the old sketch read from the disk "
        "(a state that outgrows the page cache)",
    )
    a = p.parse_args(argv)
    start = time.perf_counter()
    shape = MODELS[a.model].smaller(a.layers) if a.layers else MODELS[a.model]
    result = run(shape, a.rank, sorted(set(a.threads)), a.rounds, not a.no_equality, a.at_once)
    print(report(result))
    print(f"\n_{time.perf_counter() - start:.0f} s in all._")


if __name__ == "__main__":
    main()
