"""Locating external tools: skip locally when missing, fail under CI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]


def require_tool(name: str, install_hint: str) -> str:
    """Path of ``name``; a skip when missing locally, a failure when ``CI`` is set."""
    path = shutil.which(name)
    if path:
        return path
    missing(f"{name} not found ({install_hint})")


def require_file(path: Path, install_hint: str) -> Path:
    """``path`` when it exists (an installed test dependency); else as :func:`require_tool`."""
    if path.exists():
        return path
    missing(f"{path} not found ({install_hint})")


def missing(message: str) -> NoReturn:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message}; CI is set, so this must not be skipped")
    pytest.skip(message)
