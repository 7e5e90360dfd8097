"""The dashboard against Grafana's own generated types, compiled by the TypeScript compiler.

No Grafana server can be installed here (it is not in Debian, PyPI or npm), but Grafana publishes
the types it generates from its CUE schemas as the npm package ``@grafana/schema``: the dashboard
model (``raw/dashboard/x/types.gen``) and each panel plugin's ``Options`` and ``FieldConfig``
(``raw/composable/<plugin>/panelcfg/x/types.gen``). The test writes the dashboard as a TypeScript
object literal checked with ``satisfies``, so a misspelt or misplaced key is an error (TypeScript's
excess-property check), and so is a value of the wrong type or enum.

Two readings of the types, both stated here because they loosen the check:

* the types' string and numeric ``enum`` declarations are read as the unions of their values
  (JSON carries the value, ``"manual"``, never the TypeScript member ``SeriesMapping.Manual``);
* a plugin's options and field config are checked as deep partials: Grafana fills what a panel
  leaves out from the plugin's defaults, so a dashboard need not spell out every option.

The package and the compiler are pinned in ``tests/deploy/grafana_schema/package-lock.json`` and
installed by ``scripts/install-test-tools.sh`` (``npm ci``); this test checks against that
version of Grafana's schema.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ._tools import ROOT, require_file, require_tool
from .test_grafana import DASHBOARD, all_panels

SCHEMA_DIR = ROOT / "tests" / "deploy" / "grafana_schema"
TYPES = SCHEMA_DIR / "node_modules" / "@grafana" / "schema" / "dist" / "types"
TSC = SCHEMA_DIR / "node_modules" / "typescript" / "bin" / "tsc"

_ENUM = re.compile(r"export declare enum (\w+) \{([^}]*)\}")
_MEMBER = re.compile(r"(\w+)\s*=\s*(\"[^\"]*\"|'[^']*'|-?\d+)")


def _enum_as_union(match: re.Match[str]) -> str:
    name, members = match.group(1), _MEMBER.findall(match.group(2))
    values = " | ".join(value for _, value in members)
    consts = "; ".join(f"readonly {key}: {value}" for key, value in members)
    return f"export type {name} = {values};\nexport declare const {name}: {{ {consts} }};"


def _types_with_enums_as_unions(dest: Path) -> Path:
    shutil.copytree(TYPES, dest)
    for file in dest.rglob("*.d.ts"):
        text = file.read_text(encoding="utf-8")
        rewritten = _ENUM.sub(_enum_as_union, text)
        if rewritten != text:
            file.write_text(rewritten, encoding="utf-8")
    return dest


def _check_source(board: dict[str, Any], types: Path) -> str:
    """check.ts: the dashboard, then each panel's options and field config, each `satisfies` its
    type."""
    lines = [
        'import type { Dashboard } from "./types/raw/dashboard/x/types.gen";',
        "type DeepPartial<T> = T extends object ? { [K in keyof T]?: DeepPartial<T[K]> } : T;",
        f"export const dashboard = {json.dumps(board)} satisfies Dashboard;",
    ]
    plugins: set[str] = set()
    for panel in all_panels(board):
        kind = panel["type"]
        if kind == "row":
            continue
        gen = types / "raw" / "composable" / kind / "panelcfg" / "x" / "types.gen.d.ts"
        assert gen.is_file(), f"panel {panel['title']!r}: Grafana has no panel plugin {kind!r}"
        if kind not in plugins:
            plugins.add(kind)
            module = f"./types/raw/composable/{kind}/panelcfg/x/types.gen"
            lines.insert(0, f'import type * as {kind} from "{module}";')
        pid, options = panel["id"], json.dumps(panel.get("options", {}))
        lines.append(f"export const options{pid} = {options} satisfies DeepPartial<{kind}.Options>;")
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
        if "export interface FieldConfig" in gen.read_text(encoding="utf-8"):
            cfg = json.dumps(custom)
            lines.append(f"export const custom{pid} = {cfg} satisfies DeepPartial<{kind}.FieldConfig>;")
        else:
            assert not custom, f"panel {panel['title']!r}: {kind} has no custom field config"
    return "\n".join(lines) + "\n"


def _compile(board: dict[str, Any], work: Path) -> subprocess.CompletedProcess[str]:
    node = require_tool("node", "run scripts/install-test-tools.sh")
    tsc = require_file(TSC, f"run scripts/install-test-tools.sh: npm ci in {SCHEMA_DIR}")
    types = _types_with_enums_as_unions(work / "types")
    (work / "check.ts").write_text(_check_source(board, types), encoding="utf-8")
    options = {
        "strict": True,
        "noEmit": True,
        "skipLibCheck": True,
        "target": "es2022",
        "module": "esnext",
        "moduleResolution": "bundler",
        "baseUrl": ".",
        "paths": {"@grafana/schema": ["./types/index.d.ts"]},  # the raw types import the package
    }
    (work / "tsconfig.json").write_text(json.dumps({"compilerOptions": options, "files": ["check.ts"]}))
    return subprocess.run(
        [node, str(tsc), "-p", str(work / "tsconfig.json")], capture_output=True, text=True, timeout=300
    )


def test_dashboard_satisfies_grafanas_schema(tmp_path: Path) -> None:
    result = _compile(json.loads(DASHBOARD.read_text()), tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda b: _panel(b, "xychart")["options"].update(mappping="auto"),  # misspelt option
        lambda b: _panel(b, "xychart")["options"].update(mapping="columns"),  # no such enum value
        lambda b: _panel(b, "xychart")["fieldConfig"]["defaults"]["custom"].update(show="bars"),
        lambda b: _panel(b, "xychart")["transformations"][0].update(filters={}),  # misspelt key
        lambda b: _panel(b, "timeseries").update(type="timeseriess"),  # no such plugin
    ],
    ids=["option-name", "enum-value", "custom-enum", "transformation-key", "plugin"],
)
def test_the_check_fails_on_a_spoilt_dashboard(tmp_path: Path, spoil: Any) -> None:
    board = json.loads(DASHBOARD.read_text())
    spoil(board)
    try:
        result = _compile(board, tmp_path)
    except AssertionError as exc:  # an unknown plugin is caught before compiling
        assert "no panel plugin" in str(exc)
        return
    assert result.returncode != 0
    assert "error TS" in result.stdout


def _panel(board: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in all_panels(board) if p["type"] == kind)


def test_xychart_panels_carry_a_plugin_version_that_grafana_does_not_migrate() -> None:
    """Grafana rewrites an xychart panel's options as pre-11.1 ones (``dims``, ``seriesMapping``)
    when its ``pluginVersion`` is missing or below 11.1 (``xyChartMigrationHandler`` in
    public/app/plugins/panel/xychart/migrations.ts), which would drop the options written here."""
    board = json.loads(DASHBOARD.read_text())
    charts = [p for p in all_panels(board) if p["type"] == "xychart"]
    assert charts
    for panel in charts:
        major, minor = (int(part) for part in panel.get("pluginVersion", "0.0").split(".")[:2])
        assert (major, minor) >= (11, 1), panel["title"]
