#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml with uv: exact versions and sha256 hashes of the
# whole dependency tree, for Python 3.11 on Linux x86-64 (the machines relexd is developed on).
#
#   scripts/lock.sh                                  re-resolve, keeping every version already locked
#   scripts/lock.sh --upgrade                        move everything to the newest compatible release
#   scripts/lock.sh --upgrade-package safetensors    move one package
#   RELEXD_TORCH=2.14.0+cpu scripts/lock.sh          move torch (its pin lives in the lock, nowhere else)
#
# requirements/test.lock   = runtime + the `test` dependency group (what scripts/test.sh installs)
# requirements/runtime.lock = runtime only, resolved inside test.lock so both agree version for version
#
# torch: the lock holds the CPU build (`+cpu`): a plain `torch` from PyPI is the multi-GB CUDA build.
# Its wheel comes from pip's find-links on our machines ($PIP_FIND_LINKS) or from PyTorch's own
# index elsewhere; on a GPU host install relexd into the trainer's environment instead (README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

uv="${UV:-.venv/bin/uv}"
torch="${RELEXD_TORCH:-$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements/test.lock 2>/dev/null || true)}"
torch="${torch:-2.13.0+cpu}"
find_links="${PIP_FIND_LINKS:-https://download.pytorch.org/whl/torch/}"

# The torch pin goes in on stdin (`-`), so the lock names no temporary file.
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --find-links "$find_links" --no-emit-find-links --custom-compile-command "scripts/lock.sh")
echo "torch==$torch" | "$uv" pip compile pyproject.toml - --group pyproject.toml:test "${common[@]}" \
    -o requirements/test.lock "$@"
echo "torch==$torch" | "$uv" pip compile pyproject.toml - "${common[@]}" \
    --constraints requirements/test.lock -o requirements/runtime.lock "$@"
echo "lock: torch==$torch; $(grep -c '^[a-z0-9]' requirements/test.lock) packages in test.lock," \
     "$(grep -c '^[a-z0-9]' requirements/runtime.lock) in runtime.lock"
