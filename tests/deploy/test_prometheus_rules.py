"""promtool check/test for the alert rules and the example Prometheus config."""

from __future__ import annotations

import subprocess

from ._tools import ROOT, require_tool

PROM = ROOT / "deploy" / "prometheus"
HINT = "run scripts/install-test-tools.sh"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("promtool", HINT)
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=PROM, timeout=120)


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", "relexd-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "relexd-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    import yaml

    rules = yaml.safe_load((PROM / "relexd-alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "relexd-alerts.test.yml").read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts <= fires, f"no firing case for {alerts - fires}"
    assert alerts <= quiet, f"no quiet case for {alerts - quiet}"
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("info", "warning", "critical")
            assert {"summary", "description"} <= set(r["annotations"])
