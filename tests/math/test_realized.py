"""Realized validation of previews in reward space, against hand computations."""

import pytest

from relexd.math.realized import lead_streak, nearest_horizon, realized


def test_gain_share_and_advantage() -> None:
    # made from a checkpoint scoring 0.30; training reached 0.50 at the target; the preview 0.45
    r = realized(0.45, 0.30, 0.50, ratio=2.0, horizons=(2.0, 6.0))
    assert r.advantage == pytest.approx(0.15)
    assert r.gain_share == pytest.approx(0.75)
    assert r.horizon == 2.0 and r.ratio == 2.0
    worse = realized(0.20, 0.30, 0.50, ratio=6.1, horizons=(2.0, 6.0))
    assert worse.gain_share == pytest.approx(-0.5) and worse.advantage == pytest.approx(-0.1)
    assert worse.horizon == 6.0


@pytest.mark.parametrize("reached", [0.30, 0.25])
def test_gain_share_is_undefined_without_a_gain_to_recover(reached: float) -> None:
    r = realized(0.40, 0.30, reached, ratio=2.0, horizons=(2.0,))
    assert r.gain_share is None  # absent, never 0
    assert r.advantage == pytest.approx(0.10)


def test_nearest_horizon_is_multiplicative() -> None:
    assert nearest_horizon(3.2, (2.0, 3.0, 6.0)) == 3.0
    assert nearest_horizon(4.1, (3.0, 6.0)) == 3.0  # log(4.1/3) < log(6/4.1)
    assert nearest_horizon(4.5, (3.0, 6.0)) == 6.0
    with pytest.raises(ValueError):
        nearest_horizon(2.0, ())


def test_lead_streak_counts_the_newest_positive_run() -> None:
    assert lead_streak([]) == 0
    assert lead_streak([0.1, -0.2, 0.3, 0.1]) == 2
    assert lead_streak([0.1, 0.2, 0.0]) == 0  # a tie is not a lead
    assert lead_streak([0.1, 0.2, 0.3]) == 3
