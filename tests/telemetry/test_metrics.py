"""The metrics contract of DESIGN.md §4, checked on the real exposition."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relexd.errors import REASONS, CheckpointError
from relexd.telemetry import ForecastFigures, RelexdMetrics

# DESIGN.md §4, verbatim: metric name -> label names (besides none).
CONTRACT: dict[str, tuple[str, ...]] = {
    "relexd_rank1_energy_ratio": (),
    "relexd_tensor_energy_ratio_min": (),
    "relexd_fit_r2": (),
    "relexd_direction_drift": (),
    "relexd_forecast_error_ratio": ("horizon",),
    "relexd_forecast_skill": ("horizon",),
    "relexd_forecast_horizon_ratio": ("horizon",),
    "relexd_last_checkpoint_step": (),
    "relexd_observed_checkpoints": (),
    "relexd_last_checkpoint_timestamp_seconds": (),
    "relexd_checkpoints_ingested_total": (),
    "relexd_checkpoint_errors_total": ("reason",),
    "relexd_ingest_duration_seconds": (),
    "relexd_ingest_bytes_total": (),
    "relexd_preview_step": ("target",),
    "relexd_previews_written_total": (),
    "relexd_preview_write_duration_seconds": (),
    "relexd_preview_eval_score": ("target",),
    "relexd_preview_hook_failures_total": (),
    "relexd_build_info": ("version",),
    "relexd_watcher_up": (),
    "relexd_checkpoint_eval_score": (),
    "relexd_preview_realized_gain_share": ("horizon",),
    "relexd_preview_realized_advantage": ("horizon",),
    "relexd_preview_lead": ("target",),
}


def families(m: RelexdMetrics) -> dict[str, object]:
    text = m.exposition().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        # the parser names a counter family without its "_total" suffix; key it by the
        # exposed sample name, which is what the contract and PromQL use
        out[f"{fam.name}_total" if fam.type == "counter" else fam.name] = fam
    return out


def samples(m: RelexdMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    fam = families(m)[name]
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name == name}


def populated() -> RelexdMetrics:
    m = RelexdMetrics(version="9.9.9")
    m.observe_ingest(step=100, seconds=2.0, nbytes=4096, timestamp=1_700_000_000.0)
    m.count_error("truncated")
    m.set_confidence(
        {
            "rank1_energy_ratio": 0.95,
            "tensor_energy_ratio_min": 0.6,
            "fit_r2": 0.93,
            "direction_drift": 0.01,
        },
        [ForecastFigures(horizon=2, error_ratio=0.36, skill=0.25, ratio_used=2.1)],
    )
    m.observe_preview_written("ahead_2x", 200, 3.5)
    m.set_eval_score("ahead_2x", 0.42)
    m.set_eval_figures(
        checkpoint=(100, 0.4), realized={"2x": (0.5, 0.02)}, leads={"ahead_2x": (0.02, 1, "2x")}
    )
    m.count_hook_failure()
    m.set_watcher_up(True)
    return m


def test_every_contract_metric_is_exposed_with_help_even_before_any_value() -> None:
    fams = families(RelexdMetrics())
    for name in CONTRACT:
        assert name in fams, f"{name} missing from the exposition"
        assert len(fams[name].documentation) > 40, f"{name} needs a HELP text that explains it"


def test_contract_metrics_carry_exactly_their_labels() -> None:
    fams = families(populated())
    for name, labels in CONTRACT.items():
        own = [s for s in fams[name].samples if s.name in (name, f"{name}_bucket")]
        assert own, f"{name} has no sample after populating"
        for s in own:
            assert set(s.labels) - {"le"} == set(labels), (name, s.labels)


def test_histograms_and_counters_have_the_right_type() -> None:
    fams = families(populated())
    assert fams["relexd_ingest_duration_seconds"].type == "histogram"
    assert fams["relexd_preview_write_duration_seconds"].type == "histogram"
    for name in CONTRACT:
        if name.endswith("_total"):
            assert fams[name].type == "counter", name


def test_values_land_where_expected() -> None:
    m = populated()
    assert samples(m, "relexd_last_checkpoint_step") == {(): 100.0}
    assert samples(m, "relexd_checkpoints_ingested_total") == {(): 1.0}
    assert samples(m, "relexd_ingest_bytes_total") == {(): 4096.0}
    assert samples(m, "relexd_observed_checkpoints") == {(): 1.0}
    assert samples(m, "relexd_forecast_skill") == {(("horizon", "2x"),): 0.25}
    assert samples(m, "relexd_forecast_horizon_ratio") == {(("horizon", "2x"),): 2.1}
    assert samples(m, "relexd_preview_step") == {(("target", "ahead_2x"),): 200.0}
    assert samples(m, "relexd_build_info") == {(("version", "9.9.9"),): 1.0}
    assert samples(m, "relexd_watcher_up") == {(): 1.0}
    errors = samples(m, "relexd_checkpoint_errors_total")
    assert errors[(("reason", "truncated"),)] == 1.0


def test_error_reasons_are_preinitialised_and_validated() -> None:
    m = RelexdMetrics()
    errors = samples(m, "relexd_checkpoint_errors_total")
    assert {dict(k)["reason"] for k in errors} == set(REASONS)
    assert set(errors.values()) == {0.0}
    m.count_error(CheckpointError("/x", "rotated", "gone"))
    assert samples(m, "relexd_checkpoint_errors_total")[(("reason", "rotated"),)] == 1.0
    with pytest.raises(ValueError):
        m.count_error("/some/path/as/label")


def test_unknown_confidence_is_absent_not_zero() -> None:
    m = RelexdMetrics()
    for name in ("relexd_rank1_energy_ratio", "relexd_forecast_skill", "relexd_fit_r2"):
        assert samples(m, name) == {}, name
    m.set_confidence(
        {"rank1_energy_ratio": 0.9, "fit_r2": None, "direction_drift": math.nan},
        [ForecastFigures("2x", error_ratio=None, skill=None, ratio_used=None)],
    )
    assert samples(m, "relexd_rank1_energy_ratio") == {(): 0.9}
    assert samples(m, "relexd_fit_r2") == {}
    assert samples(m, "relexd_direction_drift") == {}
    assert samples(m, "relexd_forecast_skill") == {}


def test_set_confidence_replaces_previous_horizons_and_figures() -> None:
    m = RelexdMetrics()
    m.set_confidence({"fit_r2": 0.9}, [ForecastFigures(2, 0.3, 0.2, 2.0), ForecastFigures(4, 0.5, -0.1, 4.2)])
    assert set(samples(m, "relexd_forecast_skill")) == {(("horizon", "2x"),), (("horizon", "4x"),)}
    m.set_confidence({}, [ForecastFigures(2, 0.3, 0.1, 2.0)])
    assert samples(m, "relexd_forecast_skill") == {(("horizon", "2x"),): 0.1}
    assert samples(m, "relexd_fit_r2") == {}
    assert m.confidence_value("relexd_forecast_skill", 2) == 0.1


def test_set_confidence_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown confidence"):
        RelexdMetrics().set_confidence({"r2": 0.9})


def test_per_tensor_series_only_when_opted_in() -> None:
    off = RelexdMetrics()
    off.set_tensor_figures({"model.embed_tokens.weight": 0.9})
    assert "relexd_tensor_energy_ratio" not in families(off)
    on = RelexdMetrics(per_tensor=True)
    on.set_tensor_figures({"a.weight": 0.9, "b.bias": None})
    assert samples(on, "relexd_tensor_energy_ratio") == {(("tensor", "a.weight"),): 0.9}


def test_eval_score_removal_and_forget_target() -> None:
    m = populated()
    m.set_eval_score("ahead_2x", None)
    assert samples(m, "relexd_preview_eval_score") == {}
    m.forget_target("ahead_2x")
    assert samples(m, "relexd_preview_step") == {}
    m.forget_target("never-configured")  # no error


def test_stall_threshold_absent_until_set() -> None:
    m = RelexdMetrics()
    assert samples(m, "relexd_checkpoint_stall_threshold_seconds") == {}
    m.set_stall_threshold(900)
    assert samples(m, "relexd_checkpoint_stall_threshold_seconds") == {(): 900.0}
    m.set_stall_threshold(None)
    assert samples(m, "relexd_checkpoint_stall_threshold_seconds") == {}
    with pytest.raises(ValueError):
        m.set_stall_threshold(0)


def test_ingest_cores_absent_until_an_ingest_says_and_removed_when_it_does_not() -> None:
    m = RelexdMetrics()
    names = ("relexd_ingest_tensors_in_flight", "relexd_ingest_others_busy_cores")
    assert [samples(m, n) for n in names] == [{}, {}]  # HELP exposed, no value yet
    m.set_ingest_cores(2, 0.75)
    assert [samples(m, n) for n in names] == [{(): 2.0}, {(): 0.75}]
    m.set_ingest_cores(3, None)  # an explicit --threads: nobody watched
    assert [samples(m, n) for n in names] == [{(): 3.0}, {}]
    m.set_ingest_cores(None, float("nan"))  # --ray: the workers decided; NaN counts as unknown
    assert [samples(m, n) for n in names] == [{}, {}]
    with pytest.raises(ValueError):
        m.set_ingest_cores(0, None)
    with pytest.raises(ValueError):
        m.set_ingest_cores(1, -0.5)


def test_restore_progress_then_observed_increments() -> None:
    m = RelexdMetrics()
    m.restore_progress(step=500, observed=7, timestamp=1_700_000_000.0)
    m.observe_ingest(600, 1.0, 10, 1_700_000_600.0)
    assert samples(m, "relexd_observed_checkpoints") == {(): 8.0}
    assert samples(m, "relexd_last_checkpoint_timestamp_seconds") == {(): 1_700_000_600.0}


def test_registries_are_independent() -> None:
    a, b = RelexdMetrics(), RelexdMetrics()
    a.count_hook_failure()
    assert samples(b, "relexd_preview_hook_failures_total") == {(): 0.0}


def test_reward_space_figures_are_absent_until_known_and_replaced_as_a_whole() -> None:
    m = RelexdMetrics(process_metrics=False)
    fams = families(m)
    for name in ("relexd_checkpoint_eval_score", "relexd_preview_realized_gain_share", "relexd_preview_lead"):
        assert fams[name].samples == [], name  # discoverable from the start (HELP/TYPE), no value
    m.set_eval_figures(
        checkpoint=(40, 0.45),
        realized={"2x": (None, 0.1), "6x": (-0.5, -0.2)},  # 2x: training gained nothing → no share
        leads={"ahead:2x": (0.05, 4, "2x")},
    )
    get = m.registry.get_sample_value
    assert get("relexd_checkpoint_eval_score") == 0.45 and get("relexd_checkpoint_eval_step") == 40
    assert get("relexd_preview_realized_gain_share", {"horizon": "2x"}) is None
    assert get("relexd_preview_realized_advantage", {"horizon": "2x"}) == 0.1
    assert get("relexd_preview_realized_gain_share", {"horizon": "6x"}) == -0.5
    assert get("relexd_preview_lead", {"target": "ahead:2x"}) == 0.05
    assert get("relexd_preview_lead_streak", {"target": "ahead:2x", "horizon": "2x"}) == 4
    m.set_eval_figures(checkpoint=None, realized={}, leads={})
    assert (
        get("relexd_checkpoint_eval_score") is None
        and get("relexd_preview_lead", {"target": "ahead:2x"}) is None
    )
    m.count_evaluation("preview", "no_score")
    m.count_evaluation("checkpoint", "gone")
    assert get("relexd_evaluations_total", {"kind": "preview", "outcome": "no_score"}) == 1
    assert get("relexd_preview_hook_failures_total") == 1  # a deleted checkpoint is not a hook failure
