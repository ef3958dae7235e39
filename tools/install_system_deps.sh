#!/usr/bin/env bash
# Install the system tools the test suite uses that PyPI does not ship, from Debian's archive:
#   prometheus  the server (tests/deploy/test_observability.py scrapes a live cnnserve with it)
#   promtool    checks deploy/prometheus/*.yml and runs the alert unit tests
# Idempotent and quiet: when both are on PATH it does nothing. Called by .ci/run; needs root (or
# sudo) and apt, i.e. a Debian/Ubuntu machine.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install_system_deps: need root or sudo to install prometheus with apt" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: apt-get not found; install Prometheus (server + promtool) yourself" >&2
    exit 1
fi

echo "install_system_deps: installing prometheus (server + promtool) from Debian" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-install-recommends: the node exporter and friends are not needed. The package's postinst
# would start a system service where systemd runs; the tests start their own server instead.
if ! { "${sudo[@]}" apt-get update -qq && \
       "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
command -v promtool >/dev/null 2>&1 || { echo "install_system_deps: promtool missing after install" >&2; exit 1; }
