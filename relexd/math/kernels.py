"""Fused chunk kernels of an ingest's two passes (pure math, no file I/O), compiled by numba.

Why by hand, and not torch: torch runs pass 1 of a chunk as a string of kernels — convert the
checkpoint's bf16 to float32, convert the base's, subtract, ‖x‖², Qᵀx, the Gram products, convert
the anchor's two vectors, two more dot products — and each streams the 1 M-element chunk through
memory again. :func:`pass1` does all of it in one loop, reading every input once and writing only
the delta; :func:`combine` does pass 2's new columns in one loop too. Measured on one core of an
Intel Xeon 2-vCPU VM, per 1 M elements of arrays far larger than its caches (``python -m
bench.kernels``, bench/results/full/kernels-7dec-one-loop.md): pass 1 3.5 ms with torch against
1.3 at rank 1, 4.8 against 1.8 at rank 2; pass 2 0.9 against 0.7 and 2.2 against 1.3. All of pass 1
takes 1.17-1.25× the time of a loop that only loads its inputs and stores x (its memory floor,
same run). The float32 products are summed in float64 element by element, more accurate than
float32 BLAS (which sums in float32 blocks).

torch.compile was measured too (bench/README.md, 5 Dec) but needs a C++ compiler in the daemon;
numba brings its own LLVM.

Stored values are widened to float32 by their bits (:func:`_as_float32`): bfloat16 is the upper
half of a float32, so ``bits << 16`` is exact; float32 is ``bits << 0``. Other stored dtypes take
the torch path (:func:`widens` says which).

Numerics: the loops may be reassociated and contracted (vectorised sums, fused multiply-adds), but
not compiled under the assumption that no NaN or Inf occurs — a non-finite input must reach ‖x‖²,
which is how the engine notices it (``tests/math/test_kernels.py``). The order of the sums depends
only on the chunk, never on which thread runs it, so the state stays equal for any worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import intrinsic, overload

#: Elements per block: pass 1's loops run over one block's slices at a time (:func:`_pass1`), and
#: its sums are taken in that order.
BLOCK = 2048

#: Rows of the old basis the fused loop takes (Brand at rank ≤ 2, Oja); wider ones take torch.
MAX_ROWS = 2

#: Stored dtypes :func:`_as_float32` widens by their bits (see the module's docstring).
_WIDENED = frozenset({torch.bfloat16, torch.float32})

# reassociation and contraction only: "fast" would also assume that no NaN or Inf occurs
_FAST = {"reassoc", "contract", "nsz", "arcp"}


def _jit(fn):
    """Compile ``fn`` on first call, keeping the machine code in numba's cache directory
    (``NUMBA_CACHE_DIR``; the systemd unit sets one): 0.3 s to load instead of 4 s to compile
    every kind :func:`prepare` asks for. Where no directory is writable (numba refuses
    ``cache=True`` then, at decoration: an installed package under ProtectSystem=strict), compile
    in memory in every process instead."""
    try:
        return numba.njit(fastmath=_FAST, nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(fastmath=_FAST, nogil=True)(fn)


def widens(dtype: torch.dtype) -> bool:
    """Whether pass 1 takes values stored as ``dtype`` (widened to float32 by their bits)."""
    return dtype in _WIDENED


@dataclass(frozen=True)
class ChunkProducts:
    """One chunk's sums: ‖x‖², the old basis rows' products with x and with each other, and an
    anchor's two products with x."""

    xsq: float
    qtx: tuple[float, ...]  # q_r · x for each row r taken
    gram: tuple[tuple[float, ...], ...]  # q_r · q_s (symmetric)
    anchor: tuple[float, float] | None  # (x · v_a, x · x_a)


_EMPTY32 = np.zeros(0, dtype=np.float32)


def _bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a contiguous 1-D bfloat16 or float32 tensor as an unsigned numpy array."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.view(torch.int32).numpy().view(np.uint32)


def pass1(
    x: torch.Tensor,
    rows: list[torch.Tensor],
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
    delta_of: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ChunkProducts:
    """Pass 1 over one chunk: the products of x with itself, with each of ``rows`` (≤ MAX_ROWS
    basis rows, float32) and with ``anchor``'s (v_a, x_a) where given.

    ``delta_of`` = (checkpoint, base): x is formed first as checkpoint − base into ``x``
    (float32, as long as both), from their stored bits. Every tensor is contiguous and 1-D; the
    stored ones are bfloat16 or float32 (:func:`widens`).
    """
    n = x.numel()
    if len(rows) > MAX_ROWS:
        raise ValueError(f"pass1 takes at most {MAX_ROWS} basis rows, not {len(rows)}")
    xs = x.numpy()
    q = [r.numpy() for r in rows] + [_EMPTY32] * (MAX_ROWS - len(rows))
    ck_bits = base_bits = v_bits = xa_bits = None  # None: compiled out of the loop (_x_at)
    if delta_of is not None:
        ck, base = delta_of
        if ck.numel() != n or base.numel() != n:
            raise ValueError(
                f"checkpoint ({ck.numel()}) and base ({base.numel()}) chunks differ from x ({n})"
            )
        if not (widens(ck.dtype) and widens(base.dtype)):
            raise ValueError(f"pass1 forms deltas of bfloat16 or float32 only, not {ck.dtype} − {base.dtype}")
        ck_bits, base_bits = _bits(ck), _bits(base)
    if anchor is not None:
        if not all(widens(a.dtype) for a in anchor):
            raise ValueError(f"pass1 takes anchors of bfloat16 or float32 only, not {anchor[0].dtype}")
        v_bits, xa_bits = _bits(anchor[0]), _bits(anchor[1])
    out = np.zeros(8)
    _pass1(xs, ck_bits, base_bits, len(rows), q[0], q[1], v_bits, xa_bits, out)
    k = len(rows)
    qtx = tuple(float(v) for v in out[1 : 1 + k])
    g = ((out[3],), (out[4], out[5]))
    gram = tuple(tuple(float(g[max(r, s)][min(r, s)]) for s in range(k)) for r in range(k))
    return ChunkProducts(
        float(out[0]), qtx, gram, (float(out[6]), float(out[7])) if anchor is not None else None
    )


def prepare(stored: set[torch.dtype], anchor: torch.dtype) -> None:
    """Compile (or load from numba's cache) the kernels for checkpoints stored as ``stored``, with
    anchors stored as ``anchor``, before the first ingest: that ingest then runs at full speed, and
    the compiler's memory is taken while the daemon starts, not while a tensor is in flight."""
    x = torch.zeros(1)
    pair = (torch.zeros(1, dtype=anchor), torch.zeros(1, dtype=anchor))
    # one machine code per kind of input, absent ones included (_x_at, _block): with and without
    # an anchor, x formed from each stored dtype or given
    kinds = [d for d in stored if widens(d)]
    for delta in [*((torch.zeros(1, dtype=d), torch.zeros(1, dtype=d)) for d in kinds), None]:
        for scored in (pair, None):
            pass1(x, [], scored, delta)
    combine([torch.zeros(1)], [], x, torch.zeros(1, 1))
    anchor_vectors(x, x, *pair)


@intrinsic
def _as_float32(typingctx, bits):
    """The float32 whose bits are ``bits`` widened: a bfloat16's 16 bits are a float32's upper half
    (``bits << 16``, exact), a float32's 32 are its own. A bit cast the compiler can vectorise,
    which numba has no scalar form of (``.view`` is for arrays only): with it each stored value is
    widened where it is used, in the products loop, instead of in a loop of its own through a
    scratch block (pass 1 at rank 1 with an anchor, ``python -m bench.kernels``: 1.65× its memory
    floor before, 1.25× with it; bench/results/full/kernels-7dec*.md)."""
    if bits not in (types.uint16, types.uint32):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        word = context.get_value_type(types.uint32)
        if signature.args[0] == types.uint16:
            value = builder.shl(builder.zext(value, word), context.get_constant(types.uint32, 16))
        return builder.bitcast(value, context.get_value_type(types.float32))

    return types.float32(bits), codegen


def _block(a, start, stop):
    """``a[start:stop]``, or None where ``a`` is None (an input pass 1 was not given)."""


@overload(_block, inline="always")
def _block_impl(a, start, stop):
    if isinstance(a, types.NoneType):
        return lambda a, start, stop: None
    return lambda a, start, stop: a[start:stop]


def _x_at(x, ck, base, i):
    """Element i of the delta: formed from the checkpoint's and the base's stored values and
    written to ``x[i]``, or, where they are None, ``x[i]`` as given. Chosen by the arguments' types
    when the kernel is compiled, so that the loop holds no test of it."""


@overload(_x_at, inline="always")
def _x_at_impl(x, ck, base, i):
    if isinstance(ck, types.NoneType):
        return lambda x, ck, base, i: x[i]

    def formed(x, ck, base, i):
        value = _as_float32(ck[i]) - _as_float32(base[i])
        x[i] = value
        return value

    return formed


@_jit
def _pass1(x, ck, base, k, q0, q1, va, xa, out):
    """out = [‖x‖², q0·x, q1·x, q0·q0, q1·q0, q1·q1, x·v_a, x·x_a]; ``ck``, ``base``: the stored
    bits x is formed from (None: x is given); ``va``, ``xa``: the anchor's stored bits (None: no
    anchor). Every loop runs over slices of one block: indexing a slice from 0 lets numba drop the
    negative-index check that otherwise kept these loops from being vectorised (3× slower). Each
    element is widened, formed and converted to float64 once, in the one loop that takes all its
    products. That loop is written out per rank, with and without the anchor: the compiler did not
    take the test of the anchor out of it by itself, and the loop with it inside took 1.16-1.25×
    the time at rank 1 with an anchor (bench/README.md, "6 Dec, day")."""
    n = x.shape[0]
    xsq = q0x = q1x = g00 = g10 = g11 = xv = xxa = 0.0
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        stop = start + m
        xb, cb, bb = x[start:stop], _block(ck, start, stop), _block(base, start, stop)
        vb, ab = _block(va, start, stop), _block(xa, start, stop)
        if k == 0:
            if va is None:
                for i in range(m):
                    d = np.float64(_x_at(xb, cb, bb, i))
                    xsq += d * d
            else:
                for i in range(m):
                    d = np.float64(_x_at(xb, cb, bb, i))
                    xsq += d * d
                    xv += np.float64(_as_float32(vb[i])) * d
                    xxa += np.float64(_as_float32(ab[i])) * d
        elif k == 1:
            r0 = q0[start:stop]
            if va is None:
                for i in range(m):
                    d = np.float64(_x_at(xb, cb, bb, i))
                    a = np.float64(r0[i])
                    xsq += d * d
                    q0x += a * d
                    g00 += a * a
            else:
                for i in range(m):
                    d = np.float64(_x_at(xb, cb, bb, i))
                    a = np.float64(r0[i])
                    xsq += d * d
                    q0x += a * d
                    g00 += a * a
                    xv += np.float64(_as_float32(vb[i])) * d
                    xxa += np.float64(_as_float32(ab[i])) * d
        else:
            r0 = q0[start:stop]
            r1 = q1[start:stop]
            if va is None:
                for i in range(m):
                    d = np.float64(_x_at(xb, cb, bb, i))
                    a = np.float64(r0[i])
                    c = np.float64(r1[i])
                    xsq += d * d
                    q0x += a * d
                    q1x += c * d
                    g00 += a * a
                    g10 += c * a
                    g11 += c * c
            else:
                for i in range(m):
                    d = np.float64(_x_at(xb, cb, bb, i))
                    a = np.float64(r0[i])
                    c = np.float64(r1[i])
                    xsq += d * d
                    q0x += a * d
                    q1x += c * d
                    g00 += a * a
                    g10 += c * a
                    g11 += c * c
                    xv += np.float64(_as_float32(vb[i])) * d
                    xxa += np.float64(_as_float32(ab[i])) * d
    out[0] = xsq
    out[1] = q0x
    out[2] = q1x
    out[3] = g00
    out[4] = g10
    out[5] = g11
    out[6] = xv
    out[7] = xxa


def combine(out: list[torch.Tensor], rows: list[torch.Tensor], x: torch.Tensor, coef: torch.Tensor) -> None:
    """Pass 2 over one chunk: ``out[c] = Σ_r coef[c, r]·rows[r] + coef[c, k]·x`` (k = len(rows)),
    every float32 product and sum in float32, in one loop.

    ``out``: 1 or 2 rows (the new basis vectors), ``rows``: at most :data:`MAX_ROWS` rows of the
    old basis, ``coef``: len(out) × (k + 1). Why not torch: its GEMM and rank-1 update write
    the new columns and then read and write them again (at rank 2, 2.3 ms per 1 M elements against
    1.4 here; rank 1, 1.0 against 0.7: ``python -m bench.kernels``)."""
    k = len(rows)
    if not 1 <= len(out) <= 2 or k > MAX_ROWS or tuple(coef.shape) != (len(out), k + 1):
        raise ValueError(
            f"combine takes 1-2 outputs of ≤ {MAX_ROWS} rows and x, not {len(out)}, {k}, {tuple(coef.shape)}"
        )
    q = [r.numpy() for r in rows] + [_EMPTY32] * (MAX_ROWS - k)
    outs = [o.numpy() for o in out] + [_EMPTY32] * (2 - len(out))
    c = np.zeros((2, MAX_ROWS + 1), dtype=np.float32)
    c[: len(out), :k] = coef[:, :k].numpy()
    c[: len(out), MAX_ROWS] = coef[:, k].numpy()
    _combine(outs[0], outs[1], len(out), q[0], q[1], k, x.numpy(), c)


@_jit
def _combine(o0, o1, nout, q0, q1, k, x, c):
    """c: 2 × 3 coefficients, column 2 for x. One loop per case, each vectorised."""
    a0, b0, e0 = c[0, 0], c[0, 1], c[0, 2]
    a1, b1, e1 = c[1, 0], c[1, 1], c[1, 2]
    n = x.shape[0]
    if nout == 1:
        if k == 0:
            for i in range(n):
                o0[i] = e0 * x[i]
        elif k == 1:
            for i in range(n):
                o0[i] = a0 * q0[i] + e0 * x[i]
        else:
            for i in range(n):
                o0[i] = a0 * q0[i] + b0 * q1[i] + e0 * x[i]
    elif k == 0:
        for i in range(n):
            w = x[i]
            o0[i] = e0 * w
            o1[i] = e1 * w
    elif k == 1:
        for i in range(n):
            u = q0[i]
            w = x[i]
            o0[i] = a0 * u + e0 * w
            o1[i] = a1 * u + e1 * w
    else:
        for i in range(n):
            u = q0[i]
            v = q1[i]
            w = x[i]
            o0[i] = a0 * u + b0 * v + e0 * w
            o1[i] = a1 * u + b1 * v + e1 * w


def anchor_vectors(
    v: torch.Tensor, x: torch.Tensor, v_out: torch.Tensor, x_out: torch.Tensor
) -> tuple[float, float]:
    """Pass 2's new anchor over one chunk: ``v`` (the new direction) and ``x`` (the delta), float32,
    stored into ``v_out`` and ``x_out`` in the anchor's dtype — bfloat16 rounded to nearest even, as
    ``Tensor.to`` rounds, or float32 copied — and the squared norms of the values as stored,
    summed in float64 (the forecast scored against the anchor uses exactly those values).

    Why not torch: two conversions, two conversions back and two dot products per chunk, each a
    pass over it and the first two a fresh allocation. In one loop, an anchor checkpoint of a 0.5B
    rank-1 run took 3.77 s of CPU instead of 5.47 and 2.42 s instead of 3.30 (paired, 3 rounds;
    bench/results/full/anchor-kernel-7dec-amd.md)."""
    n = v.numel()
    if x.numel() != n or v_out.numel() != n or x_out.numel() != n:
        lengths = (n, x.numel(), v_out.numel(), x_out.numel())
        raise ValueError(f"anchor chunks differ in length: {lengths}")
    if v.dtype != torch.float32 or x.dtype != torch.float32:
        raise ValueError(f"anchor_vectors takes float32 vectors, not {v.dtype} and {x.dtype}")
    if v_out.dtype != x_out.dtype or not widens(v_out.dtype):
        raise ValueError(f"anchors are stored as bfloat16 or float32, not {v_out.dtype} and {x_out.dtype}")
    out = np.zeros(2)
    _anchor_vectors(_bits(v), _bits(x), _bits(v_out), _bits(x_out), out)
    return float(out[0]), float(out[1])


def _stored_bits(u, dst):
    """The bits that float32 bits ``u`` are stored as in ``dst``'s dtype: bfloat16 rounded to
    nearest even, as torch rounds (a NaN, which an ingest never stores, becomes 0x7FC0, torch's
    scalar NaN; its vectorised conversion writes 0xFFFF), float32 as is. Chosen by ``dst``'s type
    when the kernel is compiled."""


@overload(_stored_bits, inline="always")
def _stored_bits_impl(u, dst):
    if dst.dtype == types.uint16:

        def to_bfloat16(u, dst):
            if (u & 0x7FFFFFFF) > 0x7F800000:
                return np.uint16(0x7FC0)
            return np.uint16((u + ((u >> 16) & 1) + 0x7FFF) >> 16)

        return to_bfloat16
    return lambda u, dst: u


@_jit
def _anchor_vectors(v, x, v_out, x_out, out):
    """out = [Σ stored(v)², Σ stored(x)²] while storing v and x (their float32 bits) into the
    outputs' bits; over slices of one block, as :func:`_pass1`."""
    n = v.shape[0]
    vsq = xsq = 0.0
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        stop = start + m
        vb, xb, vo, xo = v[start:stop], x[start:stop], v_out[start:stop], x_out[start:stop]
        for i in range(m):
            a = _stored_bits(vb[i], vo)
            b = _stored_bits(xb[i], xo)
            vo[i] = a
            xo[i] = b
            wa = np.float64(_as_float32(a))
            wb = np.float64(_as_float32(b))
            vsq += wa * wa
            xsq += wb * wb
    out[0] = vsq
    out[1] = xsq
