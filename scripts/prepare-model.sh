#!/usr/bin/env bash
# Produces build/models/SmolLM2-135M-Instruct (or $1) with the engine venv's python.
# Idempotent: scripts/model_prep.py skips the work when the directory is already complete.
# Creates/refreshes the engine venv first (itself a no-op when up to date).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VLLM_VENV:-$ROOT/build/vllm-venv}"
OUT="${1:-$ROOT/build/models/SmolLM2-135M-Instruct}"

scripts/vllm-env.sh
echo "[prepare-model] $OUT"
# Offline and with caches inside build/: the conversion reads only the local GGUF file.
# Quiet unless it fails (transformers draws progress bars on stderr).
log="$(mktemp)"
if ! HF_HUB_OFFLINE=1 HF_HOME="$ROOT/build/cache/hf" TRANSFORMERS_VERBOSITY=error \
    HF_HUB_DISABLE_PROGRESS_BARS=1 "$VENV/bin/python" scripts/model_prep.py "$OUT" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
echo "[prepare-model] ready: $OUT"
