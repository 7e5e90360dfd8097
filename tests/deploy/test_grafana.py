"""The Grafana dashboard: valid for file provisioning, queries parse, metric names exist."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from relexd.telemetry import ForecastFigures, RelexdMetrics

from ._tools import ROOT, require_tool

DASHBOARD = ROOT / "deploy" / "grafana" / "relexd.json"
PROMQL_FUNCS_AND_KEYWORDS = {
    "sum", "by", "without", "rate", "increase", "histogram_quantile", "time", "le", "instance",
    "job", "or", "and", "unless", "on", "ignoring", "label_values", "max", "min", "avg",
}  # fmt: skip


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(d: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in all_panels(d) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Replace Grafana variables by what Grafana would send, so promtool can parse it."""
    expr = expr.replace("$__rate_interval", "5m").replace("${datasource}", "prometheus")
    return re.sub(r"\$\{?(job|instance)\}?", ".*", expr)


def exposed_names() -> set[str]:
    m = RelexdMetrics(per_tensor=True)
    m.observe_ingest(1, 1.0, 1, 1.0)
    m.count_error("io")
    m.set_confidence(
        {"rank1_energy_ratio": 1, "tensor_energy_ratio_min": 1, "fit_r2": 1, "direction_drift": 0},
        [ForecastFigures(2, 0.1, 0.1, 2.0)],
    )
    m.set_tensor_figures({"w": 1.0})
    m.set_stall_threshold(60)
    m.set_ingest_cores(2, 0.5)
    m.observe_preview_written("t", 2, 1.0)
    m.set_eval_score("t", 1.0)
    m.set_eval_figures(checkpoint=(2, 0.5), realized={"2x": (0.5, 0.1)}, leads={"t": (0.1, 1, "2x")})
    text = m.exposition().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_dashboard_shape() -> None:
    d = load()
    assert "__inputs" not in d, "file provisioning cannot resolve __inputs"
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    data_panels = [p for p in all_panels(d) if p["type"] != "row"]
    assert data_panels
    for p in data_panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()


def test_every_query_parses(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "run scripts/install-test-tools.sh")
    rules = [
        {"record": f"relexd:dashboard_query:{i}", "expr": substitute(q)}
        for i, q in enumerate(queries(load()))
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_name_is_exposed() -> None:
    exposed = exposed_names() | {"up"}
    used: set[str] = set()
    for q in queries(load()):
        q = re.sub(r'"[^"]*"', '""', q)  # drop label values and legend text
        q = re.sub(r"\[[^\]]*\]", "", q)  # drop range selectors
        used |= set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", q))
    names = {n for n in used if n.startswith(("relexd_", "up"))}
    assert names, "no metric names found in the dashboard"
    missing = names - exposed
    assert not missing, f"dashboard uses metrics RelexdMetrics does not expose: {sorted(missing)}"


def test_threshold_lines_are_the_alert_thresholds() -> None:
    """The lines are generated from deploy/alerts.toml (tests/deploy/test_alert_sources.py checks
    they are up to date); here: each one is the number its alert compares with."""
    import tomllib

    source = tomllib.loads((ROOT / "deploy" / "alerts.toml").read_text())
    t = source["thresholds"]
    alerts = (ROOT / "deploy" / "prometheus" / "relexd-alerts.yml").read_text()
    by_title = {p["title"]: p for p in all_panels(load())}

    def steps(title: str) -> list[float]:
        th = by_title[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return [s["value"] for s in th if s["value"] is not None]

    assert steps("Forecast skill per horizon") == [t["skill_below"]]
    assert f"relexd_forecast_skill < {t['skill_below']}" in alerts
    assert steps("Rank-1 energy ratio and R²") == [t["fit_below"]] and f"< {t['fit_below']}" in alerts
    assert steps("Direction drift") == [t["drift_above"]]
    assert f"relexd_direction_drift > {t['drift_above']}" in alerts
    assert steps("Time since last checkpoint") == [t["stall_default_seconds"]]
    assert f"+ {t['stall_default_seconds']}" in alerts
    from relexd.demo.cli import AHEAD_STREAK  # the demo and the bench judge the alert's condition

    assert t["ahead_streak"] == AHEAD_STREAK
    assert steps("Preview lead over training") == [0]
    assert f"relexd_preview_lead_streak >= {AHEAD_STREAK}" in alerts
    assert (
        steps("Realized validation per horizon") == [0] and "relexd_preview_realized_advantage > 0" in alerts
    )


def test_provisioning_files() -> None:
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    dash = yaml.safe_load((prov / "dashboards" / "relexd.yml").read_text())
    assert dash["apiVersion"] == 1 and dash["providers"][0]["type"] == "file"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
