#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, dependency check, runtime install, pytest.
# Installs Prometheus/promtool from Debian when running as root (CI) for the deploy tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh --test
bash scripts/install-test-tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# every imported package declared, no runtime module importing a test-only one
.venv/bin/deptry .
scripts/check-runtime.sh
.venv/bin/python -m pytest -q --durations=25
