"""The streaming estimators against a plain batch SVD of the same deltas."""

import pytest
import torch

from relexd.engine.config import DEFAULT_RANK
from relexd.math import sketch
from relexd.math.sketch import CANCELLATION_RTOL, SmallState, make_update, update_in_memory


def trajectory(d: int, steps: list[float], noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u /= u.norm()
    return torch.stack(
        [0.1 * s * u + noise * torch.randn(d, generator=g, dtype=torch.float64) for s in steps]
    )


def batch_top(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: top right singular vector (sign: newest coefficient ≥ 0), coefficients, σ."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[0]
    c = x @ v
    if c[-1] < 0:
        v, c = -v, -c
    return v, c, s


def stream(x: torch.Tensor, estimator: str, width: int, chunk: int | None = None):
    small, q = SmallState.empty(), torch.zeros(width, x.shape[1])
    for row in x:
        small, q = update_in_memory(estimator, small, q, row.to(torch.float32), width, chunk)
    return small, q


STEPS = [1, 2, 3, 5, 8, 9, 12, 15, 20, 21, 25, 30]


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.2])
def test_brand_equals_batch_svd_while_nothing_is_truncated(noise: float) -> None:
    x = trajectory(3000, STEPS, noise)
    v_ref, c_ref, s_ref = batch_top(x.float().double())
    small, q = stream(x, "brand", width=len(STEPS), chunk=700)
    v = q[0].double()
    assert torch.allclose(v, v_ref, rtol=0, atol=1e-5 * v_ref.abs().max())
    assert (small.coefficients - c_ref).norm() / c_ref.norm() < 1e-5
    assert abs(small.sigma[0] - s_ref[0]) / s_ref[0] < 1e-5
    # the squared norms are kept (float32 products, float64 sums) whatever the rank
    assert torch.allclose(small.sqnorms, (x.float().double() ** 2).sum(1), rtol=1e-6)


@pytest.mark.parametrize("width", [DEFAULT_RANK, 1])
def test_default_rank_tracks_batch_direction_at_high_energy(width: int) -> None:
    """At the default rank, and at rank 1 (whose new column is computed by its own kernels)."""
    steps = list(range(2, 82, 2))  # 40 checkpoints, far more than the default rank
    for noise, seed in [(0.004, 1), (0.008, 2), (0.011, 3)]:
        x = trajectory(4000, steps, noise, seed)
        v_ref, c_ref, s_ref = batch_top(x)
        energy = float(s_ref[0] ** 2 / (s_ref**2).sum())
        assert energy >= 0.9
        small, q = stream(x, "brand", width=width)
        v = q[0].double()
        assert abs(float(v @ v_ref)) / float(v.norm()) >= 0.999, (noise, energy)
        assert (small.coefficients - c_ref).norm() / c_ref.norm() < 0.01


def test_chunking_changes_nothing() -> None:
    x = trajectory(1000, STEPS, 0.05)
    a_small, a_q = stream(x, "brand", 3)
    b_small, b_q = stream(x, "brand", 3, chunk=97)
    # only the float32 summation order differs
    assert torch.allclose(a_q, b_q, atol=1e-5)
    assert torch.allclose(a_small.z, b_small.z, rtol=0, atol=1e-5 * float(a_small.z.abs().max()))


def test_sketch_basis_stays_orthonormal_over_many_updates() -> None:
    x = trajectory(500, list(range(1, 201)), 0.05)
    _, q = stream(x, "brand", 4)
    gram = q.double() @ q.double().T
    assert torch.allclose(gram, torch.eye(4, dtype=torch.float64), atol=1e-5)


def test_oja_finds_a_clean_direction_and_lags_brand_under_noise() -> None:
    x = trajectory(3000, STEPS, 0.003)
    v_ref, _, _ = batch_top(x)
    _, q = stream(x, "oja", 1)
    v = q[0].double()
    assert abs(float(v @ v_ref)) / float(v.norm()) > 0.999
    assert abs(float(v.norm()) - 1) < 1e-5  # Oja keeps a unit vector


def test_zero_deltas_give_no_direction() -> None:
    x = torch.zeros(3, 50, dtype=torch.float64)
    for est in ("brand", "oja"):
        small, q = stream(x, est, 2 if est == "brand" else 1)
        assert small.rank == 0
        assert small.energy == 0.0
        assert torch.count_nonzero(q) == 0


def test_direction_sign_makes_newest_coefficient_non_negative() -> None:
    x = -trajectory(200, STEPS[:5], 0.0)
    small, _ = stream(x, "brand", 2)
    assert small.coefficients[-1] >= 0


def test_direction_change_equals_direct_products() -> None:
    x = trajectory(800, STEPS, 0.05)
    for est, width in (("brand", 1), ("brand", 2), ("brand", 5), ("oja", 1)):
        small, q = stream(x[:-1], est, width)
        upd = make_update(est, small, width)
        upd.accumulate(q, x[-1].float())
        if upd.exact_residual_needed():
            upd.accumulate_residual(q, x[-1].float())
        upd.plan()
        v_old = q[0].double()
        v_new = upd.new_columns(q, x[-1].float())[0].double()
        got = upd.direction_change()
        want = (float(v_old @ v_old), float(v_new @ v_new), float(v_old @ v_new))
        assert got == pytest.approx(want, rel=1e-5), est


@pytest.mark.parametrize("noise", [0.3, 0.01, 0.003, 0.0005, 0.0001, 0.0])
def test_residual_from_products_agrees_with_the_exact_pass(noise: float) -> None:
    """‖x − Q·c‖² from the pass-1 products where they do not cancel, the exact pass where they do;
    either way within float32 rounding of the float64 truth."""
    x = trajectory(20_000, STEPS, noise, seed=4)
    small, q = stream(x[:-1], "brand", 3)
    new = x[-1].float()
    upd = make_update("brand", small, 3)
    for i in range(0, new.numel(), 7000):
        upd.accumulate(q[:, i : i + 7000], new[i : i + 7000])
    exact_needed = upd.exact_residual_needed()
    qd, xd = q[: small.rank].double(), new.double()  # the live basis (zero rows beyond it)
    coef = torch.linalg.solve(qd @ qd.T, qd @ xd)
    want = float(((xd - qd.T @ coef) ** 2).sum())
    share = want / float(xd @ xd)
    assert exact_needed == (share < CANCELLATION_RTOL), share  # the guard triggers as designed
    if exact_needed:
        upd.accumulate_residual(q, new)
    assert upd.rsq == pytest.approx(want, rel=1e-4, abs=1e-6 * float(xd @ xd)), share


@pytest.mark.parametrize("noise", [3e-4, 1e-3])
def test_residual_shortcut_changes_no_figure_against_the_exact_pass(noise: float, monkeypatch) -> None:
    """Where the residual is 1e-4–1e-2 of ‖x‖² the shortcut now replaces the exact pass: a whole
    stream computed either way gives the same direction, coefficients and σ (to float32 rounding),
    and both agree with the float64 batch SVD as closely."""
    x = trajectory(200_000, list(range(2, 42, 2)), noise, seed=5)
    exact_passes = []
    real = sketch.BrandUpdate.accumulate_residual

    def counted(self, q, xc):
        exact_passes.append(1)
        return real(self, q, xc)

    monkeypatch.setattr(sketch.BrandUpdate, "accumulate_residual", counted)
    results = {}
    for guard in (CANCELLATION_RTOL, 1.0):  # 1.0: every update takes the exact pass
        monkeypatch.setattr(sketch, "CANCELLATION_RTOL", guard)
        exact_passes.clear()
        results[guard] = stream(x, "brand", DEFAULT_RANK, chunk=50_000)
        results[guard, "exact passes"] = len(exact_passes)
    assert results[1.0, "exact passes"] > 0
    assert results[CANCELLATION_RTOL, "exact passes"] == 0  # the shortcut was taken every time
    (fast, q_fast), (exact, q_exact) = results[CANCELLATION_RTOL], results[1.0]
    v_ref, c_ref, _ = batch_top(x.float().double())
    for small, q in ((fast, q_fast), (exact, q_exact)):
        v = q[0].double()
        assert 1 - abs(float(v @ v_ref)) / float(v.norm()) < 1e-9
        # rank-2 truncation, not the residual, sets this (the same either way)
        assert (small.coefficients - c_ref).norm() / c_ref.norm() < 1e-3
    assert torch.allclose(q_fast[0], q_exact[0], rtol=0, atol=1e-6 * float(q_exact[0].abs().max()))
    assert (fast.coefficients - exact.coefficients).norm() / exact.coefficients.norm() < 1e-6
    assert torch.allclose(fast.sigma, exact.sigma, rtol=1e-5)  # σ₂ ~1e-6 apart, σ₁ ~1e-8
