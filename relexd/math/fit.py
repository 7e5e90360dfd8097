"""Ordinary least squares of a direction's coefficient against the step number (DESIGN.md §1).

Fitting against real step numbers, not checkpoint indices, makes irregular save cadences just work;
on evenly spaced checkpoints the two give the same predictions (OLS is shift and scale invariant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LineFit:
    """c(s) ≈ alpha + beta·s over the fitted points, with the in-window coefficient of determination."""

    alpha: float
    beta: float
    r2: float | None  # None when undefined (fewer than 3 points or constant coefficients)
    points: int

    def predict(self, step: float) -> float:
        return self.alpha + self.beta * step


def fit_line(steps: torch.Tensor, coefs: torch.Tensor, window: int | None = None) -> LineFit:
    """OLS of ``coefs`` on ``steps``, over the last ``window`` points when given.

    One point gives a constant (beta = 0): with nothing to extrapolate from, holding still is the only
    honest prediction. R² needs at least three points — two points always fit a line perfectly.
    Computed in numpy (float64): it runs once per tensor per checkpoint, where torch's per-call
    overhead cost tens of µs.
    """
    if steps.shape != coefs.shape or steps.ndim != 1:
        raise ValueError("steps and coefs must be 1-D and of equal length")
    if window is not None:
        if window < 1:
            raise ValueError("window must be ≥ 1")
        steps, coefs = steps[-window:], coefs[-window:]
    n = int(steps.shape[0])
    if n == 0:
        return LineFit(0.0, 0.0, None, 0)
    s = np.asarray(steps, dtype=np.float64)
    c = np.asarray(coefs, dtype=np.float64)
    s_mean, c_mean = float(s.mean()), float(c.mean())
    ds, dc = s - s_mean, c - c_mean
    sxx = float(ds @ ds)
    if n == 1 or sxx == 0.0:
        return LineFit(c_mean, 0.0, None, n)
    beta = float(ds @ dc) / sxx
    alpha = c_mean - beta * s_mean
    syy = float(dc @ dc)
    r2 = None
    if n >= 3 and syy > 0.0:
        resid = c - (alpha + beta * s)
        r2 = 1.0 - float(resid @ resid) / syy
    return LineFit(alpha, beta, r2, n)


def weighted_mean(values: list[tuple[float | None, float]]) -> float | None:
    """Σ w·v / Σ w over the pairs (v, w) whose value is known; None when no weight is left."""
    num = den = 0.0
    for value, weight in values:
        if value is None or weight <= 0.0 or math.isnan(value):
            continue
        num += value * weight
        den += weight
    return num / den if den > 0.0 else None
