"""systemd unit lint: scripts/check-systemd.sh (verify + offline security threshold)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ._tools import ROOT, require_tool

SCRIPT = ROOT / "scripts" / "check-systemd.sh"
UNIT = ROOT / "systemd" / "relexd@.service"


def run(unit: Path) -> subprocess.CompletedProcess[str]:
    require_tool("systemd-analyze", "install systemd")
    return subprocess.run(["bash", str(SCRIPT), str(unit)], capture_output=True, text=True, timeout=300)


def test_unit_verifies_and_meets_security_threshold() -> None:
    result = run(UNIT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_hardening_is_dropped(tmp_path: Path) -> None:
    weakened = tmp_path / "relexd@.service"
    text = UNIT.read_text()
    for directive in (
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
    ):
        text = text.replace(directive, "")
    weakened.write_text(text)
    assert run(weakened).returncode != 0


def test_unit_contract() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "EnvironmentFile=/etc/relexd/%i.env",
        "ExecStart=/usr/local/bin/relexd watch",
        "Restart=on-failure",
        "StateDirectory=relexd/%i",
        "Environment=RELEXD_STATE_DIR=%S/relexd/%i",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ):
        assert f"\n{line}\n" in text, line
    assert "\nWatchdogSec=" in text
    assert "\nDynamicUser=" not in text
