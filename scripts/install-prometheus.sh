#!/usr/bin/env bash
# Install Prometheus + promtool (Debian/Ubuntu package "prometheus") for the deploy tests.
#
# Idempotent: does nothing when both `promtool` and `prometheus` are already on PATH.
# Only installs as root (CI containers); otherwise prints what to run and exits 0 so that a
# developer's `make test` is not broken by a missing sudo — the tests themselves decide whether
# a missing promtool is a skip (local) or a failure (CI=true).
#
# The Debian package ships a systemd unit and, in postinst, tries to enable/start it. In a
# container there is no systemd, and on a real host we do not want a stray Prometheus running:
# a policy-rc.d that returns 101 ("action forbidden") stops invoke-rc.d/deb-systemd-invoke from
# starting any service during this install. We remove it again afterwards (only if we made it).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have promtool && have prometheus; then
    echo "install-prometheus: promtool and prometheus already installed: $(promtool --version 2>&1 | head -n1)"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install-prometheus: not root; install with: sudo apt-get install -y --no-install-recommends prometheus" >&2
    exit 0
fi

if ! have apt-get; then
    echo "install-prometheus: apt-get not found; install Prometheus (promtool) from https://prometheus.io/download/" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# temporary: written by relexd scripts/install-prometheus.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    made_policy=1
fi
cleanup() { if [[ "$made_policy" -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends prometheus

# Belt and braces on hosts with a running systemd: the package's unit must not stay enabled
# or running because of this script.
if [[ -d /run/systemd/system ]] && have systemctl; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

echo "install-prometheus: installed $(promtool --version 2>&1 | head -n1)"
