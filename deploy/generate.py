"""Write relexd's alert rules — for Prometheus and as Grafana-managed rules — and the dashboard's
threshold lines from the one definition in deploy/alerts.toml.

    python deploy/generate.py           # rewrite the generated files
    python deploy/generate.py --check   # exit 1, naming them, when any is out of date (CI)

Why a generator and not a builder library (grafana-foundation-sdk): the outputs are three small
files that operators read and copy, and the Prometheus one carries the reasons for every threshold
as comments. A library builds the Grafana objects but not the Prometheus rules, and no YAML
library writes comments, so the YAML is emitted here by hand (block style, JSON-quoted scalars,
which YAML reads as double-quoted strings); the tests load every output back with a YAML parser
and check it with promtool.

Grafana's side follows its file-provisioning format (pkg/services/provisioning/alerting in
grafana/grafana: AlertingFileV1 with apiVersion and groups; AlertRuleGroupV1 name/folder/interval/
rules; AlertRuleV1 uid/title/condition/data/noDataState/execErrState/for/annotations/labels;
QueryV1 refId/queryType/relativeTimeRange/datasourceUid/model) and evaluates each Prometheus
expression unchanged, the way Grafana's own Prometheus-rule conversion does
(pkg/services/ngalert/prom/query.go): query A is the PromQL as an instant query, B =
``is_number($A) || is_nan($A) || is_inf($A)`` (1 for every series A returns) and the condition C
is the threshold B > 0 — so a Grafana rule fires for exactly the series its Prometheus twin does.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent
SOURCE = DEPLOY / "alerts.toml"
PROMETHEUS = DEPLOY / "prometheus" / "relexd-alerts.yml"
GRAFANA = DEPLOY / "grafana" / "provisioning" / "alerting" / "relexd-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "relexd.json"

PLACEHOLDER = re.compile(r"<<(\w+)(\|words)?>>")
UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
#: Prometheus' $value → Grafana's value of query A ($values.A.Value; Grafana's template reference)
VALUE_PRINTF = re.compile(r'\{\{ \$value \| printf "([^"]*)" \}\}')
VALUE_HUMANIZE = re.compile(r"\{\{ \$value \| (humanize\w*) \}\}")
WIDTH = 100


def load(path: Path = SOURCE) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def words(duration: str) -> str:
    """ "30m" -> "30 minutes" (Prometheus duration, one unit)."""
    found = re.fullmatch(r"(\d+)([smhd])", duration)
    if not found:
        raise ValueError(f"{duration!r}: write durations as <number><s|m|h|d>")
    n, unit = int(found.group(1)), UNITS[found.group(2)]
    return f"{n} {unit}{'' if n == 1 else 's'}"


def fill(text: str, thresholds: dict[str, Any]) -> str:
    """Replace <<name>> and <<name|words>> from the thresholds; an unknown name is an error."""

    def one(match: re.Match[str]) -> str:
        name, as_words = match.group(1), match.group(2)
        if name not in thresholds:
            raise KeyError(f"deploy/alerts.toml: <<{name}>> is not in [thresholds]")
        value = thresholds[name]
        return words(value) if as_words else str(value)

    return PLACEHOLDER.sub(one, text)


def one_line(text: str) -> str:
    return " ".join(text.split())


def rules(source: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rule with thresholds filled in: expr, for, and both flavours of annotations."""
    t = source["thresholds"]
    out = []
    for rule in source["rules"]:
        summary = one_line(fill(rule["summary"], t))
        description = one_line(fill(rule["description"], t))
        grafana_description = one_line(fill(rule.get("grafana_description", rule["description"]), t))
        out.append(
            {
                "alert": rule["alert"],
                "group": rule["group"],
                "why": rule["why"].strip().splitlines(),
                "expr": fill(rule["expr"], t).strip(),
                "for": fill(rule["for"], t) if "for" in rule else None,
                "severity": rule["severity"],
                "summary": summary,
                "description": description,
                "grafana_summary": to_grafana_template(summary),
                "grafana_description": to_grafana_template(grafana_description),
            }
        )
    return out


def to_grafana_template(text: str) -> str:
    text = VALUE_PRINTF.sub(lambda m: f'{{{{ printf "{m.group(1)}" $values.A.Value }}}}', text)
    return VALUE_HUMANIZE.sub(lambda m: f"{{{{ {m.group(1)} $values.A.Value }}}}", text)


# --- YAML by hand (see the module docstring for why) ----------------------------------------------


def _q(text: str) -> str:
    """A YAML double-quoted scalar: JSON string syntax is a subset of it."""
    return json.dumps(text, ensure_ascii=False)


#: A word of an annotation: a run of non-space characters in which ``{{ … }}`` (which holds spaces)
#: counts as one character, so a template action is never split across lines
WORD = re.compile(r"(?:\{\{.*?\}\}|[^\s{]|\{(?!\{))+")


def _folded(text: str, indent: str) -> list[str]:
    """A ``>-`` folded scalar: the text wrapped at WIDTH, read back as one line."""
    lines, line = [], ""
    for word in WORD.findall(text):
        if line and len(indent) + len(line) + 1 + len(word) > WIDTH:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, indent + line]


def _expr(expr: str, indent: str) -> list[str]:
    if "\n" not in expr:
        return [f"{indent}expr: {expr if _plain_ok(expr) else _q(expr)}"]
    return [f"{indent}expr: |", *(f"{indent}  {ln}" if ln else "" for ln in expr.splitlines())]


def _plain_ok(text: str) -> bool:
    """Whether a one-line PromQL expression reads back unchanged as a plain YAML scalar."""
    return not re.search(r"^[\[\]{}&*!|>'\"%@`#,?:-]|: | #", text)


def prometheus_yaml(source: dict[str, Any]) -> str:
    out = [f"# {ln}".rstrip() for ln in source["prometheus"]["header"].strip().splitlines()]
    out.append("groups:")
    all_rules = rules(source)
    for group in dict.fromkeys(r["group"] for r in all_rules):
        out += [f"  - name: {group}", "    rules:"]
        for rule in (r for r in all_rules if r["group"] == group):
            out.append(f"      - alert: {rule['alert']}")
            out += [f"        # {ln}".rstrip() for ln in rule["why"]]
            out += _expr(rule["expr"], "        ")
            if rule["for"]:
                out.append(f"        for: {rule['for']}")
            out += ["        labels:", f"          severity: {rule['severity']}", "        annotations:"]
            out.append(f"          summary: {_q(rule['summary'])}")
            out += ["          description: >-", *_folded(rule["description"], "            ")]
            out.append("")
        if out[-1] == "":
            out.pop()
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def grafana_rule(rule: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """One Grafana-managed rule: the Prometheus expression as query A, B = "A returned this series",
    condition C = B > 0 (Grafana's own conversion of Prometheus rules)."""
    expr_ds = {"type": "__expr__", "uid": "__expr__"}
    return {
        "uid": "relexd-" + re.sub(r"(?<!^)(?=[A-Z])", "-", rule["alert"].removeprefix("Relex")).lower(),
        "title": rule["alert"],
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "queryType": "",
                "relativeTimeRange": {"from": 600, "to": 0},
                "datasourceUid": settings["datasource_uid"],
                "model": {
                    "refId": "A",
                    "datasource": {"type": "prometheus", "uid": settings["datasource_uid"]},
                    "expr": rule["expr"],
                    "instant": True,
                    "range": False,
                },
            },
            {
                "refId": "B",
                "queryType": "",
                "relativeTimeRange": {"from": 0, "to": 0},
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "B",
                    "datasource": expr_ds,
                    "type": "math",
                    "expression": "is_number($A) || is_nan($A) || is_inf($A)",
                },
            },
            {
                "refId": "C",
                "queryType": "",
                "relativeTimeRange": {"from": 0, "to": 0},
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "datasource": expr_ds,
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                },
            },
        ],
        "noDataState": settings["no_data_state"],
        "execErrState": settings["exec_err_state"],
        "for": rule["for"] or "0s",
        "labels": {"severity": rule["severity"]},
        "annotations": {"summary": rule["grafana_summary"], "description": rule["grafana_description"]},
        "isPaused": False,
    }


def grafana_file(source: dict[str, Any]) -> dict[str, Any]:
    settings = source["grafana"]
    all_rules = rules(source)
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": group,
                "folder": settings["folder"],
                "interval": settings["interval"],
                "rules": [grafana_rule(r, settings) for r in all_rules if r["group"] == group],
            }
            for group in dict.fromkeys(r["group"] for r in all_rules)
        ],
    }


def _yaml_value(value: Any, indent: int) -> list[str]:
    """Block-style YAML of JSON-like data: maps and lists on their own lines, scalars JSON-quoted."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines += [f"{pad}{key}:", *_yaml_value(item, indent + 2)]
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    lines = []
    for item in value:
        if not isinstance(item, dict | list):
            lines.append(f"{pad}- {_scalar(item)}")
            continue
        first, *rest = _yaml_value(item, indent + 2)
        lines += [f"{pad}- {first.lstrip()}", *rest]
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    return _q(str(value))


def grafana_yaml(source: dict[str, Any]) -> str:
    head = [
        "# Grafana-managed alert rules for relexd: the same alerts as deploy/prometheus/relexd-alerts.yml,",
        '# for teams that alert from Grafana instead of Alertmanager (README "Alerting"). GENERATED from',
        "# deploy/alerts.toml by deploy/generate.py — edit that file, not this one.",
        "# Copy to /etc/grafana/provisioning/alerting/; the rules query the data source whose uid is",
        f"# {source['grafana']['datasource_uid']!r} (provisioning/datasources/prometheus.yml provisions it).",
    ]
    return "\n".join([*head, *_yaml_value(grafana_file(source), 0)]) + "\n"


def dashboard_json(source: dict[str, Any], current: str) -> str:
    """The dashboard with each listed panel's threshold lines set from the thresholds."""
    board = json.loads(current)
    wanted = {d["title"]: [source["thresholds"][n] for n in d["thresholds"]] for d in source["dashboard"]}
    found = set()
    for panel in _panels(board):
        if panel.get("title") in wanted:
            found.add(panel["title"])
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            base = [s for s in steps if s["value"] is None][:1]
            colors = [s["color"] for s in steps if s["value"] is not None] or ["red"]
            values = wanted[panel["title"]]
            panel["fieldConfig"]["defaults"]["thresholds"]["steps"] = base + [
                {"color": colors[min(i, len(colors) - 1)], "value": v} for i, v in enumerate(values)
            ]
    missing = set(wanted) - found
    if missing:
        raise KeyError(f"deploy/alerts.toml names dashboard panels that do not exist: {sorted(missing)}")
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board.get("panels", []):
        out.append(panel)
        out += panel.get("panels", [])
    return out


def outputs(source: dict[str, Any] | None = None) -> dict[Path, str]:
    source = source or load()
    return {
        PROMETHEUS: prometheus_yaml(source),
        GRAFANA: grafana_yaml(source),
        DASHBOARD: dashboard_json(source, DASHBOARD.read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    stale = [p for p, text in outputs().items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(DEPLOY.parent)} is out of date: run python deploy/generate.py")
        return 1 if stale else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
