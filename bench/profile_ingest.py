"""Where a steady ingest's CPU goes: ``perf`` over the whole host while one steady checkpoint is
ingested by relexd's default engine, its samples grouped into the engine's phases.

Why perf and not py-spy or torch's profiler: a cached ingest spends much of its CPU in the kernel
(copying page-cache pages, mapping them, writing the new sketch, the flusher threads writing it
back), which neither sees. ``-a`` records every CPU, so the kernel's writeback threads count too:
they run because of the ingest. The phases are sums over the symbols each stands for
(:data:`PHASES`, first match wins); the table lists the rest's top symbols too, so nothing is hidden
in "other".

Needs ``perf`` (Debian: linux-perf) and the right to record every CPU (root, or
kernel.perf_event_paranoid ≤ -1). Run alone: ``python -m bench.profile_ingest [--model 0.5b]
[--rank 1] [--steady 3] [--freq 499] [--data perf.data]`` (``--from perf.data``: summarise a
kept recording again); the state is built first from four checkpoints, anchor
checkpoints are ingested unprofiled, and the ``--steady``-th steady ingest is the one profiled (the
ones before it leave the page cache as a running ``relexd watch`` would). From the fifth checkpoint on,
one engine ingests them all, as ``relexd watch`` keeps one open (its kept task buffers included).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine, markdown_table
from bench.common import scratch_dir as scratch
from bench.ingest import MODELS
from bench.scaling import BUILD_CHECKPOINTS, DEFAULT, Run

#: phase → symbol patterns (regular expressions over perf's "dso symbol" text), first match wins
PHASES: list[tuple[str, str]] = [
    # numba's compiled code has no symbols perf can name: it shows as "[JIT] tid …"
    ("fused kernels (numba: delta, products, anchor, new columns)", r"\[JIT\]"),
    ("copy out of the page cache (pread of checkpoint and base)", r"_copy_to_iter|copy_user"),
    (
        "zeroing fresh anonymous pages (first touch of a worker's buffers in this ingest)",
        r"clear_page|do_anonymous_page|clear_huge_page|folio_zero_user",
    ),
    ("bf16 → float32 conversions", r"reduced_float_copy|convert|bfloat16"),
    ("BLAS (dot, gemv, gemm)", r"mkl_blas|sdot|sgemv|sgemm"),
    (
        "new sketch into the page cache and back to the disk",
        r"copy_folio_from_iter|ext4_|iomap|writeback|blk_|virtio|nvme|bio_|folio_",
    ),
    (
        "mapping state pages in and out (and the TLB flushes of unmapping them)",
        r"fault|madvise|zap_|unmap|filemap_map|populate|tlb|pte|pmd|smp_call_function",
    ),
    ("threads waking each other", r"finish_task_switch|spin_unlock_irqrestore|futex|schedule|wake"),
    ("torch elementwise kernels (delta, new columns)", r"VectorizedLoop|function_ref|vectorized|at::native"),
    ("Python interpreter", r"libpython|_PyEval|gc_collect"),
]


def phase_of(symbol: str) -> str:
    for name, pattern in PHASES:
        if re.search(pattern, symbol):
            return name
    return "other"


def perf_report(data: Path) -> list[tuple[float, str, str]]:
    """(share %, command, "dso symbol") per symbol of the recording, largest first."""
    command = ["perf", "report", "-i", str(data), "--no-children", "--sort", "comm,dso,sym", "-g", "none"]
    text = subprocess.run([*command, "--stdio"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    return rows


def record(model: str, rank: int, steady: int, freq: int, data: Path) -> tuple[float, float]:
    """Build the state, then record the ``steady``-th steady ingest into ``data``; returns its
    (seconds, CPU seconds of the process)."""
    if shutil.which("perf") is None:
        raise SystemExit("profile_ingest: needs perf (Debian: apt-get install linux-perf)")
    with scratch(f"profile-{model}-k{rank}") as tmp:
        run = Run(MODELS[model], rank, tmp)
        for _ in range(BUILD_CHECKPOINTS):
            run.ingest(DEFAULT)
        with run.engine(DEFAULT) as engine:  # one engine from here on, as `relexd watch` keeps
            for _ in range(steady - 1):
                while run.next_is_anchor():
                    run.ingest(DEFAULT, engine=engine)
                seconds, cpu = run.ingest(DEFAULT, engine=engine)
                print(f"steady (unprofiled): {seconds:.2f} s, CPU {cpu:.1f} s", flush=True)
            while run.next_is_anchor():
                run.ingest(DEFAULT, engine=engine)
            ckpt = run.checkpoint()
            perf = subprocess.Popen(
                ["perf", "record", "-a", "-g", "-F", str(freq), "-o", str(data)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # perf's start-up, outside the ingest
            seconds, cpu = run.ingest(DEFAULT, ckpt_step=ckpt, engine=engine)
            perf.send_signal(signal.SIGINT)
            perf.wait()
    return seconds, cpu


def summarise(data: Path, heading: str) -> str:
    """The recording ``data`` by phase and by symbol, as markdown under ``heading``."""
    # the idle loop ("swapper") is no work: shares are of the samples of work, every CPU
    busy = [r for r in perf_report(data) if not r[1].startswith("swapper")]
    total = sum(r[0] for r in busy) or 1.0
    rows = [(100.0 * share / total, comm, sym) for share, comm, sym in busy]
    phase = {sym: phase_of(sym) for _, _, sym in rows}
    phases: dict[str, float] = {}
    for share, _command, sym in rows:
        phases[phase[sym]] = phases.get(phase[sym], 0.0) + share
    top_other = [row for row in rows if phase[row[2]] == "other"][:12]
    table = markdown_table(
        ["phase", "share of samples, every CPU"],
        [(name, f"{share:.1f} %") for name, share in sorted(phases.items(), key=lambda kv: -kv[1])],
    )
    columns = ["share", "command", "symbol"]
    other = markdown_table(columns, [(f"{s:.2f} %", c, sym) for s, c, sym in top_other])
    top = markdown_table(columns, [(f"{s:.2f} %", c, sym) for s, c, sym in rows[:25]])
    return (
        f"{heading}\n\n## By phase\n\n{table}\n\n## Top symbols\n\n{top}\n\n"
        f"## Top symbols counted as other\n\n{other}\n"
    )


def profile(model: str, rank: int, steady: int, freq: int, keep: Path | None = None) -> str:
    with scratch("profile-data") as tmp:
        data = keep or tmp / "perf.data"
        seconds, cpu = record(model, rank, steady, freq, data)
        heading = (
            f"# Profile of one steady ingest: {model}, rank {rank}, relexd's default workers\n\n"
            f"{machine()}\n\n`python -m bench.profile_ingest --model {model} --rank {rank} "
            f"--steady {steady} --freq {freq}{f' --data {keep}' if keep else ''}` "
            f"(the process is `{os.path.basename(sys.executable)}`; "
            f"perf records every CPU, 1 s before the ingest included)\n\n"
            f"The profiled ingest: {seconds:.2f} s, {cpu:.1f} s of the process's CPU."
        )
        return summarise(data, heading)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--steady", type=int, default=3)
    parser.add_argument("--freq", type=int, default=499)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--data", type=Path, default=None, help="keep perf's recording here")
    parser.add_argument("--from", dest="source", type=Path, default=None, help="summarise a kept recording")
    args = parser.parse_args(argv)
    if args.source is not None:
        text = summarise(args.source, f"# Profile: {args.source}")
    else:
        text = profile(args.model, args.rank, args.steady, args.freq, args.data)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
