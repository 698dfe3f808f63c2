#!/usr/bin/env bash
# The Debian packages the tests and make targets start themselves: redis-server (the shared
# signature store, the gateway) and wrk (the bench's load generator). Installs what is missing,
# with sudo unless root; does nothing when both are there.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[system-deps] installing ${missing[*]} (Debian packages)"
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
