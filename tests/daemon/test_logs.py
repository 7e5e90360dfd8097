"""One log pipeline: relexd's structlog lines and watchdog/apscheduler stdlib lines alike."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from relexd.daemon.logs import setup_logging


def test_json_lines_for_structlog_and_stdlib(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json")
    try:
        structlog.get_logger("relexd.daemon").info("checkpoint ingested", step=10, path="/r/checkpoint-10")
        logging.getLogger("apscheduler.scheduler").warning("Run time of job %s was missed", "reconcile")
        logging.getLogger("watchdog.observers").info("emitter started")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert lines[0]["event"] == "checkpoint ingested" and lines[0]["step"] == 10 and lines[0]["path"]
    assert lines[1]["logger"] == "apscheduler.scheduler" and lines[1]["level"] == "warning"
    assert lines[1]["event"] == "Run time of job reconcile was missed"
    assert lines[2]["logger"] == "watchdog.observers"
    assert all("timestamp" in line for line in lines)


def test_console_renderer_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("console")
    try:
        structlog.get_logger("relexd.daemon").warning("checkpoint unusable", step=20, reason="truncated")
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert "checkpoint unusable" in err and "step=20" in err and not err.lstrip().startswith("{")
