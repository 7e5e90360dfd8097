"""Streaming estimates vs batch SVD on planted trajectories, in memory (issue 5 item 3a).

Per tensor x_s = (a + b·s)·u + noise_s with u a unit vector and the noise either

- ``iid``: independent N(0, σ²) per checkpoint (what a rank-1 + white-noise model assumes), or
- ``walk``: a random walk (noise_s = Σ of independent increments up to s), closer to SGD noise,
  whose energy concentrates in a few smooth directions and so competes with u for a rank-k sketch.

σ is calibrated per tensor by bisection so that the BATCH rank-1 energy ratio σ₁²/Σ‖x_s‖² hits the
target (0.99, 0.9, 0.7). The batch answer is the exact top right singular vector of all T deltas
(Gram eigendecomposition in float64), the coefficients c = M·v, an OLS line in the step and the
preview (α + β·τ)·v at τ = 2 × the last observed step. Each streaming estimator sees the deltas one at
a time through ``relexd.math.sketch.update_in_memory`` (float32 state, as on disk). Reported:
1 − |cos(v_stream, v_batch)| (energy-weighted mean and worst tensor; negative values are float32
rounding) and the relative error of the
preview delta ‖p_stream − p_batch‖ / ‖p_batch‖ over all tensors (and, for context, the batch
preview's own error against the planted truth).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import markdown_table
from relexd.math.fit import fit_line
from relexd.math.sketch import SmallState, update_in_memory

F64 = torch.float64
#: Tensor sizes (a few hundred thousand parameters over weights, a norm and a bias).
SIZES_FULL = {"mlp.weight": 200_000, "attn.weight": 60_000, "emb.rows": 30_000, "norm": 896, "bias": 128}
SIZES_QUICK = {"mlp.weight": 40_000, "attn.weight": 10_000, "norm": 896, "bias": 128}
ESTIMATORS = [("oja", 1), ("brand", 1), ("brand", 2), ("brand", 4), ("brand", 8)]
TARGETS = (0.99, 0.9, 0.7)


def irregular_steps(count: int, seed: int = 0) -> list[int]:
    """Strictly increasing steps with random gaps of 1–8 (irregular save cadence)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(1, 9, (count,), generator=g).tolist()
    out, s = [], 0
    for gap in gaps:
        s += gap
        out.append(s)
    return out


@dataclass
class Planted:
    """One tensor's planted trajectory: signal rows and a unit-scale noise matrix (T × d)."""

    signal: torch.Tensor  # (T, d) float64 = c_s·u
    noise: torch.Tensor  # (T, d) float64, scaled later
    u: torch.Tensor
    coef: torch.Tensor

    def deltas(self, sigma: float) -> torch.Tensor:
        return self.signal + sigma * self.noise


def plant(d: int, steps: list[int], kind: str, seed: int) -> Planted:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=F64)
    u /= u.norm()
    s = torch.tensor(steps, dtype=F64)
    coef = 0.05 * s[-1] + s  # a + b·s with an offset, like a fast early move
    noise = torch.randn(len(steps), d, generator=g, dtype=F64) / d**0.5
    if kind == "walk":
        gaps = torch.diff(s, prepend=torch.zeros(1, dtype=F64))
        noise = torch.cumsum(noise * gaps.sqrt()[:, None], dim=0)  # Brownian in the step
    return Planted(coef[:, None] * u, noise, u, coef)


def batch_top(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact top right singular vector (sign: newest coefficient ≥ 0), coefficients, energy ratio."""
    vals, vecs = torch.linalg.eigh(m @ m.T)
    lam, left = vals[-1], vecs[:, -1]
    v = m.T @ left / lam.clamp_min(1e-300).sqrt()
    v /= v.norm()
    c = m @ v
    if c[-1] < 0:
        v, c = -v, -c
    return v, c, float(lam / vals.sum())


def calibrate(p: Planted, target: float) -> float:
    """σ giving batch rank-1 energy ``target`` (bisection in log σ; energy falls as σ grows)."""
    lo, hi = 1e-6, 1e6
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        m = p.deltas(mid)
        g = m @ m.T
        vals = torch.linalg.eigvalsh(g)
        if float(vals[-1] / vals.sum()) > target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def stream(estimator: str, width: int, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the rows of ``m`` one at a time; returns (v, coefficients)."""
    small, q = SmallState.empty(), torch.zeros(width, m.shape[1])
    for x in m.to(torch.float32):
        small, q = update_in_memory(estimator, small, q, x, width)
    return q[0].to(F64), small.coefficients


def preview(v: torch.Tensor, coefs: torch.Tensor, steps: torch.Tensor, tau: float) -> torch.Tensor:
    fit = fit_line(steps, coefs)
    return fit.predict(tau) * v


def run(quick: bool = False, steps_count: int | None = None) -> dict[str, Any]:
    """All noise kinds × energy targets × estimators; returns table rows."""
    sizes = SIZES_QUICK if quick else SIZES_FULL
    count = steps_count or (40 if quick else 60)
    steps = irregular_steps(count)
    st = torch.tensor(steps, dtype=F64)
    tau = 2.0 * steps[-1]
    rows: list[list[Any]] = []
    for kind in ("iid", "walk"):
        for target in TARGETS:
            tensors = []
            for i, (_name, d) in enumerate(sizes.items()):
                p = plant(d, steps, kind, seed=1000 * i + 7)
                m = p.deltas(calibrate(p, target))
                v, c, energy = batch_top(m)
                if abs(energy - target) > 0.01:  # e.g. a pure random walk is itself ~0.8 rank-1
                    break
                weight = float((m * m).sum())
                truth = (0.05 * steps[-1] + tau) * p.u
                tensors.append((m, v, preview(v, c, st, tau), weight, energy, truth))
            if len(tensors) < len(sizes):
                rows.append([kind, target, "unreachable", "–", None, None, None, None, None])
                continue
            total_w = sum(t[3] for t in tensors)
            energy = sum(t[4] * t[3] for t in tensors) / total_w
            pb_sq = sum(float(t[2] @ t[2]) for t in tensors)
            truth_err = (sum(float((t[2] - t[5]).square().sum()) for t in tensors) / pb_sq) ** 0.5
            for estimator, k in ESTIMATORS:
                coss, err_sq = [], 0.0
                for m, v_b, p_b, w, _e, _truth in tensors:
                    v_s, c_s = stream(estimator, k, m)
                    coss.append((abs(float(v_s @ v_b)) / float(v_s.norm()), w))
                    err_sq += float((preview(v_s, c_s, st, tau) - p_b).square().sum())
                rows.append(
                    [
                        kind,
                        target,
                        energy,
                        estimator if estimator == "oja" else f"brand k={k}",
                        f"{1 - sum(c * w for c, w in coss) / total_w:.1e}",
                        f"{1 - min(c for c, _ in coss):.1e}",
                        (err_sq / pb_sq) ** 0.5,
                        truth_err,
                        4 * k,
                    ]
                )
                print(markdown_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    return {"rows": rows, "sizes": sizes, "steps": steps}


HEADERS = [
    "noise",
    "target energy",
    "batch energy (measured)",
    "estimator",
    "1 − abs(cos) to batch (energy-weighted)",
    "1 − abs(cos) worst tensor",
    "preview rel. err vs batch @2×",
    "batch preview rel. err vs truth",
    "state bytes/param",
]


def report(result: dict[str, Any]) -> str:
    steps = result["steps"]
    head = (
        f"Tensors (d): {result['sizes']}; {len(steps)} irregular steps {steps[0]}…{steps[-1]}, "
        f"preview at τ = {2 * steps[-1]}.\n\n"
    )
    return head + markdown_table(HEADERS, result["rows"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    print(report(run(args.quick, args.steps)))


if __name__ == "__main__":
    main()
