"""Run every benchmark in sequence and write the tables to bench/results/<mode>/<benchmark>.md.

``python -m bench.run_all --quick`` (small shapes, a few minutes), ``python -m bench.run_all``
(0.5B shapes, the configurations of bench/README.md) or ``… --large`` (adds the 1.5B-shaped ingest).
``--only ingest preview`` runs a subset; ``formats`` compares the checkpoint formats; ``demo`` is
the demo's extrapolation table (5 demo runs, ~8 min, or 2 with ``--quick``); ``trust`` which of
relexd's signals said "trust" when a preview lost, over 4 learning rates × 3 seeds (~40 min; 2 runs
with ``--quick``); ``beside`` what relexd costs a training loop it follows (~6 min); ``cluster`` ingest
on 1 and 2 Ray workers against 2 local threads (~7 min, the ``relexd[ray]`` extra); ``spare`` the
spare sketch against none, paired on copies of one state (~12 min); ``paired`` today's engine
against the one before the fused pass 1, on copies of one state, cached and evicted (~10 min);
``page-cache`` today's engine against the one before it dropped the replaced sketch from the page
cache, in alternating blocks of steady ingests of one 1.5B state that outgrows the page cache
(~25 min, ~50 GB of scratch disk; small shapes with ``--quick``, which only exercises it);
``scaling`` ingest time per worker count (1, 2, 4 … every core) on one 0.5B state, and the state of
1 worker against the most, bit for bit (~5 min here).
Benchmarks run one after another, never concurrently, each in its own temp dir under /tmp that is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from bench import ingest, preview_write
from bench.common import machine, page_cache_at_start, scratch_dir
from bench.synthetic import QWEN25_05B, QWEN25_15B, ModelShape
from relexd.engine.config import DEFAULT_RANK

BENCHMARKS = (
    "accuracy", "accuracy-demo", "batch", "ingest", "preview", "formats", "demo", "trust", "beside",
    "cluster", "spare", "paired", "page-cache", "scaling",
)  # fmt: skip
RESULTS = Path(__file__).parent / "results"


def ingest_plan(quick: bool, large: bool) -> list[tuple[ModelShape, int, int, list[ingest.Config]]]:
    """The ingest runs, each ``(shape, rank, checkpoints, [one configuration])``; the first is today's
    engine at relexd's default, whose final state the preview benchmark reuses.

    Each configuration follows its run alone, with its own state, one after another on the same
    seeded checkpoints: one relexd following one run has one state, and until 6 Dec this bench kept
    four side by side, whose states together outgrew the page cache and made every ratio the page
    cache's worst case. The summary compares the runs of one model and rank with each other
    (:func:`bench.ingest.summary_rows`).

    Full mode: 0.5B shapes at the default rank and at rank 1, each with today's engine at the default
    worker count, at 1 worker and without the spare sketch, and the engine before the worker pool;
    then a busy host (one core kept busy, relexd at nice 10). ``--large`` adds the 1.5B shapes,
    today's engine at the default and at 1 worker and the engine before."""
    now, one = ingest.Config("now", ingest.DEFAULT), ingest.Config("now", 1)
    before = ingest.Config("before", 1)
    no_spare = ingest.Config("now", ingest.DEFAULT, spare=False)
    if quick:
        return [(QWEN25_05B.smaller(2, 16384), DEFAULT_RANK, 3, [config]) for config in (now, one)]
    plan = [
        (QWEN25_05B, rank, 5, [config])
        for rank in (DEFAULT_RANK, 1)
        for config in (now, one, no_spare, before)
    ]
    plan += [(QWEN25_05B, DEFAULT_RANK, 3, [replace(config, busy=True)]) for config in (one, now, before)]
    if large:
        plan += [
            (QWEN25_15B, rank, 3, [config]) for rank in (DEFAULT_RANK, 1) for config in (now, one, before)
        ]
    return plan


def run_ingest_and_preview(
    quick: bool, do_ingest: bool, do_preview: bool, large: bool = False
) -> dict[str, str]:
    """The runs of :func:`ingest_plan`, one after another; the first one's final state is reused by
    the preview benchmark."""
    out: dict[str, str] = {}
    first, *rest = ingest_plan(quick, large)
    shape, rank, checkpoints, _ = first
    # what stays for the preview benchmark: the first run's base and state, and its previews (two
    # rounds of relexd's preview and of a plain safetensors save: preview_write.run)
    previews = 4 * ingest.model_bytes(shape) if do_preview else 0
    kept = ingest.model_bytes(shape) + ingest.state_bytes(shape, rank, checkpoints) + previews
    plan = [first, *rest] if do_ingest else [first]
    ingest.check_scratch_space(kept + max(ingest.scratch_bytes(s, k, n, len(c)) for s, k, n, c in plan))
    with scratch_dir("run-all") as tmp:
        results = [ingest.run(*first, keep_state=tmp / "kept")]
        if do_preview:
            pv = preview_write.run(tmp / "kept" / "state", tmp / "kept" / "base", tmp)
            out["preview"] = f"model shape {first[0].name}\n\n" + preview_write.report(pv)
        if do_ingest:
            results += [ingest.run(*args) for args in rest]
            out["ingest"] = ingest.report(results)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few steps (minutes)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument(
        "--large",
        action="store_true",
        help="also 1.5B shapes: today's engine at the default and at 1 worker, and the one before (+~25 min)",
    )
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="write back and drop the page cache before the first benchmark (root only)",
    )
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    outdir = RESULTS / mode
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # where the benchmarks' files compete with others' for the page cache, the figures say so
    cache = page_cache_at_start(drop=args.drop_caches)
    print(f"{machine()}; {cache}", flush=True)

    def save(name: str, text: str, seconds: float) -> None:
        text = f"{text}\n\n_{name}: {seconds:.0f} s wall; {machine()}; at the start of the run, {cache}_\n"
        (outdir / f"{name}.md").write_text(text)
        print(f"\n## {name}\n\n{text}", flush=True)

    if "accuracy" in args.only:
        from bench import accuracy

        t0 = time.perf_counter()
        save("accuracy", accuracy.report(accuracy.run(quick=args.quick)), time.perf_counter() - t0)
    if "accuracy-demo" in args.only:
        from bench import accuracy_demo

        t0 = time.perf_counter()
        result = accuracy_demo.run_fresh(steps=40 if args.quick else 60, observe=20 if args.quick else 30)
        save("accuracy-demo", accuracy_demo.report(result), time.perf_counter() - t0)
    if "batch" in args.only:
        from bench import batch_baseline

        t0 = time.perf_counter()
        save("batch", batch_baseline.report(batch_baseline.run(quick=args.quick)), time.perf_counter() - t0)
    if "ingest" in args.only or "preview" in args.only:
        t0 = time.perf_counter()
        texts = run_ingest_and_preview(args.quick, "ingest" in args.only, "preview" in args.only, args.large)
        for name, text in texts.items():
            save(name, text, time.perf_counter() - t0)
    if "formats" in args.only:
        from bench import formats

        t0 = time.perf_counter()
        result = formats.run(layers=2, vocab=16384) if args.quick else formats.run()
        save("formats", formats.report(result), time.perf_counter() - t0)
    if "demo" in args.only:
        from bench import demo_table

        t0 = time.perf_counter()
        configs = demo_table.QUICK if args.quick else demo_table.FULL
        save("demo", demo_table.report(demo_table.run(configs)), time.perf_counter() - t0)
    if "trust" in args.only:
        from bench import demo_trust

        t0 = time.perf_counter()
        lrs, seeds = (
            ((demo_trust.LRS[0], demo_trust.LRS[-1]), (0,))
            if args.quick
            else (demo_trust.LRS, demo_trust.SEEDS)
        )
        save("demo-trust", demo_trust.report(demo_trust.run(lrs, seeds)), time.perf_counter() - t0)
    if "beside" in args.only:
        from bench import beside_trainer

        t0 = time.perf_counter()
        steps, rounds = (24, 1) if args.quick else (80, 3)
        text = beside_trainer.run_and_report(steps, rounds, beside_trainer.trainer_threads())
        save("beside-trainer", text, time.perf_counter() - t0)
    if "spare" in args.only:
        from bench import spare

        t0 = time.perf_counter()
        shape = QWEN25_05B.smaller(2, 16384) if args.quick else QWEN25_05B
        result = spare.run(shape, DEFAULT_RANK, 2 if args.quick else 4)
        save("spare", spare.report(result), time.perf_counter() - t0)
    if "paired" in args.only:
        from bench import paired

        t0 = time.perf_counter()
        shape = QWEN25_05B.smaller(2, 16384) if args.quick else QWEN25_05B
        result = paired.run(shape, DEFAULT_RANK, 1 if args.quick else 3, paired.BEFORE_REV)
        save("paired", paired.report(result), time.perf_counter() - t0)
    if "page-cache" in args.only:
        from bench import page_cache

        t0 = time.perf_counter()
        shape = QWEN25_05B.smaller(2, 16384) if args.quick else QWEN25_15B
        blocks, size = (2, 3) if args.quick else (4, 4)
        result = page_cache.run(shape, DEFAULT_RANK, blocks, size, page_cache.BEFORE_REV)
        save("page-cache", page_cache.report(result), time.perf_counter() - t0)
    if "scaling" in args.only:
        from bench import scaling

        t0 = time.perf_counter()
        shape = QWEN25_05B.smaller(2, 16384) if args.quick else QWEN25_05B
        rounds = 1 if args.quick else 2
        result = scaling.run(shape, DEFAULT_RANK, scaling.thread_counts(), rounds, equality=True)
        save("scaling", scaling.report(result), time.perf_counter() - t0)
    if "cluster" in args.only:
        from bench import cluster

        t0 = time.perf_counter()
        shape = QWEN25_05B.smaller(2, 16384) if args.quick else QWEN25_05B
        result = cluster.run(3 if args.quick else 5, DEFAULT_RANK, shape)
        save("cluster", cluster.report(result), time.perf_counter() - t0)
    print(f"\nall done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
