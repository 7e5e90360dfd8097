"""Streaming rank-k estimators of one tensor's trajectory direction (pure math, no file I/O).

A tensor's deltas x_s = θ_s − θ₀ arrive one checkpoint at a time. The estimators here keep a small
state per tensor and never need an old delta again (DESIGN.md §2).

The big per-tensor array is the basis Q (d × k), stored **column-major**, i.e. as Qᵀ: ``width``
rows of d elements, row c being basis vector c. Every chunk-level product then runs on contiguous
vectors (measured 5–10× faster than the same products on a d × k row-major array, whose k = 1–2
columns are strided; bench/README.md "Where the time goes"). Q never has to be in memory at once:
the caller streams column chunks of the old state and of x through

1. :meth:`TensorUpdate.accumulate` — dot products Qᵀx, QᵀQ and ‖x‖²; Brand's residual norm
   ‖x − Q·c‖² follows from them (‖x‖² − cᵀQᵀx with c = G⁻¹Qᵀx), and only when that difference
   cancels too much to trust (:data:`CANCELLATION_RTOL`) does :meth:`TensorUpdate.exact_residual_needed`
   ask for a second pass, :meth:`TensorUpdate.accumulate_residual`,
2. :meth:`TensorUpdate.plan` — the small (T+1) × (k+1) SVD that decides the rotation,
3. :meth:`TensorUpdate.new_columns` — the new state's chunk, width × n.

Precision: the big arrays stay float32. Here (:meth:`TensorUpdate.accumulate`, the in-memory
path and the engine's path at ranks above 2) every chunk-level product runs in float32 BLAS (its
blocked summation keeps the relative error near 1e-7); the engine's fused kernel
(:func:`relexd.math.kernels.pass1`, ranks ≤ 2 and Oja) sums the float32 products in float64
instead. Either way the per-chunk results are accumulated in float64 and all small matrices are
float64. Converting whole chunks to float64 was measured to cost most of the ingest time for no
accuracy the tests can see (batch SVD agreement stays below 1e-6). Each chunk's products depend
only on that chunk, and their sums run in chunk order, so the result does not depend on who
computes which tensor. New columns (:meth:`TensorUpdate.new_columns`) come from the fused
:func:`relexd.math.kernels.combine` at ranks ≤ 2, from torch's GEMM above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from relexd.math import kernels
from relexd.math.kernels import ChunkProducts

F64 = torch.float64

#: Oja's step-size multiplier. Measured on planted rank-1 trajectories (d = 5000, 12 irregular steps):
#: η = 4 gave |cos| to batch 0.9997 at batch energy 0.98 and 0.998 at 0.85, where η = 1 gave 0.997
#: and 0.66 (too timid to leave a noisy first delta) and η = 64 gave 0.9985 and 0.984 (too jumpy).
OJA_DEFAULT_ETA = 4.0

#: Skip the new column of Brand's update when the residual is this small relative to ‖x‖: float32
#: storage cannot represent a direction below that level, only its rounding noise.
RESIDUAL_RTOL = 1e-6

#: Trust ‖x − Q·c‖² = ‖x‖² − cᵀQᵀx from the pass-1 products only while it is at least this share of
#: ‖x‖². Each float32 chunk product carries a relative error of ~1e-7–1e-6, so the difference carries
#: an absolute error of up to ~1e-6·‖x‖²: at 1e-4 that is ≤ 1 % of ρ² (≤ 0.5 % of ρ). An error in ρ
#: only mis-scales the new basis column r/ρ — the factorisation [Q, r/ρ]·K = [Q·Σ, x] stays exact
#: and the next update's Cholesky of QᵀQ re-orthonormalises it — so the direction and coefficients
#: do not see it: tests/math/test_sketch.py measures the shortcut against the exact pass at residual
#: shares between 1e-4 and 1e-2 (the range a 1e-2 guard sent to the exact pass; the benchmark's
#: bf16-rounded deltas sit at ~0.6 %) and finds them equal to float32 rounding. Below 1e-4 — a delta
#: (almost) inside the span of the basis, as in nearly noise-free trajectories — the estimate could be mostly
#: rounding error and a spurious column would enter the basis: an exact pass computes the residual.
CANCELLATION_RTOL = 1e-4


@dataclass
class SmallState:
    """The per-tensor state that is small enough to live in one file for all tensors.

    ``z`` holds the coordinates of every observed delta in the basis (T × rank, float64); column 0
    is the coefficient series c_s = x_s · v of the top direction. ``sqnorms`` holds the exact ‖x_s‖²
    (needed for energy ratios independent of truncation). ``sigma`` are the sketch's singular values.
    """

    z: torch.Tensor  # (T, rank) float64
    sqnorms: torch.Tensor  # (T,) float64
    sigma: torch.Tensor  # (rank,) float64

    @classmethod
    def empty(cls) -> SmallState:
        return cls(torch.zeros(0, 0, dtype=F64), torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64))

    @property
    def rank(self) -> int:
        return int(self.z.shape[1])

    @property
    def coefficients(self) -> torch.Tensor:
        """c_s of every observed step for the current direction (zeros when there is none)."""
        if self.rank == 0:
            return torch.zeros(self.z.shape[0], dtype=F64)
        return self.z[:, 0]

    # read through numpy: these run for every tensor at every checkpoint, and a torch index or
    # reduction costs ~10 µs of Python each

    @property
    def sigma1_sq(self) -> float:
        return float(self.sigma.numpy()[0]) ** 2 if self.sigma.numel() else 0.0

    @property
    def energy(self) -> float:
        """Σ_s ‖x_s‖²: the tensor's trajectory energy, the weight of its figures in model totals."""
        return float(self.sqnorms.numpy().sum())


class TensorUpdate:
    """One checkpoint's update of one tensor's sketch; subclasses implement an estimator."""

    #: the columns of the big state array this estimator needs for a given configured rank
    def __init__(self, small: SmallState, width: int) -> None:
        self.small = small
        self.width = width  # columns stored on disk (zero-padded beyond the live rank)
        self.xsq = 0.0

    @property
    def rows_used(self) -> int:
        """Rows of the old state that pass 1 takes products of (the rest are zero padding)."""
        raise NotImplementedError

    def accumulate(self, q: torch.Tensor, x: torch.Tensor) -> None:
        """Pass 1 over one chunk: ``q`` the old state's columns (width × n), ``x`` the delta (n).

        The products are taken by torch here; the engine takes the same ones with a fused kernel
        (:func:`relexd.math.kernels.pass1`) and hands them to :meth:`add_products`."""
        self.add_products(chunk_products(q[: self.rows_used], x))

    def add_products(self, p: ChunkProducts) -> None:
        """Pass 1's sums over one chunk, taken of :attr:`rows_used` rows of the old state."""
        raise NotImplementedError

    def exact_residual_needed(self) -> bool:
        """After pass 1: whether :meth:`accumulate_residual` must run over every chunk."""
        return False

    def accumulate_residual(self, q: torch.Tensor, x: torch.Tensor) -> None:
        raise NotImplementedError

    def plan(self) -> SmallState:
        """Decide the update from the accumulated dot products; returns the new small state."""
        raise NotImplementedError

    def new_columns(self, q: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The new state's chunk for this chunk of the old state and of x (float32, width × n),
        into ``out`` when given (a buffer reused across chunks: fresh ones cost page faults)."""
        raise NotImplementedError

    def _out(self, n: int, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty(self.width, n, dtype=torch.float32)
        return out[:, :n] if out.shape[1] != n else out

    def direction_change(self) -> tuple[float, float, float]:
        """(‖v_old‖², ‖v_new‖², v_old·v_new) of the top direction, after :meth:`plan`.

        Both directions are linear combinations of the old basis and x, so their products follow
        from the dot products of pass 1 without another pass over the data.
        """
        raise NotImplementedError


class BrandUpdate(TensorUpdate):
    """Brand's incremental SVD of rank ≤ k (DESIGN.md §2).

    Besides the textbook update this folds a re-orthonormalisation into every step: with G = QᵀQ =
    L·Lᵀ, the basis Q·L⁻ᵀ is orthonormal and coordinates become Z·L. Float32 storage lets Q drift
    from orthonormality by ~1e-7 per update; folding the correction in costs only k × k work and keeps
    the sketch exact over thousands of updates.

    The small matrices (k × k, (T+1) × (k+1)) are numpy arrays, not torch tensors: every tensor of a
    model runs this once per checkpoint while holding the GIL, and torch's per-call overhead made it
    0.3–0.5 ms per tensor, a third of a small tensor's task (numpy: ~0.15 ms; a model of 290 tiny
    tensors ingested 1.35× faster: ``python -m bench.per_tensor``).
    """

    def __init__(self, small: SmallState, width: int) -> None:
        super().__init__(small, width)
        self.rank = small.rank
        self.qtx = np.zeros(self.rank)
        self.gram = np.zeros((self.rank, self.rank))
        self.rsq: float | None = None  # ‖x − Q·c‖², once known
        self._exact_rsq = 0.0
        self._coef: np.ndarray | None = None  # G⁻¹Qᵀx: x's coordinates in the old basis
        self._rotation: np.ndarray | None = None  # maps [Q; x] to the new Q
        self._use_residual = False

    @property
    def rows_used(self) -> int:
        return self.rank

    def add_products(self, p: ChunkProducts) -> None:
        self.xsq += p.xsq
        if self.rank:
            self.qtx += p.qtx
            self.gram += p.gram

    def exact_residual_needed(self) -> bool:
        fast = self.xsq - float(self.qtx @ self._projection_coef()) if self.rank else self.xsq
        if self.rank and fast < CANCELLATION_RTOL * self.xsq:
            return True
        self.rsq = fast
        return False

    def _projection_coef(self) -> np.ndarray:
        if self._coef is None:
            self._coef = np.linalg.solve(self.gram, self.qtx) if self.rank else np.zeros(0)
        return self._coef

    def accumulate_residual(self, q: torch.Tensor, x: torch.Tensor) -> None:
        r = x
        if self.rank:
            coef = torch.from_numpy(self._projection_coef().astype(np.float32))
            r = torch.addmv(x, q[: self.rank].T, coef, alpha=-1.0)
        self._exact_rsq += float(torch.dot(r, r))
        self.rsq = self._exact_rsq

    def plan(self) -> SmallState:
        if self.rsq is None and self.exact_residual_needed():
            raise RuntimeError("the residual cancels: accumulate_residual() over every chunk first")
        small = self.small
        t = small.z.shape[0]
        k = self.rank
        if k:
            chol = np.linalg.cholesky(self.gram)  # G = L Lᵀ
            z_old = small.z.numpy() @ chol  # coordinates in the orthonormal basis Q L⁻ᵀ
            p = chol.T @ self._projection_coef()  # (Q L⁻ᵀ)ᵀ x
            basis_fix = np.linalg.inv(chol.T)  # Q rows @ L⁻ᵀ = orthonormal rows
        else:
            z_old = np.zeros((t, 0))
            p = np.zeros(0)
            basis_fix = np.zeros((0, 0))
        rho = max(self.rsq, 0.0) ** 0.5
        self._use_residual = rho > RESIDUAL_RTOL * max(self.xsq, 0.0) ** 0.5 and rho > 0.0
        cols = k + 1 if self._use_residual else k
        big = np.zeros((t + 1, cols))
        big[:t, :k] = z_old
        big[t, :k] = p
        if self._use_residual:
            big[t, k] = rho
        sqnorms = torch.cat([small.sqnorms, _f64([self.xsq])])
        if cols == 0:  # every delta so far is exactly zero: nothing to estimate
            self._rotation = np.zeros((0, 0))
            self.small = SmallState(torch.from_numpy(big), sqnorms, _f64([]))
            return self.small
        u, s, wt = np.linalg.svd(big, full_matrices=False)
        keep = min(self.width, cols)
        u, s, w = u[:, :keep], s[:keep], wt.T[:, :keep]
        # sign convention: newest coordinate ≥ 0 in every column (v's sign is otherwise arbitrary)
        signs = np.where(u[t] < 0, -1.0, 1.0)
        u, w = u * signs, w * signs
        rotation = np.zeros((k + 1, keep))
        rotation[:k] = basis_fix @ w[:k]
        if self._use_residual:
            rotation[k] = w[k] / rho
            rotation[:k] -= np.outer(self._projection_coef(), w[k] / rho)
        self._rotation = rotation
        self.small = SmallState(torch.from_numpy(u * s), sqnorms, torch.from_numpy(np.ascontiguousarray(s)))
        return self.small

    def new_columns(self, q: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # new Q = [Q L⁻ᵀ, r/ρ] W with r = x − Q·coef, rewritten as rotationᵀ · [Q; x]
        assert self._rotation is not None, "plan() first"
        k = self.rank
        keep = self._rotation.shape[1]
        rotation_t = torch.from_numpy(self._rotation.T.astype(np.float32))  # keep × (k+1)
        out = self._out(x.shape[0], out)
        if keep < out.shape[0]:
            out[keep:] = 0.0
        acc = out[:keep]
        if k <= kernels.MAX_ROWS and 1 <= keep <= 2:
            # the default ranks: one fused loop (relexd.math.kernels.combine); its x column is zero
            # where the residual is not used, and x is finite (the engine checked)
            kernels.combine(list(acc), list(q[:k]), x, rotation_t)
        elif k:
            torch.mm(rotation_t[:, :k], q[:k], out=acc)
            if self._use_residual:
                acc.addr_(rotation_t[:, k], x)
        elif self._use_residual:
            torch.outer(rotation_t[:, k], x, out=acc)
        else:
            acc.zero_()
        return out

    def direction_change(self) -> tuple[float, float, float]:
        assert self._rotation is not None, "plan() first"
        k = self.rank
        if self._rotation.shape[1] == 0:
            return (float(self.gram[0, 0]) if k else 0.0), 0.0, 0.0
        gram = np.zeros((k + 1, k + 1))  # [Q, x]ᵀ [Q, x]
        gram[:k, :k] = self.gram
        gram[:k, k] = gram[k, :k] = self.qtx
        gram[k, k] = self.xsq
        r0 = self._rotation[:, 0]
        vv_new = float(r0 @ gram @ r0)
        if not k:
            return 0.0, vv_new, 0.0
        return float(self.gram[0, 0]), vv_new, float(gram[0] @ r0)


class OjaUpdate(TensorUpdate):
    """Oja's rule, v ← normalise(v + η_t·(x·v)·x): one vector of state per tensor, the leanest.

    The step size is η_t = η / Σ_{i≤t}‖x_i‖² (η = :data:`OJA_DEFAULT_ETA`), which makes the rule
    scale free (deltas of a tensor grow by orders of magnitude during a run) and turns it into a
    running average of the outer products, like CCIPCA. The first delta initialises v = x/‖x‖.

    Oja cannot re-project old deltas onto the new direction (it keeps none of them), so the
    coefficient of step s is x_s · v as it was right after step s was observed. The benchmark
    measures what that costs against batch SVD and Brand's sketch.
    """

    def __init__(self, small: SmallState, width: int, eta: float = OJA_DEFAULT_ETA) -> None:
        super().__init__(small, width)
        self.eta = eta
        self.has_v = small.rank > 0
        self.xv = 0.0
        self.vv = 0.0
        self._a = 0.0
        self._scale = 0.0

    @property
    def rows_used(self) -> int:
        return 1 if self.has_v else 0

    def add_products(self, p: ChunkProducts) -> None:
        self.xsq += p.xsq
        if self.has_v:
            self.xv += p.qtx[0]
            self.vv += p.gram[0][0]

    def plan(self) -> SmallState:
        small = self.small
        t = small.z.shape[0]
        sqnorms = torch.cat([small.sqnorms, _f64([self.xsq])])
        energy = float(sqnorms.sum())
        if not self.has_v:
            if self.xsq == 0.0:  # still no motion at all: no direction yet
                self._a, self._scale = 0.0, 0.0
                self.small = SmallState(torch.zeros(t + 1, 0, dtype=F64), sqnorms, _f64([]))
                return self.small
            # v = x/‖x‖ written as (0·v + a·x)·scale
            self._a, self._scale = 1.0, 1.0 / self.xsq**0.5
            newest = self.xsq**0.5
            z = torch.cat([torch.zeros(t, 1, dtype=F64), _f64([[newest]])])
        else:
            a = self.eta * self.xv / energy
            norm_sq = self.vv + 2 * a * self.xv + a * a * self.xsq
            self._a, self._scale = a, 1.0 / norm_sq**0.5
            newest = (self.xv + a * self.xsq) * self._scale
            z = torch.cat([small.z[:, :1], _f64([[newest]])])
        if newest < 0:  # sign convention: newest coefficient ≥ 0
            self._scale = -self._scale
            z = -z
        sigma = _f64([float(z[:, 0] @ z[:, 0]) ** 0.5])
        self.small = SmallState(z, sqnorms, sigma)
        return self.small

    def direction_change(self) -> tuple[float, float, float]:
        # v_new = (v + a·x)·scale
        a, c = self._a, self._scale
        vv_new = c * c * (self.vv + 2 * a * self.xv + a * a * self.xsq)
        return self.vv, vv_new, c * (self.vv + a * self.xv)

    def new_columns(self, q: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = self._out(x.shape[0], out)
        out[1:] = 0.0
        # v_new = scale·v + scale·a·x, in one fused loop (relexd.math.kernels.combine)
        a, scale = self._a, self._scale
        coef = [[scale, scale * a]] if self.has_v else [[scale * a]]
        kernels.combine([out[0]], [q[0]] if self.has_v else [], x, torch.tensor(coef, dtype=torch.float32))
        return out


ESTIMATORS = ("brand", "oja")


def make_update(
    estimator: str, small: SmallState, width: int, oja_eta: float = OJA_DEFAULT_ETA
) -> TensorUpdate:
    """The update object of the named estimator for one tensor and one checkpoint."""
    if estimator == "brand":
        return BrandUpdate(small, width)
    if estimator == "oja":
        return OjaUpdate(small, width, eta=oja_eta)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def chunk_products(q: torch.Tensor, x: torch.Tensor) -> ChunkProducts:
    """Pass 1's products of one chunk with torch: ``q`` the rows taken (r × n), ``x`` the delta.

    One dot per pair, not q @ q.T: on 1M-element chunks float32 GEMM measured ~1e-5 relative
    error against float64, the dot products ~1e-6 (as for Qᵀx and ‖x‖²)."""
    k = q.shape[0]
    qtx = tuple((q @ x).tolist()) if k else ()
    lower = {(i, j): float(torch.dot(q[i], q[j])) for i in range(k) for j in range(i + 1)}
    gram = tuple(tuple(lower[max(i, j), min(i, j)] for j in range(k)) for i in range(k))
    return ChunkProducts(float(torch.dot(x, x)), qtx, gram, None)


def _f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def update_in_memory(
    estimator: str,
    small: SmallState,
    q: torch.Tensor,
    x: torch.Tensor,
    width: int,
    chunk: int | None = None,
) -> tuple[SmallState, torch.Tensor]:
    """Run the phases over arrays held in memory (tests, benchmarks, small tensors).

    ``q`` is the old state (width × numel, float32), ``x`` the flattened delta. ``chunk`` cuts the
    passes into chunks of that many elements exactly as the engine does, so chunking can be checked
    to change nothing.
    """
    n = x.numel()
    step = chunk or max(n, 1)
    spans = [(i, min(i + step, n)) for i in range(0, n, step)]
    upd = make_update(estimator, small, width)
    for i, j in spans:
        upd.accumulate(q[:, i:j], x[i:j])
    if upd.exact_residual_needed():
        for i, j in spans:
            upd.accumulate_residual(q[:, i:j], x[i:j])
    new_small = upd.plan()
    new_q = torch.empty(width, n, dtype=torch.float32)
    for i, j in spans:
        new_q[:, i:j] = upd.new_columns(q[:, i:j], x[i:j])
    return new_small, new_q
