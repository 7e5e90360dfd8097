#!/usr/bin/env bash
# Install the real tools the deploy tests drive, from Debian/Ubuntu packages:
#   prometheus                 promtool and a Prometheus server (rules, scrapes)
#   debootstrap, systemd-container   a Debian root file system booted with systemd-nspawn, to run
#                              relexd@.service under a real systemd (tests/deploy/test_systemd_live.py)
#   nodejs, npm                then `npm ci` in tests/deploy/grafana_schema: Grafana's generated types
#                              and the TypeScript compiler (tests/deploy/test_grafana_types.py)
#
# Idempotent: installs only what is missing. Only installs as root (CI containers); otherwise prints
# what to run and exits 0 so that a developer's test run is not broken by a missing sudo — the tests
# themselves decide whether a missing tool is a skip (local) or a failure (CI=true).
#
# The prometheus package ships a systemd unit and, in postinst, tries to enable/start it. In a
# container there is no systemd, and on a real host we do not want a stray Prometheus running:
# a policy-rc.d that returns 101 ("action forbidden") stops invoke-rc.d/deb-systemd-invoke from
# starting any service during this install. We remove it again afterwards (only if we made it).

set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

debian_packages() {
    local missing=()
    have promtool && have prometheus || missing+=(prometheus)
    have debootstrap || missing+=(debootstrap)
    have systemd-nspawn || missing+=(systemd-container)
    have node && have npm || missing+=(nodejs npm)

    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "install-test-tools: all present: $(promtool --version 2>&1 | head -n1)"
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-test-tools: not root; install with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        return 0
    fi
    if ! have apt-get; then
        echo "install-test-tools: apt-get not found; install ${missing[*]} by other means" >&2
        return 1
    fi

    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# temporary: written by relexd scripts/install-test-tools.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        made_policy=1
    fi
    cleanup() { if [[ "$made_policy" -eq 1 ]]; then rm -f "$policy"; fi; }
    trap cleanup EXIT

    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"

    # Belt and braces on hosts with a running systemd: the package's unit must not stay enabled
    # or running because of this script.
    if [[ -d /run/systemd/system ]] && have systemctl; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    echo "install-test-tools: installed ${missing[*]}"
}

# Grafana's schema types and the TypeScript compiler, pinned by the lock file; a clean `npm ci`
# only when the lock file is newer than what is installed. Needs no root.
grafana_schema_types() {
    local dir installed
    dir="$(cd "$(dirname "$0")/.." && pwd)/tests/deploy/grafana_schema"
    installed="$dir/node_modules/.package-lock.json"
    if ! have npm; then
        echo "install-test-tools: npm not found; Grafana's schema types not installed" >&2
        return 0
    fi
    if [[ -f "$installed" && ! "$dir/package-lock.json" -nt "$installed" ]]; then
        return 0
    fi
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "install-test-tools: installed Grafana's schema types in $dir"
}

debian_packages
grafana_schema_types
