"""Ingest cost against the I/O floor, per worker count, with the engine before the worker pool
side by side — all in one run.

For each checkpoint of a synthetic run (bench/synthetic.py) and each engine configuration (its own
state directory; the states of today's engine are equal bit for bit whatever the thread count,
tests/engine/test_workers.py):

1. the **read floor**: a plain sequential read (16 MiB blocks, no parsing) of the checkpoint, the
   base and this state's current sketch, right before the ingest;
2. the **write floor**: writing and fsync'ing a new file the size of the new sketch, right after
   (1), with ``O_DIRECT`` (:func:`_write_fsync` says why).

   Both leave the page cache as they found it (since 4 Dec, night): a file that was not cached is
   dropped behind the read, and the write goes around the page cache. Before, at 1.5B on
   this 23.5 GiB VM, the floor's 6–12 GB of reads and writes pushed the base and the anchor out of
   the page cache, and the ingest right after read them back from the disk (3.6–3.9 GB per steady
   rank-1 ingest instead of 0.01–0.26 GB, 11–18 s of system CPU instead of ~6): a cost of the
   measurement, not of the trainer (bench/README.md, "4 Dec, night");
3. the ingest, in a subprocess per configuration that lives from the first checkpoint to the last
   (its VmHWM is the peak RSS), ``Engine(…, threads=N)`` opened once, exactly as ``relexd
   extrapolate``/``relexd watch`` hold it: what a process keeps between checkpoints counts as it
   does for a user. ``threads`` 0 (:data:`DEFAULT`) is relexd's default, ``threads=None``: until
   6 Dec the "default" rows ran ``threads=default_workers()``, which computes every worker's
   tensor at once, where the default computes one per core while the state fits the page cache,
   fewer while other processes keep cores busy (:mod:`relexd.engine.cores`). Until 3 Dec each ingest ran
   in a fresh process, which faulted in every buffer anew.

floor = max(read floor, write floor) — issue 12's definition. Anchor checkpoints (the 2nd, 4th, 8th …
ingested) also write two bf16 anchor vectors per tensor, which the floor does not count; they are
marked and kept out of the steady-state means.

The "before" engine is the commit :data:`BEFORE_REV` (the last one without the worker pool) checked
out into a temporary git worktree and imported from there by the subprocess; it runs with one torch
thread, its default. ``spare=False`` runs today's engine with ``spare_sketch=False`` (a new sketch
file per generation, as before the spare). A configuration may run ``busy``: one CPU-bound process
at nice 0 (a trainer keeping a core busy) during its ingests, relexd at nice 10, as the systemd
unit sets it.

Run alone: ``python -m bench.ingest [--model 0.5b|1.5b] [--rank K] [--checkpoints N] [--threads 1 0]
[--before] [--no-spare] [--busy | --only-busy]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import GB, MB, cached_fraction, evict, markdown_table, page_cache_at_start, plain_read
from bench.common import scratch_dir as scratch
from bench.synthetic import QWEN25_05B, QWEN25_7B, QWEN25_15B, ModelShape, Trajectory, steps_irregular
from relexd.engine.config import DEFAULT_RANK
from relexd.math.confidence import is_anchor_count

MODELS = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B, "7b": QWEN25_7B}
REPO = Path(__file__).resolve().parents[1]
#: the engine before issue 12 (one thread, row-major sketch, three passes, pread everywhere)
BEFORE_REV = "95ab9ab"
#: ``threads`` of relexd's default (``Engine(threads=None)``), as ``relexd watch`` runs unless told
DEFAULT = 0

#: the subprocess: open the engine once, then ingest each checkpoint named on stdin (a JSON
#: [checkpoint, step] per line) and answer a JSON line with its seconds, the process's peak RSS so
#: far, and what reached the storage and the CPU time during that ingest. The same code runs
#: today's engine and the "before" worktree's (PYTHONPATH chooses which).
CHILD = """
import json, resource, sys
from pathlib import Path
from relexd.engine import Engine, EngineConfig
state, base, estimator, rank, threads, spare = sys.argv[1:7]
config = EngineConfig(estimator=estimator, rank=int(rank))
kw = {} if spare == "default" else {"spare_sketch": spare == "yes"}

def counters():
    # what reached the storage (Linux task I/O accounting): the page cache's share of the reads
    # shows; CPU time: page-cache work shows as system time
    io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"disk_read": int(io["read_bytes"]), "disk_write": int(io["write_bytes"]),
            "cpu_user": usage.ru_utime, "cpu_sys": usage.ru_stime}

engine = Engine(Path(state), Path(base), config, threads=int(threads) or None, **kw)
try:
    for line in sys.stdin:
        ckpt, step = json.loads(line)
        before = counters()
        report = engine.ingest(Path(ckpt), int(step))
        after = counters()
        hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        out = {k: after[k] - before[k] for k in after} | {"ingest_s": report.seconds, "vm_hwm": hwm}
        out |= {"in_flight": getattr(report, "tensors_in_flight", None),
                "others_busy": getattr(report, "others_busy_cores", None)}
        print(json.dumps(out), flush=True)
finally:
    engine.close()
"""


class EngineChild:
    """One configuration's engine in a subprocess of its own, open from the first ingest to
    :meth:`close` (or the ``with`` block's end)."""

    def __init__(self, config: Config, tree: Path | None, state: Path, base: Path, rank: int) -> None:
        self.config = config
        code = tree if config.engine == "before" and tree is not None else REPO
        # `python -c` puts the working directory first on sys.path, before PYTHONPATH: run it from
        # the tree whose engine it must import (run from this repository, "before" imported today's)
        env = dict(os.environ, PYTHONPATH=str(code))
        cmd = [sys.executable, "-c", CHILD, str(state), str(base), "brand", str(rank), str(config.threads)]
        # a file, not a pipe: it can never fill and block the child; closed in close()
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [*cmd, config.spare_arg],
            env=env,
            cwd=code,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            preexec_fn=(lambda: os.nice(10)) if config.busy else None,
        )

    def ingest(self, ckpt: Path, step: int) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        with busy_core(self.config.busy):
            try:
                self._proc.stdin.write(json.dumps([str(ckpt), step]) + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                pass  # it died: said below
            line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(
                f"{self.config.label} engine, {self.config.workers} thread(s), step {step}: "
                f"exit {self._proc.returncode}\n" + self._stderr.read()[-4000:]
            )
        return json.loads(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> EngineChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


HEADERS = [
    "model",
    "rank",
    "engine",
    "threads",
    "in flight (others' load, cores)",
    "ckpt #",
    "anchor",
    "ingest s",
    "read floor s",
    "write floor s",
    "ingest / floor",
    "disk read GB",
    "disk write GB",
    "peak RSS MB",
    "RSS / largest f32",
]


@dataclass(frozen=True)
class Config:
    """One engine configuration of the comparison."""

    engine: str  # "now" or "before"
    threads: int  # DEFAULT: relexd's default
    busy: bool = False
    spare: bool = True  # today's engine only: overwrite the spare sketch in place (its default)

    @property
    def label(self) -> str:
        spare = ", no spare" if self.engine == "now" and not self.spare else ""
        return self.engine + spare + (" (busy host)" if self.busy else "")

    @property
    def workers(self) -> str:
        """The thread count as the tables show it."""
        return "default" if self.threads == DEFAULT else str(self.threads)

    @property
    def spare_arg(self) -> str:
        if self.engine == "before":
            return "default"  # that engine has no such option
        return "yes" if self.spare else "no"


def _in_flight(rec: dict[str, Any]) -> str:
    """Tensors the ingest computed at once, with the others' load that decided it where the
    default watched it ("" for an engine that does not say)."""
    if rec.get("in_flight") is None:
        return ""
    busy = rec.get("others_busy")
    return f"{rec['in_flight']}" + ("" if busy is None else f" ({busy:.2f})")


def current_sketch(state: Path) -> Path | None:
    """The published generation's sketch file, or None for a fresh state."""
    try:
        gen = json.loads((state / "CURRENT").read_text())["generation"]
    except FileNotFoundError:
        return None
    path = state / "generations" / gen / "sketch.safetensors"
    return path if path.exists() else None


def _write_fsync(path: Path, nbytes: int, *, direct: bool = False) -> float:
    """Seconds to write ``nbytes`` of zeros (16 MiB blocks) into the new file ``path`` and fsync it.

    ``direct``: with ``O_DIRECT`` (from a page-aligned buffer; ``nbytes`` rounded up to 4 KiB),
    around the page cache. Why for the floor: a write through the page cache takes as many pages
    as it writes, and at 1.5B on this 23.5 GiB VM those were the base's and the anchor's, which the
    ingest right after then read back from the disk (bench/README.md, "4 Dec, night"). ``O_DIRECT``
    leaves the page cache alone and was also the fastest way to put a sketch-sized file on this
    disk (``python -m bench.direct_io``: 2.5 s against 3.5 s for 12.4 GB), so the floor is no
    easier to meet for it. A file system that refuses ``O_DIRECT`` gets a plain write."""
    block = mmap.mmap(-1, 16 << 20)  # zeros, page-aligned
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    start = time.perf_counter()
    try:
        fd = os.open(path, flags | os.O_DIRECT) if direct else os.open(path, flags)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd, direct = os.open(path, flags), False
    try:
        left = -(-nbytes // 4096) * 4096 if direct else nbytes
        while left > 0:
            left -= os.write(fd, memoryview(block)[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def write_floor(nbytes: int, directory: Path) -> float:
    """Seconds to write and fsync ``nbytes`` into a new file — the sketch's write floor — with
    ``O_DIRECT`` (:func:`_write_fsync`: the floor leaves the page cache as it found it)."""
    path = directory / "write-floor.bin"
    try:
        return _write_fsync(path, nbytes, direct=True)
    finally:
        path.unlink(missing_ok=True)


def read_while_writing(read_paths: Sequence[Path], cold: Path | None, nbytes: int, directory: Path) -> float:
    """Seconds to read ``read_paths`` (plain reads, as :func:`plain_read`) in one thread while this
    one writes and fsyncs ``nbytes`` into a new file: what an ingest's I/O takes on a disk that
    must serve both at once, with no computation at all. ``cold`` (one of ``read_paths``: the old
    sketch) is dropped from the page cache first (``POSIX_FADV_DONTNEED``), as it is when the
    state outgrows the page cache and the engine wrote it around it; the other files stay as the
    trainer and the last ingest left them.

    Why beside the issue's floor: the floor is the larger of reading and writing *alone*, which
    only a disk that serves reads and writes in parallel at full speed lets any program reach.

    A ``cold`` file that was mostly cached is read back into the page cache afterwards (untimed):
    where the state fits the page cache the engine keeps it there, and the ingest timed next must
    find it as the last ingest left it (until 6 Dec its 1.5B rank-1 ingests read it from the disk
    after this: 11-14 s against 8 s)."""
    warm_again = cold is not None and (cached_fraction([cold]) or 0.0) >= 0.5
    if cold is not None:
        evict(cold)
    path = directory / "write-at-once.bin"
    with ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        reading = pool.submit(plain_read, read_paths, leave_cache=True)
        _write_fsync(path, nbytes, direct=True)
        reading.result()  # a failed read raises here instead of passing for a fast one
        took = time.perf_counter() - start
    path.unlink()
    if warm_again:
        plain_read([cold])
    return took


@contextlib.contextmanager
def before_tree(rev: str = BEFORE_REV) -> Iterator[Path]:
    """The engine of ``rev`` (default :data:`BEFORE_REV`), checked out into a temporary git worktree."""
    with scratch("before") as tmp:
        tree = tmp / "relexd"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """One CPU-bound process at normal priority while the block runs (a trainer on one core)."""
    if not on:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        hog.kill()
        hog.wait()


def ingest_child(
    config: Config, tree: Path | None, state: Path, base: Path, ckpt: Path, step: int, rank: int
) -> dict[str, Any]:
    """One ingest in a process of its own (the paired benchmarks, which copy a state per trial)."""
    with EngineChild(config, tree, state, base, rank) as child:
        return child.ingest(ckpt, step)


def model_bytes(shape: ModelShape) -> int:
    """Disk space of one synthetic bf16 model: the base, a checkpoint or a preview."""
    return 2 * shape.params


def state_bytes(shape: ModelShape, rank: int, checkpoints: int) -> int:
    """Disk space of one configuration's state after ``checkpoints`` ingests, about: the sketch and
    its spare, and the bf16 anchors of its anchor checkpoints (two vectors each)."""
    anchors = sum(is_anchor_count(n) for n in range(1, checkpoints + 1))
    return 2 * 4 * rank * shape.params + anchors * 2 * model_bytes(shape)


def scratch_bytes(shape: ModelShape, rank: int, checkpoints: int, configs: int) -> int:
    """Disk space a :func:`run` holds at its peak, about: the bf16 base and one checkpoint, a state
    per configuration, and the write floor's file (one sketch)."""
    return 2 * model_bytes(shape) + configs * state_bytes(shape, rank, checkpoints) + 4 * rank * shape.params


def check_scratch_space(needed: int) -> None:
    """Stop before a run rather than minutes into it where the scratch file system lacks the room
    (on 7 Dec a ``run_all --large`` with 51 GB free failed at its first 1.5B floor, 20 minutes in)."""
    root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(root).free
    if needed > free:
        raise SystemExit(
            f"this benchmark needs ~{needed / GB:.0f} GB of scratch space in {root}, which has "
            f"{free / GB:.0f} GB free: delete stale {root}/relexd-bench-* directories, or set TMPDIR "
            "to a larger file system"
        )


def run(
    shape: ModelShape,
    rank: int,
    checkpoints: int,
    configs: Sequence[Config],
    keep_state: Path | None = None,
) -> dict[str, Any]:
    """Ingest ``checkpoints`` checkpoints with every configuration; rows for :data:`HEADERS`.

    With ``keep_state`` the first "now" configuration's final state and the base are moved there
    (for the preview benchmark).
    """
    traj = Trajectory(shape)
    sketch_bytes = shape.params * rank * 4
    largest_f32 = shape.largest * 4
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    needs_before = any(c.engine == "before" for c in configs)
    with (
        scratch(f"ingest-{shape.name}-k{rank}") as tmp,
        before_tree() if needs_before else contextlib.nullcontext() as tree,
    ):
        base = traj.write_base(tmp / "base")
        states = {c: tmp / f"state-{c.engine}-{c.threads}-{int(c.busy)}-{int(c.spare)}" for c in configs}
        with contextlib.ExitStack() as children:
            engines = {
                c: children.enter_context(EngineChild(c, tree, states[c], base, rank)) for c in configs
            }
            for n, step in enumerate(steps_irregular(checkpoints), start=1):
                ckpt = traj.write_checkpoint(base, tmp / f"checkpoint-{step}", step)
                anchor = is_anchor_count(n)
                for config in configs:
                    state = states[config]
                    sketch = current_sketch(state)
                    files = [
                        ckpt / "model.safetensors",
                        base / "model.safetensors",
                        *([sketch] if sketch else []),
                    ]
                    _, read_s = plain_read(files, leave_cache=True)
                    write_s = write_floor(sketch_bytes, tmp)
                    rec = engines[config].ingest(ckpt, step)
                    floor = max(read_s, write_s)
                    record = {
                        "config": config,
                        "n": n,
                        "anchor": anchor,
                        "ingest_s": rec["ingest_s"],
                        "floor_s": floor,
                        "vm_hwm": rec["vm_hwm"],
                    }
                    records.append(record)
                    rows.append(
                        [
                            shape.name, rank, config.label, config.workers, _in_flight(rec), n,
                            "yes" if anchor else "",
                            rec["ingest_s"], read_s, write_s, rec["ingest_s"] / floor,
                            rec["disk_read"] / GB, rec["disk_write"] / GB,
                            rec["vm_hwm"] / MB, rec["vm_hwm"] / largest_f32,
                        ]
                    )  # fmt: skip
                    print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
                shutil.rmtree(ckpt)
        if keep_state is not None:
            first_now = next(c for c in configs if c.engine == "now")
            keep_state.mkdir(parents=True, exist_ok=True)
            shutil.move(str(states[first_now]), keep_state / "state")
            shutil.move(str(base), keep_state / "base")
    return {"model": shape.name, "params": shape.params, "rank": rank, "rows": rows, "records": records,
            "largest_f32": largest_f32}  # fmt: skip


def _steady_by_config(result: dict[str, Any]) -> dict[Config, list[dict[str, Any]]]:
    """The steady checkpoints' records (checkpoint ≥ 2, not an anchor) per configuration."""
    by_config: dict[Config, list[dict[str, Any]]] = {}
    for r in result["records"]:
        if r["n"] >= 2 and not r["anchor"]:
            by_config.setdefault(r["config"], []).append(r)
    return by_config


def _steady_means(result: dict[str, Any]) -> dict[Config, float]:
    return {c: sum(r["ingest_s"] for r in rs) / len(rs) for c, rs in _steady_by_config(result).items()}


def summary_rows(result: dict[str, Any], siblings: Sequence[dict[str, Any]] = ()) -> list[list[Any]]:
    """Per configuration: steady-state (checkpoint ≥ 2, not an anchor) means and ratios.

    A configuration compared against (the engine before, one thread, no spare) is looked up in this
    run first, then in ``siblings`` of the same model and rank: runs of the same seeded checkpoints
    that kept their states apart (the 1.5B engines, whose states do not fit the disk together)."""
    by_config = _steady_by_config(result)
    mean = _steady_means(result)
    elsewhere: dict[Config, float] = {}
    for other in siblings:
        if other is not result and (other["model"], other["rank"]) == (result["model"], result["rank"]):
            elsewhere |= _steady_means(other)

    def mean_of(like: Config, **changes: Any) -> float | None:
        """The mean of the configuration ``like`` with ``changes`` (None: not measured)."""
        if changes.get("engine") == "before":
            changes.setdefault("spare", True)
        wanted = replace(like, **changes)
        return mean.get(wanted, elsewhere.get(wanted))

    out = []
    for config, rs in by_config.items():
        floor = sum(r["floor_s"] for r in rs) / len(rs)
        before = mean_of(config, engine="before", threads=1)
        one = mean_of(config, threads=1)
        no_spare = mean_of(config, spare=False) if config.engine == "now" else None
        peak = max(r["vm_hwm"] for r in result["records"] if r["config"] == config)
        ratio = {"before": before, "one": one, "no_spare": no_spare}
        ratio = {k: (v / mean[config] if v else None) for k, v in ratio.items()}
        out.append(
            [
                result["model"], result["rank"], config.label, config.workers, len(rs), mean[config], floor,
                mean[config] / floor, ratio["before"], ratio["one"],
                ratio["no_spare"], peak / MB, peak / result["largest_f32"],
            ]
        )  # fmt: skip
    return out


SUMMARY = [
    "model",
    "rank",
    "engine",
    "threads",
    "steady ckpts",
    "mean ingest s",
    "mean floor s",
    "ingest / floor",
    "speed-up vs before",
    "speed-up vs 1 thread",
    "speed-up vs no spare",
    "max peak RSS MB",
    "RSS / largest f32",
]


def report(results: list[dict[str, Any]]) -> str:
    """Markdown: the per-checkpoint table, then the steady-state summary per configuration."""
    rows = [r for res in results for r in res["rows"]]
    summary = [r for res in results for r in summary_rows(res, results)]
    return (
        markdown_table(HEADERS, rows)
        + "\n\nSteady state (checkpoints ≥ 2 that are not anchors):\n\n"
        + markdown_table(SUMMARY, summary)
    )


def default_configs(threads: Sequence[int], before: bool, busy: bool, no_spare: bool = False) -> list[Config]:
    configs = [Config("before", 1)] if before else []
    most = DEFAULT if DEFAULT in threads else max(threads)
    configs += [Config("now", most, spare=False)] if no_spare else []
    configs += [Config("now", n) for n in threads]
    if busy:
        configs += [Config("now", n, busy=True) for n in threads]
        configs += [Config("before", 1, busy=True)] if before else []
    return configs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, DEFAULT], help="0: relexd's default")
    p.add_argument("--before", action="store_true", help=f"also the engine of {BEFORE_REV}")
    p.add_argument("--busy", action="store_true", help="also with one core kept busy, relexd at nice 10")
    p.add_argument("--no-spare", action="store_true", help="also without the spare sketch (most threads)")
    p.add_argument("--only-busy", action="store_true", help="only the configurations on a busy host")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache first (root only)")
    args = p.parse_args(argv)
    cache = page_cache_at_start(drop=args.drop_caches)
    configs = default_configs(args.threads, args.before, args.busy or args.only_busy, args.no_spare)
    if args.only_busy:
        configs = [c for c in configs if c.busy]
    shape = MODELS[args.model]
    check_scratch_space(scratch_bytes(shape, args.rank, args.checkpoints, len(configs)))
    print(report([run(shape, args.rank, args.checkpoints, configs)]) + f"\n\n_{cache}_")


if __name__ == "__main__":
    main()
