"""The fused pass-1 kernel against float64 products of the same values, and against torch's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from relexd.math import kernels
from relexd.math.kernels import BLOCK, pass1
from relexd.math.sketch import BrandUpdate, OjaUpdate, SmallState, chunk_products

N = 3 * BLOCK + 517  # whole blocks and a ragged tail


def stored(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))).to(dtype)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("rows", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("anchor_dtype", [None, torch.bfloat16, torch.float32])
def test_pass1_forms_the_delta_and_its_products(rows: int, dtype: torch.dtype, anchor_dtype) -> None:
    ck, base = stored(N, dtype, 1), stored(N, dtype, 2)
    q = torch.randn(2, N, generator=torch.Generator().manual_seed(3))
    anchor = None if anchor_dtype is None else (stored(N, anchor_dtype, 4), stored(N, anchor_dtype, 5))
    x = torch.full((N,), float("nan"))
    p = pass1(x, list(q[:rows]), anchor, (ck, base))
    # the delta is exactly float32's difference of the widened values
    assert torch.equal(x, ck.float() - base.float())
    xd, qd = x.double(), q[:rows].double()
    assert rel(p.xsq, float(xd @ xd)) < 1e-12
    for r in range(rows):
        assert rel(p.qtx[r], float(qd[r] @ xd)) < 1e-12
        for s in range(rows):
            assert rel(p.gram[r][s], float(qd[r] @ qd[s])) < 1e-12
    assert len(p.qtx) == rows and len(p.gram) == rows
    if anchor is None:
        assert p.anchor is None
    else:
        v, xa = (a.double() for a in anchor)
        assert rel(p.anchor[0], float(v @ xd)) < 1e-12
        assert rel(p.anchor[1], float(xa @ xd)) < 1e-12


@pytest.mark.parametrize(
    ("ck_dtype", "base_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_pass1_widens_each_stored_input_by_its_own_dtype(
    ck_dtype: torch.dtype, base_dtype: torch.dtype
) -> None:
    """Each stored array is widened by its own bits (a bf16 checkpoint over a float32 base, and the
    other way round), with a float32 anchor beside a bf16 delta."""
    ck, base = stored(N, ck_dtype, 10), stored(N, base_dtype, 11)
    anchor = (stored(N, torch.float32, 12), stored(N, torch.float32, 13))
    x = torch.full((N,), float("nan"))
    p = pass1(x, [], anchor, (ck, base))
    assert torch.equal(x, ck.float() - base.float())
    v, xa, xd = anchor[0].double(), anchor[1].double(), x.double()
    assert rel(p.anchor[0], float(v @ xd)) < 1e-12
    assert rel(p.anchor[1], float(xa @ xd)) < 1e-12


def test_pass1_of_a_given_delta_leaves_it_alone() -> None:
    x = torch.randn(N, generator=torch.Generator().manual_seed(6))
    before = x.clone()
    q = torch.randn(1, N, generator=torch.Generator().manual_seed(7))
    p = pass1(x, [q[0]])
    assert torch.equal(x, before)
    assert rel(p.qtx[0], float(q[0].double() @ x.double())) < 1e-12


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["checkpoint", "base"])
def test_a_non_finite_value_reaches_the_squared_norm(bad: float, where: str) -> None:
    """How the engine notices NaN and Inf: the loops must not be compiled as if they cannot occur."""
    ck, base = stored(N, torch.bfloat16, 1), stored(N, torch.bfloat16, 2)
    (ck if where == "checkpoint" else base)[BLOCK + 5] = bad
    p = pass1(torch.empty(N), [torch.ones(N)], None, (ck, base))
    assert not torch.isfinite(torch.tensor(p.xsq))


def test_brand_fed_by_the_kernel_equals_brand_fed_by_torch() -> None:
    """The same update from the kernel's products as from torch's (float32 BLAS): to float32
    rounding, over several chunks."""
    g = torch.Generator().manual_seed(8)
    d, chunk = 20_000, 6_000
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    q = q.T.float().contiguous()
    small = SmallState(
        torch.randn(3, 2, generator=g, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
    )
    x = (0.5 * q[0] + 0.01 * torch.randn(d, generator=g)).contiguous()
    by_torch, by_kernel = BrandUpdate(small, 2), BrandUpdate(small, 2)
    for i in range(0, d, chunk):
        by_torch.accumulate(q[:, i : i + chunk], x[i : i + chunk])
        by_kernel.add_products(pass1(x[i : i + chunk], list(q[:, i : i + chunk])))
    assert np.allclose(by_kernel.qtx, by_torch.qtx, rtol=1e-5)
    assert np.allclose(by_kernel.gram, by_torch.gram, rtol=1e-5, atol=1e-6)
    a, b = by_torch.plan(), by_kernel.plan()
    assert torch.allclose(a.z, b.z, rtol=1e-5, atol=1e-7)


def test_oja_takes_its_one_row_from_the_products() -> None:
    g = torch.Generator().manual_seed(9)
    v, x = torch.randn(2, 5000, generator=g)
    small = SmallState(
        torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    upd = OjaUpdate(small, 1)
    assert upd.rows_used == 1
    upd.add_products(chunk_products(v[None], x))
    assert rel(upd.xv, float(v.double() @ x.double())) < 1e-6
    assert rel(upd.vv, float(v.double() @ v.double())) < 1e-6


def test_refuses_what_it_cannot_widen_or_hold() -> None:
    half = torch.zeros(8, dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        pass1(torch.zeros(8), [], None, (half, half))
    with pytest.raises(ValueError, match="at most"):
        pass1(torch.zeros(8), [torch.zeros(8)] * (kernels.MAX_ROWS + 1))
    assert not kernels.widens(torch.float16)


def test_compiles_in_memory_where_no_cache_directory_is_writable() -> None:
    """numba refuses ``cache=True`` at decoration where it finds no writable cache directory (an
    installed package under the unit's ProtectSystem=strict): the import must not fail then."""
    env = os.environ | {
        "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator",
        "NUMBA_CACHE_DIR": "/dev/null/numba",
    }
    code = (
        "import torch; from relexd.math import kernels; x = torch.ones(10);"
        "print(kernels.pass1(x, [x]).xsq, type(kernels._pass1._cache).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["10.0", "NullCache"]


@pytest.mark.parametrize("outs", [1, 2])
@pytest.mark.parametrize("rows", [0, 1, 2])
def test_combine_writes_the_new_columns(outs: int, rows: int) -> None:
    """The new basis vectors, against float64 products of the same float32 values: float32
    rounding only."""
    g = torch.Generator().manual_seed(10)
    q, x = torch.randn(2, N, generator=g), torch.randn(N, generator=g)
    coef = torch.randn(outs, rows + 1, generator=g)
    out = torch.full((outs, N), float("nan"))
    kernels.combine(list(out), list(q[:rows]), x, coef)
    expected = coef.double() @ torch.cat([q[:rows], x[None]]).double()
    assert torch.allclose(out.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_combine_refuses_what_it_cannot_hold() -> None:
    z = torch.zeros(8)
    with pytest.raises(ValueError, match="outputs"):
        kernels.combine([z, z, z], [], z, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="outputs"):
        kernels.combine([z], [z], z, torch.zeros(1, 1))  # no column for x


def test_refuses_an_anchor_it_cannot_widen() -> None:
    half = torch.zeros(8, dtype=torch.float16)
    with pytest.raises(ValueError, match="anchors of bfloat16 or float32"):
        pass1(torch.zeros(8), [], (half, half))


def _edge_values(n: int) -> torch.Tensor:
    """Values whose rounding to bfloat16 is easy to get wrong: exact ties below even and odd
    upper halves, values that round up into the next exponent and to infinity, subnormals, signed
    zeros and infinities, then ordinary ones."""
    ties = (0x3F000000 + 0x10000 * torch.arange(64, dtype=torch.int64) + 0x8000).to(torch.int32)
    carry = torch.tensor([0x3F7FFFFF, 0x3F7F8000, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x0000FFFF])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40])
    carried = carry.to(torch.int32).view(torch.float32)
    edges = torch.cat([ties.view(torch.float32), -ties.view(torch.float32), carried, special])
    return torch.cat([edges, stored(n - edges.numel(), torch.float32, 12, 0.01)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_anchor_vectors_store_what_torch_stores_and_their_norms(dtype: torch.dtype) -> None:
    """The stored bits equal ``Tensor.to``'s; the norms are the float64 sums of squares of the
    stored values (not of the float32 ones: the forecast uses exactly what the anchor holds)."""
    v, x = _edge_values(N), stored(N, torch.float32, 13)
    v_out, x_out = torch.empty(N, dtype=dtype), torch.empty(N, dtype=dtype)
    v_sq, x_sq = kernels.anchor_vectors(v, x, v_out, x_out)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(v_out.view(bits), v.to(dtype).view(bits))
    assert torch.equal(x_out.view(bits), x.to(dtype).view(bits))
    assert x_sq == pytest.approx(float(x.to(dtype).double().square().sum()), rel=1e-12)
    finite = v.to(dtype).isfinite()
    assert not finite.all() and v_sq == float("inf")  # the infinities are in the sum
    v_sq, _ = kernels.anchor_vectors(torch.where(finite, v, 0.0), x, v_out, x_out)
    assert v_sq == pytest.approx(float(v.to(dtype).double()[finite].square().sum()), rel=1e-12)


def test_anchor_vectors_store_a_nan_as_a_nan() -> None:
    v = torch.tensor([float("nan"), -float("nan"), 1.0])
    v_out, x_out = torch.empty(3, dtype=torch.bfloat16), torch.empty(3, dtype=torch.bfloat16)
    kernels.anchor_vectors(v, v, v_out, x_out)
    assert v_out.isnan().tolist() == [True, True, False]


def test_anchor_vectors_refuse_what_they_cannot_store() -> None:
    z, half, bf16 = torch.zeros(8), torch.zeros(8, dtype=torch.float16), torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differ in length"):
        kernels.anchor_vectors(z, z, bf16, bf16[:7])
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        kernels.anchor_vectors(z, z, half, half)
    with pytest.raises(ValueError, match="float32 vectors"):
        kernels.anchor_vectors(z.double(), z, z, z)
