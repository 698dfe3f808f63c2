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

NAME="nvsdk-env"
# shellcheck source=scripts/venv-lib.sh
source "$ROOT/scripts/venv-lib.sh"

compile_lock() {
    local tools
    tools="$(pip_tools)"
    step "pip-tools venv: $tools"
    step "pip-compile -> $LOCK"
    CUSTOM_COMPILE_COMMAND="scripts/nvsdk-env.sh --compile" \
        run "$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe \
        --no-emit-index-url --no-emit-find-links --output-file "$LOCK" requirements/nvsdk.in
}

lock_digest() {
    recipe_digest "$LOCK" "${BASH_SOURCE[0]}" "$ROOT/scripts/venv-lib.sh"
}

if [[ "${1:-}" == "--compile" ]]; then
    compile_lock
    exit 0
fi

require_python_311

digest="$(lock_digest)"
exit_if_up_to_date "$digest"

step "creating $VENV (from scratch)"
rm -rf "$VENV"
run "$PYTHON" -m venv "$VENV"

step "installing $LOCK (--require-hashes)"
run "$VENV/bin/pip" install --quiet --require-hashes -r "$LOCK"

step "checking the environment"
# From a scratch directory: importing the SDK writes attestation_sdk.log into the working directory.
scratch="$(mktemp -d)"
(cd "$scratch" && run "$VENV/bin/python" -c 'import nv_attestation_sdk.attestation, verifier.cc_admin  # noqa')
rm -rf "$scratch"

echo "$digest" >"$STAMP"
step "ready: $VENV"
