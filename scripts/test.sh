#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, then pytest.
# Installs Prometheus/promtool from Debian when running as root (CI) for the deploy tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh --test
bash scripts/install-prometheus.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q
