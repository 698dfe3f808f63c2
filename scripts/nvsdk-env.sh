#!/usr/bin/env bash
# Builds the venv for the optional nv-attestation-sdk GPU backend (build/nvsdk-venv).
#
#   scripts/nvsdk-env.sh            create or refresh build/nvsdk-venv from the lock (idempotent)
#   scripts/nvsdk-env.sh --compile  regenerate requirements/nvsdk.txt with pip-compile
#
# The SDK pins cryptography, PyJWT and pyOpenSSL to versions that conflict with ours, so it
# lives in a venv of its own and tee-inference is NOT installed there: the verifier runs
# server/tee_inference/verify/nvsdk_bridge.py (stdlib + SDK only) with this venv's python.
# The venv is rebuilt from scratch whenever the lock or this script changes (a stamp keeps
# their sha256). Set VERBOSE=1 to see pip.
#
# Environment:
#   PYTHON       interpreter for the venv (default: python3; must be 3.11, the lock is for it)
#   NVSDK_VENV   venv path (default: build/nvsdk-venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${NVSDK_VENV:-$ROOT/build/nvsdk-venv}"
LOCK="requirements/nvsdk.txt"
STAMP="$VENV/.tee-inference-stamp"
VERBOSE="${VERBOSE:-0}"

step() { printf '[nvsdk-env] %s\n' "$*"; }

# Runs a command quietly; on failure shows its output, so a broken install is never silent.
run() {
    if [[ "$VERBOSE" == 1 ]]; then
        "$@"
        return
    fi
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

compile_lock() {
    local tools="$ROOT/build/pip-tools-venv"
    step "pip-tools venv: $tools"
    [[ -x "$tools/bin/pip-compile" ]] || {
        run "$PYTHON" -m venv "$tools"
        run "$tools/bin/pip" install --quiet pip-tools
    }
    step "pip-compile -> $LOCK"
    CUSTOM_COMPILE_COMMAND="scripts/nvsdk-env.sh --compile" \
        run "$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
        --no-emit-index-url --no-emit-find-links --output-file "$LOCK" requirements/nvsdk.in
}

lock_digest() {
    # The script itself is part of the recipe: a change to how the venv is built rebuilds it.
    cat "$LOCK" "${BASH_SOURCE[0]}" | "$PYTHON" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

if [[ "${1:-}" == "--compile" ]]; then
    compile_lock
    exit 0
fi

if [[ "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "3.11" ]]; then
    step "error: $PYTHON is not Python 3.11; the lock is compiled for 3.11" >&2
    exit 1
fi

digest="$(lock_digest)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$digest" && -x "$VENV/bin/python" ]]; then
    step "up to date: $VENV"
    exit 0
fi

step "creating $VENV (from scratch)"
rm -rf "$VENV"
run "$PYTHON" -m venv "$VENV"

step "installing $LOCK (--require-hashes)"
run "$VENV/bin/pip" install --quiet --require-hashes -r "$LOCK"

step "checking the environment"
run "$VENV/bin/python" -c 'import nv_attestation_sdk.attestation, verifier.cc_admin  # noqa'

echo "$digest" >"$STAMP"
step "ready: $VENV"
