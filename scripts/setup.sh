#!/usr/bin/env bash
# Create .venv and install relexd into it (editable), with torch pinned by constraints.txt.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test tools (pytest, transformers, ruff)
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
fi

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}"
echo "setup: relexd $(.venv/bin/relexd version) installed in .venv"
