"""Previews against planted ground truth, and the engine's on-disk sketch against batch SVD."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relexd.engine import Engine, EngineConfig
from relexd.io.reader import open_weights
from tests.engine.planted import SHAPES, Planted, write_hf_checkpoint

IRREGULAR = [4, 6, 7, 11, 16, 18, 25, 31, 40, 42, 50, 60]


def build_run(tmp: Path, planted: Planted, steps: list[int]) -> tuple[Path, Path]:
    base = write_hf_checkpoint(tmp / "base", planted.base)
    run = tmp / "run"
    for s in steps:
        write_hf_checkpoint(run / f"checkpoint-{s}", planted.at(s), s)
    return base, run


def ingest_all(engine: Engine, run: Path, steps: list[int]) -> None:
    for s in steps:
        engine.ingest(run / f"checkpoint-{s}", s)


MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distance between neighbouring values of ``dtype`` around each value (its rounding step q)."""
    _, exponent = torch.frexp(values.double())  # |v| = m·2^e with m in [0.5, 1)
    return torch.pow(2.0, (exponent - 1 - MANTISSA_BITS[dtype]).double())


def tolerance(planted: Planted, name: str, steps: list[int], target: int) -> float:
    """Expected ‖preview − truth‖ from the noise and the dtype's rounding, times 4 for slack.

    Each stored checkpoint carries per-element noise σ_e² = σ² + q²/12 (q: rounding step of the
    stored dtype at the checkpoint's values). The OLS coefficient at τ then errs by
    σ_e·sqrt(1/T + (τ − s̄)²/Sxx) and the direction by about σ_e·sqrt(d)/sqrt(Σ c_s²) per unit
    coefficient; writing the preview rounds once more, and the float32 arithmetic adds a few ulps.
    """
    dtype = planted.base[name].dtype
    d = planted.base[name].numel()
    q2 = sum(float((spacing(planted.exact(s)[name], dtype) ** 2).mean()) for s in steps) / len(steps)
    q2_out = float((spacing(planted.exact(target)[name], dtype) ** 2).mean())
    sigma_e = math.sqrt(planted.noise**2 + q2 / 12)
    s = torch.tensor(steps, dtype=torch.float64)
    c = planted.a + planted.b * s
    lev = 1 / len(steps) + float((target - s.mean()) ** 2 / ((s - s.mean()) ** 2).sum())
    c_target = planted.a + planted.b * target
    direction = c_target * sigma_e * math.sqrt(d) / float(c.norm())
    coefficient = sigma_e * math.sqrt(lev)
    output = math.sqrt(d * q2_out / 12)
    # the sketch and the preview are float32 arithmetic: a few ulps of the values per element
    compute = 8 * 2.0**-24 * float(planted.exact(target)[name].norm())
    return 4 * (direction + coefficient + output + compute)


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_preview_matches_planted_truth(tmp_path: Path, noise: float) -> None:
    planted = Planted.make(noise=noise, b=0.03)
    base, run = build_run(tmp_path, planted, IRREGULAR)
    target = 240  # 4× the newest observed step
    with Engine(tmp_path / "state", base, EngineConfig()) as engine:
        ingest_all(engine, run, IRREGULAR)
        preview = engine.write_preview(target, tmp_path / "previews")
    got = load_file(str(preview / "model.safetensors"))
    truth = planted.exact(target)
    last = planted.at(IRREGULAR[-1])
    for name, (_, dtype) in SHAPES.items():
        assert got[name].dtype == dtype
        err = float((got[name].double() - truth[name]).norm())
        tol = tolerance(planted, name, IRREGULAR, target)
        moved = float((truth[name] - last[name].double()).norm())
        assert tol < 0.25 * moved, "tolerance too loose to tell a preview from the last checkpoint"
        assert err <= tol, (name, err, tol)


def deltas_from_disk(base: Path, run: Path, steps: list[int], name: str) -> torch.Tensor:
    with open_weights(base) as b:
        theta0 = b.read(name).double().reshape(-1)
    rows = []
    for s in steps:
        with open_weights(run / f"checkpoint-{s}") as r:
            rows.append(r.read(name).double().reshape(-1) - theta0)
    return torch.stack(rows)


def engine_direction(state: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from relexd.state.store import read_snapshot

    snap = read_snapshot(state)
    sketch = snap.sketch()
    assert sketch is not None
    v = sketch.vectors(name)[0].double()
    sketch.close()
    return v, snap.small(name).coefficients


def test_engine_equals_batch_svd_when_rank_covers_all_checkpoints(tmp_path: Path) -> None:
    planted = Planted.make(noise=0.02)
    steps = IRREGULAR[:9]
    base, run = build_run(tmp_path, planted, steps)
    with Engine(tmp_path / "state", base, EngineConfig(rank=len(steps))) as engine:
        ingest_all(engine, run, steps)
    for name in SHAPES:
        x = deltas_from_disk(base, run, steps, name)
        _, _s, vh = torch.linalg.svd(x, full_matrices=False)
        v_ref, c_ref = vh[0], x @ vh[0]
        if c_ref[-1] < 0:
            v_ref, c_ref = -v_ref, -c_ref
        v, c = engine_direction(tmp_path / "state", name)
        assert (v - v_ref).norm() / v_ref.norm() < 1e-5, name
        assert (c - c_ref).norm() / c_ref.norm() < 1e-5, name


def test_engine_default_rank_tracks_batch_direction(tmp_path: Path) -> None:
    planted = Planted.make(noise=0.01, b=0.01)
    steps = list(range(5, 125, 5))  # 24 checkpoints ≫ default rank
    base, run = build_run(tmp_path, planted, steps)
    with Engine(tmp_path / "state", base, EngineConfig()) as engine:
        ingest_all(engine, run, steps)
    checked = 0
    for name in SHAPES:
        x = deltas_from_disk(base, run, steps, name)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        if float(s[0] ** 2 / (s**2).sum()) < 0.9:
            continue
        v, _ = engine_direction(tmp_path / "state", name)
        assert abs(float(v @ vh[0])) / float(v.norm()) >= 0.999, name
        checked += 1
    assert checked >= 3


def test_zero_delta_tensor_stays_at_base(tmp_path: Path) -> None:
    planted = Planted.make(noise=0.0)
    frozen = "model.norm.weight"
    planted.directions[frozen] = torch.zeros_like(planted.directions[frozen])
    base, run = build_run(tmp_path, planted, [10, 20, 30])
    with Engine(tmp_path / "state", base, EngineConfig()) as engine:
        ingest_all(engine, run, [10, 20, 30])
        preview = engine.write_preview(90, tmp_path / "p")
    assert torch.equal(load_file(str(preview / "model.safetensors"))[frozen], planted.base[frozen])


def test_single_shard_with_index_keeps_its_index(tmp_path: Path) -> None:
    """A source whose only weight file is not model.safetensors must get an index, or no loader
    finds the weights."""
    import json

    planted = Planted.make(noise=0.0)
    base, run = build_run(tmp_path, planted, [10, 20])
    shard = "model-00001-of-00001.safetensors"
    for s in (10, 20):
        ckpt = run / f"checkpoint-{s}"
        (ckpt / "model.safetensors").rename(ckpt / shard)
        (ckpt / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": dict.fromkeys(SHAPES, shard)})
        )
    with Engine(tmp_path / "state", base, EngineConfig()) as engine:
        ingest_all(engine, run, [10, 20])
        preview = engine.write_preview(40, tmp_path / "p")
    index = json.loads((preview / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {shard} and (preview / shard).is_file()


def test_a_stop_during_a_preview_write_publishes_nothing_and_keeps_the_previous_one(tmp_path: Path) -> None:
    from relexd.engine import Interrupted

    planted = Planted.make(noise=0.0)
    base, run = build_run(tmp_path, planted, [10, 20, 30])
    with Engine(tmp_path / "state", base, EngineConfig()) as engine:
        ingest_all(engine, run, [10, 20])
        before = engine.write_preview(90, tmp_path / "p")
        kept = (before / "model.safetensors").read_bytes()
        engine.ingest(run / "checkpoint-30", 30)
        polls = iter([False, False, True])
        with pytest.raises(Interrupted):
            engine.write_preview(90, tmp_path / "p", should_stop=lambda: next(polls))
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["step-90"]  # no staging left
    assert (before / "model.safetensors").read_bytes() == kept
