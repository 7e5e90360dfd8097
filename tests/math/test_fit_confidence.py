import math

import pytest
import torch

from relexd.math.confidence import (
    ForecastSums,
    TensorFigures,
    anchors_to_keep,
    choose_anchor,
    is_anchor_count,
    model_figures,
)
from relexd.math.fit import fit_line


def test_fit_recovers_planted_line_on_irregular_steps() -> None:
    s = torch.tensor([3.0, 4, 9, 10, 25, 31])
    fit = fit_line(s, 0.5 + 0.25 * s)
    assert fit.alpha == pytest.approx(0.5) and fit.beta == pytest.approx(0.25)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(100) == pytest.approx(25.5)


def test_fit_window_uses_only_the_last_points() -> None:
    s = torch.arange(1.0, 11)
    c = torch.where(s <= 5, s, 5 + 3 * (s - 5))  # slope 1, then slope 3
    assert fit_line(s, c, window=5).beta == pytest.approx(3.0)
    assert fit_line(s, c).beta < 3.0


def test_fit_with_too_few_points_is_honest() -> None:
    one = fit_line(torch.tensor([5.0]), torch.tensor([2.0]))
    assert (one.alpha, one.beta, one.r2) == (2.0, 0.0, None)
    assert fit_line(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])).r2 is None


def test_model_figures_weight_tensors_by_energy() -> None:
    figs = model_figures(
        [
            TensorFigures(9.0, 9.0, 1.0, 0.0),
            TensorFigures(1.0, 0.5, 0.0, 1.0),
            TensorFigures(0.0, 0.0, None, None),
        ]
    )
    assert figs.rank1_energy_ratio == pytest.approx(0.95)
    assert figs.tensor_energy_ratio_min == pytest.approx(0.5)
    assert figs.fit_r2 == pytest.approx(0.9)
    assert figs.direction_drift == pytest.approx(0.1)


def test_anchor_schedule_and_choice() -> None:
    assert [n for n in range(1, 20) if is_anchor_count(n)] == [2, 4, 8, 16]
    assert choose_anchor([5, 10, 20], 39, 2.0) == 10
    assert choose_anchor([5, 10, 20], 40, 2.0) == 20
    assert choose_anchor([5], 9, 2.0) is None
    assert anchors_to_keep([5, 10, 20], 40, [2.0]) == {20}
    assert anchors_to_keep([5, 10, 20], 40, [2.0, 4.0]) == {10, 20}


def test_forecast_sums_equal_direct_norms() -> None:
    g = torch.Generator().manual_seed(0)
    x, v, xa = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(3))
    coef = 1.7
    sums = ForecastSums()
    sums.add_tensor(
        xsq=float(x @ x),
        x_dot_v=float(x @ v),
        v_sq=float(v @ v),
        x_dot_xa=float(x @ xa),
        xa_sq=float(xa @ xa),
        coef=coef,
    )
    e_relex = float((x - coef * v).norm() ** 2)
    e_hold = float((x - xa).norm() ** 2)
    assert sums.error_ratio == pytest.approx(math.sqrt(e_relex / float(x @ x)))
    assert sums.skill == pytest.approx(1 - math.sqrt(e_relex / e_hold))
