"""One source for the alerts (deploy/alerts.toml → deploy/generate.py): the generated files are up
to date, derived rather than copied, and the Grafana-managed rules are valid provisioning files that
evaluate exactly the Prometheus rules' expressions (issue 16). No Grafana server is installable
here, so the provisioning format is checked against Grafana's own source of it:

* pkg/services/provisioning/alerting/types.go (AlertingFileV1: apiVersion, groups) and
  rules_types.go (AlertRuleGroupV1: name and folder required, interval parsed as a Prometheus
  duration, orgId < 1 → 1; AlertRuleV1: title, uid, condition and a non-empty data list required,
  for parsed as a duration; QueryV1: refId, queryType, relativeTimeRange, datasourceUid, model);
* pkg/services/ngalert/models/alert_rule.go: noDataState ∈ {Alerting, NoData, OK} and
  execErrState ∈ {Alerting, Error, OK} (newer versions add KeepLast to both);
* rules_types.go maps annotations and query models from their *raw* text (no environment
  expansion), while titles, labels and datasourceUid go through os.ExpandEnv
  (pkg/services/provisioning/values/values.go), so those must not contain ``$``;
* Grafana's template reference (grafana.com/docs/grafana/latest/alerting/alerting-rules/templates/
  reference): ``$values`` holds every instant query's and expression's value by refId.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploy._tools import ROOT, require_tool

DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")  # github.com/prometheus/common/model.ParseDuration
UID = re.compile(r"^[a-zA-Z0-9_-]{1,40}$")  # pkg/util: IsValidShortUID, IsShortUIDTooLong (> 40)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relexd_deploy_generate", ROOT / "deploy" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _grafana() -> dict[str, Any]:
    return yaml.safe_load(gen.GRAFANA.read_text())


def _prometheus() -> dict[str, Any]:
    return yaml.safe_load(gen.PROMETHEUS.read_text())


def _grafana_rules() -> dict[str, dict[str, Any]]:
    return {r["title"]: r for g in _grafana()["groups"] for r in g["rules"]}


def _prometheus_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in _prometheus()["groups"] for r in g["rules"]}


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_threshold_comes_from_the_source(tmp_path: Path) -> None:
    """Change the numbers in a copy of the source: every output follows — nothing is copied by hand."""
    source = tomllib.loads((ROOT / "deploy" / "alerts.toml").read_text())
    source["thresholds"] |= {"fit_below": 0.77, "drift_for": "45m", "stall_default_seconds": 999}
    out = gen.outputs(source)
    prom = {r["alert"]: r for g in yaml.safe_load(out[gen.PROMETHEUS])["groups"] for r in g["rules"]}
    graf = {r["title"]: r for g in yaml.safe_load(out[gen.GRAFANA])["groups"] for r in g["rules"]}
    fit = "relexd_rank1_energy_ratio < 0.77 or relexd_fit_r2 < 0.77"
    assert (
        prom["RelexLinearFitDegraded"]["expr"]
        == fit
        == graf["RelexLinearFitDegraded"]["data"][0]["model"]["expr"]
    )
    assert "below 0.77 for 30 minutes" in prom["RelexLinearFitDegraded"]["annotations"]["description"]
    assert prom["RelexDirectionUnstable"]["for"] == "45m" == graf["RelexDirectionUnstable"]["for"]
    assert "for 45 minutes" in graf["RelexDirectionUnstable"]["annotations"]["description"]
    assert "+ 999" in prom["RelexCheckpointStalled"]["expr"]
    lines = {p["title"]: p for p in gen._panels(json.loads(out[gen.DASHBOARD]))}

    def steps(title: str) -> list[float]:
        return [
            s["value"]
            for s in lines[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
            if s["value"] is not None
        ]

    assert steps("Rank-1 energy ratio and R²") == [0.77]
    assert steps("Time since last checkpoint") == [999]
    with pytest.raises(KeyError, match="not_a_threshold"):
        gen.fill("x < <<not_a_threshold>>", source["thresholds"])


def test_grafana_rules_evaluate_the_prometheus_expressions() -> None:
    prom, graf = _prometheus_rules(), _grafana_rules()
    assert set(graf) == set(prom)
    for name, rule in graf.items():
        twin = prom[name]
        queries = {q["refId"]: q for q in rule["data"]}
        assert queries["A"]["model"]["expr"] == twin["expr"].strip(), name
        assert queries["A"]["model"]["instant"] is True and queries["A"]["model"]["range"] is False
        # B is 1 for every series A returns, C fires where B > 0: the Prometheus semantics of a
        # filtering expression (Grafana's own conversion, pkg/services/ngalert/prom/query.go)
        assert queries["B"]["model"]["expression"] == "is_number($A) || is_nan($A) || is_inf($A)"
        assert queries["C"]["model"]["expression"] == "B" and rule["condition"] == "C"
        assert queries["C"]["model"]["conditions"] == [{"evaluator": {"type": "gt", "params": [0]}}]
        assert rule["for"] == twin.get("for", "0s"), name
        assert rule["labels"] == twin["labels"], name


def test_grafana_provisioning_file_matches_grafanas_schema() -> None:
    doc = _grafana()
    assert set(doc) == {"apiVersion", "groups"} and doc["apiVersion"] == 1
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    dashboards = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/relexd.yml").read_text())
    seen_uids: set[str] = set()
    for group in doc["groups"]:
        assert set(group) == {"orgId", "name", "folder", "interval", "rules"}
        assert group["name"].strip() and group["folder"] == dashboards["providers"][0]["folder"]
        assert DURATION.match(group["interval"]) and group["rules"]
        titles = [r["title"] for r in group["rules"]]
        assert len(titles) == len(set(titles)), "titles must be unique in a folder"
        for rule in group["rules"]:
            allowed = {
                "uid", "title", "condition", "data", "noDataState", "execErrState", "for",
                "annotations", "labels", "isPaused",
            }  # fmt: skip
            assert set(rule) <= allowed, set(rule) - allowed
            assert UID.match(rule["uid"]) and rule["uid"] not in seen_uids
            seen_uids.add(rule["uid"])
            assert rule["noDataState"] in {"Alerting", "NoData", "OK"}
            assert rule["execErrState"] in {"Alerting", "Error", "OK"}
            assert DURATION.match(rule["for"])
            assert rule["condition"] in {q["refId"] for q in rule["data"]}
            for text in (rule["title"], *rule["labels"].values()):
                assert "$" not in text, f"{text!r} would be expanded as an environment variable"
            assert all(isinstance(v, str) for v in (*rule["labels"].values(), *rule["annotations"].values()))
            for query in rule["data"]:
                assert set(query) == {"refId", "queryType", "relativeTimeRange", "datasourceUid", "model"}
                assert set(query["relativeTimeRange"]) == {"from", "to"}
                assert query["model"]["refId"] == query["refId"]
                if query["datasourceUid"] != "__expr__":
                    assert query["datasourceUid"] in uids, "the rules must query the provisioned data source"
                    assert query["model"]["datasource"] == {
                        "type": "prometheus",
                        "uid": query["datasourceUid"],
                    }


def test_grafana_annotations_use_grafanas_template_variables() -> None:
    for name, rule in _grafana_rules().items():
        refs = {q["refId"] for q in rule["data"]}
        for key, text in rule["annotations"].items():
            assert text.count("{{") == text.count("}}"), (name, key)
            # Prometheus-only: $value as a number and the query function
            assert not re.search(r"\$value\b(?!s)", text), (name, key, text)
            assert "| query" not in text, (name, key)
            for ref in re.findall(r"\$values\.(\w+)\.Value", text):
                assert ref in refs, (name, key, ref)


def test_every_grafana_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "run scripts/install-test-tools.sh")
    rules = [
        {"alert": name, "expr": next(q for q in r["data"] if q["refId"] == "A")["model"]["expr"]}
        for name, r in _grafana_rules().items()
    ]
    path = tmp_path / "grafana-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
