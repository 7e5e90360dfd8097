"""The fused chunk kernels (relexd.math.kernels) against the torch calls they replace, per 1 M elements.

Both sides stream the same bf16 checkpoint and base, float32 basis rows and bf16 anchor through
memory in 1 M-element chunks (the engine's ``CHUNK_ELEMS``), over arrays far larger than the CPU's
caches, as an ingest does; one thread (one tensor per core, as the engine's workers). Rounds
alternate the two sides; the table gives the median per side and their ratio.

- pass 1: torch converts the checkpoint and the base to float32, subtracts, takes ‖x‖², Qᵀx and
  the Gram products (:func:`relexd.math.sketch.chunk_products`), converts the anchor's two
  vectors and takes their products with x (one ``mv``): the engine before the kernels.
  Fused: :func:`relexd.math.kernels.pass1`.
- pass 2: torch's new columns (rank 1: ``mul`` + ``add_``; rank 2: ``mm`` + ``addr_``) against
  :func:`relexd.math.kernels.combine`.

A second table takes the fused pass 1 apart: its products alone (x given), then with the delta
formed from the checkpoint and the base, then with the anchor's two products too (all of it). Beside
each part, its memory floor: a loop that loads the same bytes from the same arrays in the same
chunks, and stores x where the part forms it, with no arithmetic but an integer sum that keeps the
loads alive. The ratio says how much faster the part could get by computing less (its float64
sums, the widening): a part at 1.0× the floor is bound by memory, not by its arithmetic.

The first table compares against the torch path, not a floor: the ingest's floor is measured end to
end by ``bench.scaling``; that table says what the kernels changed.

Run alone: ``python -m bench.kernels [--elements 16777216] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
import torch

from bench.common import machine, markdown_table
from relexd.math import kernels
from relexd.math.sketch import chunk_products

CHUNK = 1 << 20


def _per_million(fn: Callable[[int, int], None], numel: int) -> float:
    """Milliseconds per 1 M elements of ``fn`` over every chunk [i, j)."""
    started = time.perf_counter()
    for i in range(0, numel, CHUNK):
        fn(i, min(i + CHUNK, numel))
    return (time.perf_counter() - started) * 1e3 / (numel / 1e6)


Inputs = tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _inputs(rank: int, numel: int) -> Inputs:
    """The seeded generator and what it drew: bf16 checkpoint and base, ``rank`` float32 basis rows,
    the bf16 anchor's two vectors."""
    g = torch.Generator().manual_seed(0)
    ck = torch.randn(numel, generator=g).to(torch.bfloat16)
    base = torch.randn(numel, generator=g).to(torch.bfloat16)
    q = torch.randn(rank, numel, generator=g)
    v, xa = (torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(2))
    return g, ck, base, q, v, xa


def measure(rank: int, numel: int, rounds: int) -> list[tuple[str, float, float]]:
    g, ck, base, q, v, xa = _inputs(rank, numel)
    x = torch.empty(numel)
    scratch, pair, out = torch.empty(CHUNK), torch.empty(2, CHUNK), torch.empty(rank, CHUNK)
    coef = torch.randn(rank, rank + 1, generator=g)

    def pass1_torch(i: int, j: int) -> None:
        n = j - i
        x[i:j].copy_(ck[i:j])
        x[i:j].sub_(scratch[:n].copy_(base[i:j]))
        chunk_products(q[:, i:j], x[i:j])
        pair[0, :n].copy_(v[i:j])
        pair[1, :n].copy_(xa[i:j])
        torch.mv(pair[:, :n], x[i:j]).tolist()

    def pass1_fused(i: int, j: int) -> None:
        kernels.pass1(x[i:j], list(q[:, i:j]), (v[i:j], xa[i:j]), (ck[i:j], base[i:j]))

    def pass2_torch(i: int, j: int) -> None:
        acc = out[:, : j - i]
        if rank == 1:
            torch.mul(q[0, i:j], float(coef[0, 0]), out=acc[0])
            acc[0].add_(x[i:j], alpha=float(coef[0, 1]))
        else:
            torch.mm(coef[:, :rank], q[:, i:j], out=acc)
            acc.addr_(coef[:, rank], x[i:j])

    def pass2_fused(i: int, j: int) -> None:
        kernels.combine(list(out[:, : j - i]), list(q[:, i:j]), x[i:j], coef)

    sides = {
        "pass 1, torch": pass1_torch,
        "pass 1, fused": pass1_fused,
        "pass 2, torch": pass2_torch,
        "pass 2, fused": pass2_fused,
    }
    for fn in sides.values():  # compile, fault the buffers in
        fn(0, CHUNK)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(_per_million(fn, numel))
    med = {name: statistics.median(t) for name, t in times.items()}
    return [
        ("pass 1", med["pass 1, torch"], med["pass 1, fused"]),
        ("pass 2", med["pass 2, torch"], med["pass 2, fused"]),
    ]


@numba.njit(nogil=True)
def _stream(x, q0, q1, k, ck, base, anchored, v, xa, x_out):
    """The memory floor of a pass 1 part: load x (where ``x_out`` is empty) or the checkpoint
    and the base (where it is not: x is then stored into it, as pass 1 stores the delta), ``k``
    basis rows, and the anchor's two vectors where ``anchored``; every element once, in one loop
    per block of ``kernels.BLOCK`` elements like the kernel. Their bits are added up: integer
    sums keep the loads alive and cost less than the kernel's arithmetic. One loop per case, as
    in the kernel, so that each is vectorised."""
    total = np.uint32(0)
    forms = x_out.shape[0] > 0
    n = x_out.shape[0] if forms else x.shape[0]
    if k == 1:
        q1 = q0  # not loaded below: the same loops serve both ranks
    for start in range(0, n, kernels.BLOCK):
        m = min(kernels.BLOCK, n - start)
        # slices indexed from 0, as in the kernel: numba then drops the negative-index check
        end = start + m
        x_b, q0_b, q1_b, out = x[start:end], q0[start:end], q1[start:end], x_out[start:end]
        ck_b, base_b, v_b, xa_b = ck[start:end], base[start:end], v[start:end], xa[start:end]
        if not forms:
            if k == 1:
                for i in range(m):
                    total += x_b[i] + q0_b[i]
            else:
                for i in range(m):
                    total += x_b[i] + q0_b[i] + q1_b[i]
        elif not anchored:
            if k == 1:
                for i in range(m):
                    out[i] = np.uint32(ck_b[i]) + np.uint32(base_b[i]) + q0_b[i]
            else:
                for i in range(m):
                    out[i] = np.uint32(ck_b[i]) + np.uint32(base_b[i]) + q0_b[i] + q1_b[i]
        elif k == 1:
            for i in range(m):
                stored = np.uint32(ck_b[i]) + np.uint32(base_b[i])
                out[i] = stored + q0_b[i] + np.uint32(v_b[i]) + np.uint32(xa_b[i])
        else:
            for i in range(m):
                stored = np.uint32(ck_b[i]) + np.uint32(base_b[i])
                out[i] = stored + q0_b[i] + q1_b[i] + np.uint32(v_b[i]) + np.uint32(xa_b[i])
    return total


def pass1_parts(rank: int, numel: int, rounds: int) -> list[tuple[str, float, float]]:
    """Milliseconds per 1 M elements of the fused pass 1 as it takes on more of its work, and of
    streaming the bytes each part loads and stores (:func:`_stream`)."""
    if rank not in (1, 2):
        raise ValueError(f"the memory floor is written for rank 1 and 2, not {rank}")
    _, ck, base, q, v, xa = _inputs(rank, numel)
    x = ck.float() - base.float()
    _bits = kernels._bits  # the bits the kernel reads, as it takes them
    x_bits, q0, q1 = _bits(x), _bits(q[0]), _bits(q[-1])
    ck16, base16, v16, xa16 = _bits(ck), _bits(base), _bits(v), _bits(xa)
    none32, none16 = np.zeros(0, np.uint32), np.zeros(0, np.uint16)

    def floor(forms: bool, anchored: bool) -> Callable[[int, int], None]:
        def stream(i: int, j: int) -> None:
            stored = (ck16[i:j], base16[i:j]) if forms else (none16, none16)
            anchor = (v16[i:j], xa16[i:j]) if anchored else (none16, none16)
            x_in, x_out = (none32, x_bits[i:j]) if forms else (x_bits[i:j], none32)
            _stream(x_in, q0[i:j], q1[i:j], rank, *stored, anchored, *anchor, x_out)

        return stream

    sides: dict[str, tuple[Callable[[int, int], None], Callable[[int, int], None]]] = {
        "the products of x (given) with itself and the basis": (
            lambda i, j: kernels.pass1(x[i:j], list(q[:, i:j])),
            floor(forms=False, anchored=False),
        ),
        "… with x formed from the checkpoint and the base": (
            lambda i, j: kernels.pass1(x[i:j], list(q[:, i:j]), None, (ck[i:j], base[i:j])),
            floor(forms=True, anchored=False),
        ),
        "… and the anchor's two products (all of pass 1)": (
            lambda i, j: kernels.pass1(x[i:j], list(q[:, i:j]), (v[i:j], xa[i:j]), (ck[i:j], base[i:j])),
            floor(forms=True, anchored=True),
        ),
    }
    for part, stream in sides.values():
        part(0, CHUNK)
        stream(0, CHUNK)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
    for _ in range(rounds):
        for name, (part, stream) in sides.items():
            times[name][0].append(_per_million(part, numel))
            times[name][1].append(_per_million(stream, numel))
    return [(name, statistics.median(t), statistics.median(f)) for name, (t, f) in times.items()]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 24)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    for rank in (1, 2):
        for phase, t_torch, t_fused in measure(rank, args.elements, args.rounds):
            rows.append((rank, phase, f"{t_torch:.2f}", f"{t_fused:.2f}", f"{t_torch / t_fused:.2f}×"))
    table = markdown_table(["rank", "phase", "torch ms / 1 M", "fused ms / 1 M", "speed-up"], rows)
    parts = []
    for rank in (1, 2):
        parts += [
            (rank, part, f"{ms:.2f}", f"{floor:.2f}", f"{ms / floor:.2f}×")
            for part, ms, floor in pass1_parts(rank, args.elements, args.rounds)
        ]
    parts_table = markdown_table(
        ["rank", "fused pass 1 doing", "ms / 1 M", "memory floor ms / 1 M", "part / floor"], parts
    )
    report = (
        f"# Fused chunk kernels against torch\n\n{machine()}\n\n"
        f"`python -m bench.kernels --elements {args.elements} --rounds {args.rounds}`: medians of "
        f"{args.rounds} alternating rounds, one thread, 1 M-element chunks over arrays of "
        f"{args.elements / 1e6:.0f} M elements\n\n{table}\n\n"
        f"## The fused pass 1, part by part\n\n{parts_table}\n"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
