"""A real Prometheus scraping a real `relexd watch` while the run turns: the alert must fire.

The synthetic run follows a straight rank-1 line for 20 checkpoints, then turns by 90° at the same
speed. Forecasts anchored before the turn keep positive skill until the new leg is longer than the
anchor's distance to the turn; from then on extrapolating is worse than stopping and the skill
goes negative. Prometheus (Debian's package, on 127.0.0.1, started by this test) loads the repo's
alert rules; only their ``for:`` durations are shortened to seconds, since the whole run lasts
seconds here, not hours — the expressions under test are the shipped ones.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.daemon.trainer_sim import Daemon, hf_save, make_base

from ._tools import ROOT, require_tool

TURN = 20
LAST = 44


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shortened_rules(target: Path) -> None:
    text = (ROOT / "deploy" / "prometheus" / "relexd-alerts.yml").read_text()
    target.write_text(re.sub(r"(\n\s*for:\s*)\S+", r"\g<1>2s", text))


def query(prom: str, path: str, **params: str) -> dict:
    url = f"{prom}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def skill_now(prom: str) -> float | None:
    result = query(prom, "/api/v1/query", query='relexd_forecast_skill{horizon="2x"}')["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def firing(prom: str) -> set[str]:
    alerts = query(prom, "/api/v1/alerts")["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def write_run(run: Path, planted, stop: threading.Event) -> None:
    """Checkpoints 1…LAST, one every 0.25 s, the way the HF Trainer saves them."""
    for step in range(1, LAST + 1):
        if stop.is_set():
            return
        hf_save(run, step, planted.at(step))
        time.sleep(0.25)


@pytest.mark.slow
def test_prometheus_sees_skill_turn_negative_and_fires_the_alert(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", "run scripts/install-test-tools.sh")
    planted, base = make_base(tmp_path, noise=0.001, b=0.05)
    planted.turn(TURN, seed=11)
    run = tmp_path / "run"
    port = free_port()
    daemon = Daemon(tmp_path, run, base, "--debounce", "0.1", "--reconcile-interval", "1",
                    "--listen", f"127.0.0.1:{port}")  # fmt: skip
    rules = tmp_path / "rules.yml"
    shortened_rules(rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(rules))}]\n"
        "scrape_configs:\n"
        f"  - job_name: relexd\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    prom_port = free_port()
    prom_url = f"http://127.0.0.1:{prom_port}"
    prom = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stop = threading.Event()
    writer = threading.Thread(target=write_run, args=(run, planted, stop), daemon=True)
    try:
        daemon.wait_url()
        writer.start()
        seen: list[tuple[int, float]] = []  # (relexd's newest step, skill seen by Prometheus)
        deadline = time.monotonic() + 150
        fired = False
        while time.monotonic() < deadline and not fired:
            time.sleep(1)
            try:
                skill = skill_now(prom_url)
                fired = "RelexForecastSkillNegative" in firing(prom_url)
            except OSError:
                continue  # Prometheus still starting
            steps = daemon.steps()
            if skill is not None and steps:
                seen.append((steps[-1], skill))
        positive_before_turn = [s for step, s in seen if step <= TURN and s > 0]
        assert positive_before_turn, f"no positive skill while the line was straight: {seen}"
        assert seen and seen[-1][1] < 0, f"skill did not turn negative: {seen}"
        assert fired, f"RelexForecastSkillNegative never fired; skills seen: {seen}"
        assert min(step for step, s in seen if s < 0) > TURN
    finally:
        stop.set()
        prom.terminate()
        prom.wait(10)
        daemon.stop()
