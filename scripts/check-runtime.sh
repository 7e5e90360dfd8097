#!/usr/bin/env bash
# Prove the runtime install: a fresh environment from requirements/runtime.lock alone (no test
# tools, nothing installed by hand), relexd installed as a wheel, then the installed commands and an
# import of every relexd module, run from outside the source tree so nothing is imported from it.
# Fails on the first error. This is what caught `import click` (a package typer stopped providing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="$PWD/.venv-runtime"
rm -rf "$venv"
scripts/setup.sh --venv "$venv" --wheel
cd "$(mktemp -d)"
relexd="$venv/bin/relexd"
for args in "--help" "watch --help" "status --help" "extrapolate --help" "demo --help" "version"; do
    echo "check-runtime: relexd $args"
    # shellcheck disable=SC2086  # the words of $args are separate arguments
    "$relexd" $args >/dev/null
done
"$venv/bin/python" - <<'PY'
import importlib
import pkgutil
import sys

import relexd
from relexd.demo import bases, train

if "site-packages" not in relexd.__file__:
    sys.exit(f"check-runtime: relexd imported from {relexd.__file__}, not the installed wheel")
failed = []
# modules of optional extras: without the extra they must fail with a message naming it
EXTRAS = {"relexd.cluster.ray_backend": "relexd[ray]"}
names = [m.name for m in pkgutil.walk_packages(relexd.__path__, "relexd.") if not m.name.endswith("__main__")]
for name in names:
    if name in EXTRAS:
        continue
    try:
        importlib.import_module(name)
    except Exception as exc:  # report every broken module, not just the first
        failed.append(f"{name}: {exc!r}")
if "ray" in sys.modules:
    failed.append("a module outside relexd.cluster.ray_backend imports ray (the single-host path must not)")
for name, extra in EXTRAS.items():
    try:
        importlib.import_module(name)
        failed.append(f"{name} imported without its extra {extra}: is the extra in runtime.lock?")
    except ImportError as exc:
        if extra not in str(exc):
            failed.append(f"{name}: the error does not name {extra}: {exc!r}")
missing = [s for s in bases.SHIPPED_SEEDS if bases.shipped_base(s, train.Warmup()) is None]
if missing:
    failed.append(f"shipped demo bases missing from the wheel for seeds {missing}")
if failed:
    sys.exit("check-runtime: " + "\n  ".join(["failed:", *failed]))
print(f"check-runtime: imported {len(names) - len(EXTRAS)} relexd modules from the runtime-only install;"
      f" {len(EXTRAS)} of an optional extra refused with a message naming it")
PY
rm -rf "$venv"
