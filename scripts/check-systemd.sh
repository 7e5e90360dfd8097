#!/usr/bin/env bash
# Lint systemd/relexd@.service: `systemd-analyze verify` (syntax, directive values) and
# `systemd-analyze security --offline` (hardening score), failing on any problem.
#
# Why a temporary copy: `verify` insists that the ExecStart= binary exists and is executable on
# THIS machine, but the unit points at /usr/local/bin/relexd, which CI and developer machines do
# not have (and creating it would modify the host). We copy the unit into a temp dir under an
# instance name (verifying the bare template would instantiate it as "relexd@i") and rewrite
# only the ExecStart= path to /bin/true; every other directive is verified as shipped.
#
# Security threshold: `--threshold` is the exposure level x10 (0 = fully locked down, 100 =
# unprotected). The unit scores 1.4 today; the remaining exposure is deliberate and documented
# in the unit (no IP allow-list: Prometheus must scrape it; UMask/MemoryDenyWriteExecute,
# PrivateUsers, ProtectHome=read-only relaxations). THRESHOLD=20 (2.0) fails as soon as a
# hardening line is dropped by mistake while leaving room for systemd versions that weigh
# checks slightly differently. Override with RELEXD_SECURITY_THRESHOLD.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="${1:-$here/systemd/relexd@.service}"
threshold="${RELEXD_SECURITY_THRESHOLD:-20}"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-systemd: systemd-analyze not found" >&2
    exit 127
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
copy="$tmp/relexd@check.service"
sed -E 's#^ExecStart=/usr/local/bin/relexd( |$)#ExecStart=/bin/true\1#' "$unit" >"$copy"
if ! grep -q '^ExecStart=/bin/true' "$copy"; then
    echo "check-systemd: ExecStart=/usr/local/bin/relexd not found in $unit" >&2
    exit 1
fi

echo "== systemd-analyze verify"
# verify prints problems but may still exit 0 for some warnings: treat any output as failure.
out="$(systemd-analyze verify --man=no "$copy" 2>&1)" || { echo "$out" >&2; exit 1; }
if [[ -n "$out" ]]; then
    echo "$out" >&2
    echo "check-systemd: verify reported problems" >&2
    exit 1
fi
echo "ok"

echo "== systemd-analyze security --offline=true --threshold=$threshold"
if ! systemd-analyze security --offline=true --threshold="$threshold" --no-pager "$copy" >"$tmp/security.txt" 2>&1; then
    cat "$tmp/security.txt" >&2
    echo "check-systemd: exposure above threshold $threshold (x10) or analysis failed" >&2
    exit 1
fi
tail -n 1 "$tmp/security.txt"
