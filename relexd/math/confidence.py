"""Confidence figures: is the straight rank-1 line still holding? (DESIGN.md §3)

In-window fit quality (energy ratio, R²) is not enough: runs whose extrapolation collapsed still
showed 0.92–0.97 on both. What separates good from bad is forward validation — score the fit made
when the checkpoint at step a was the newest against the checkpoint that lands at step ≈ h·a. The
fit of step a is kept as an *anchor* (v_a, α_a, β_a, x_a per tensor); every expression below expands
into dot products taken while the new checkpoint is read, so no old checkpoint is ever re-read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relexd.math.fit import weighted_mean


@dataclass(frozen=True)
class TensorFigures:
    """One tensor's contribution to the model-wide figures."""

    energy: float  # Σ_s ‖x_s‖², the weight of this tensor in every model-wide figure
    sigma1_sq: float  # σ₁² of the tensor's delta matrix (as estimated)
    r2: float | None  # R² of its coefficient fit
    drift: float | None  # 1 − |cos(v_prev, v)| for this update

    @property
    def energy_ratio(self) -> float | None:
        return self.sigma1_sq / self.energy if self.energy > 0.0 else None


@dataclass(frozen=True)
class ModelFigures:
    rank1_energy_ratio: float | None
    tensor_energy_ratio_min: float | None
    fit_r2: float | None
    direction_drift: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "rank1_energy_ratio": self.rank1_energy_ratio,
            "tensor_energy_ratio_min": self.tensor_energy_ratio_min,
            "fit_r2": self.fit_r2,
            "direction_drift": self.direction_drift,
        }


def model_figures(tensors: Iterable[TensorFigures]) -> ModelFigures:
    """Whole-model figures, each tensor weighted by its trajectory energy (DESIGN.md §3)."""
    tensors = [t for t in tensors if t.energy > 0.0]
    total = sum(t.energy for t in tensors)
    if not tensors or total <= 0.0:
        return ModelFigures(None, None, None, None)
    ratios = [r for t in tensors if (r := t.energy_ratio) is not None]
    return ModelFigures(
        rank1_energy_ratio=min(1.0, sum(t.sigma1_sq for t in tensors) / total),
        tensor_energy_ratio_min=min(1.0, min(ratios)) if ratios else None,
        fit_r2=weighted_mean([(t.r2, t.energy) for t in tensors]),
        direction_drift=weighted_mean([(t.drift, t.energy) for t in tensors]),
    )


# --- anchors -----------------------------------------------------------------------------------


def is_anchor_count(observed: int) -> bool:
    """Anchors are taken when the number of observed checkpoints reaches a power of two (≥ 2).

    Geometric anchors guarantee that for any later step s some anchor with s / s_a ≥ 2 exists (on
    regular cadences the ratio used stays between 2 and 4) while only O(log T) of them ever exist.
    One checkpoint is no anchor: a single point fits no line.
    """
    return observed >= 2 and observed & (observed - 1) == 0


def choose_anchor(anchor_steps: Sequence[int], step: int, horizon: float) -> int | None:
    """The newest anchor step s_a with step / s_a ≥ horizon (None if there is none yet)."""
    usable = [a for a in anchor_steps if a > 0 and step >= horizon * a]
    return max(usable) if usable else None


def anchors_to_keep(anchor_steps: Sequence[int], newest_step: int, horizons: Sequence[float]) -> set[int]:
    """Anchors that some future checkpoint can still use; steps only grow, so once a newer anchor
    qualifies for a horizon, every older one is dead for that horizon."""
    keep: set[int] = set()
    for h in horizons:
        chosen = choose_anchor(anchor_steps, newest_step, h)
        keep.update(a for a in anchor_steps if chosen is None or a >= chosen)
    return keep


# --- forecast scoring ----------------------------------------------------------------------------


@dataclass
class ForecastSums:
    """Σ over tensors of the three squared norms of DESIGN.md §3 for one (anchor, step) pair."""

    e_relex: float = 0.0  # ‖x_s − (α_a + β_a·s)·v_a‖²
    e_hold: float = 0.0  # ‖x_s − x_a‖²: the baseline "stop training at a"
    e_norm: float = 0.0  # ‖x_s‖²

    def add_tensor(
        self, *, xsq: float, x_dot_v: float, v_sq: float, x_dot_xa: float, xa_sq: float, coef: float
    ) -> None:
        """Expand both errors into dot products of the new delta with the anchor's vectors."""
        self.e_relex += max(0.0, xsq - 2.0 * coef * x_dot_v + coef * coef * v_sq)
        self.e_hold += max(0.0, xsq - 2.0 * x_dot_xa + xa_sq)
        self.e_norm += xsq

    @property
    def error_ratio(self) -> float | None:
        """sqrt(e_relex / e_norm): the forecast's error relative to the delta's size (lower is better)."""
        return (self.e_relex / self.e_norm) ** 0.5 if self.e_norm > 0.0 else None

    @property
    def skill(self) -> float | None:
        """1 − sqrt(e_relex / e_hold): > 0 when extrapolating beats stopping at the anchor."""
        return 1.0 - (self.e_relex / self.e_hold) ** 0.5 if self.e_hold > 0.0 else None


def horizon_label(horizon: float) -> str:
    """Metric label of a horizon: 2.0 → "2x", 1.5 → "1.5x" (bounded: a handful of configured values)."""
    return f"{horizon:g}x"
