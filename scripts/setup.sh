#!/usr/bin/env bash
# Create a virtual environment and install relexd into it from the lock files: exact versions,
# every file's sha256 checked (requirements/*.lock, made by scripts/lock.sh; torch is pinned there).
#   scripts/setup.sh                      runtime only, into .venv, relexd editable
#   scripts/setup.sh --test               plus the test tools (the `test` dependency group)
#   scripts/setup.sh --venv DIR --wheel   a fresh runtime environment with relexd built as a wheel,
#                                         as an operator installs it (scripts/check-runtime.sh)
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

lock=requirements/runtime.lock
venv=.venv
editable=(-e .)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --test) lock=requirements/test.lock ;;
        --venv) venv="$2"; shift ;;
        --wheel) editable=(.) ;;
        *) echo "setup: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install --require-hashes -r "$lock"
# relexd itself: its dependencies are exactly the locked ones installed above.
"${pip[@]}" install --no-deps "${editable[@]}"
echo "setup: relexd $("$venv/bin/relexd" version) installed in $venv from $lock"
