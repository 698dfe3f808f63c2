# Shared by scripts/vllm-env.sh and scripts/nvsdk-env.sh: quiet steps, a pip-tools venv, the
# Python 3.11 check and the lock-digest stamp that makes a venv rebuild only when its recipe
# changes. Sourced, not run. Callers set NAME (the log prefix), PYTHON, VENV and STAMP.

step() { printf '[%s] %s\n' "$NAME" "$*"; }

# Runs a command quietly; on failure shows its output, so a broken install is never silent.
run() {
    if [[ "${VERBOSE:-0}" == 1 ]]; then
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

# Prints the path of a venv holding pip-compile, making it on first use.
pip_tools() {
    local tools="$ROOT/build/pip-tools-venv"
    [[ -x "$tools/bin/pip-compile" ]] || {
        run "$PYTHON" -m venv "$tools" >&2
        run "$tools/bin/pip" install --quiet pip-tools >&2
    }
    echo "$tools"
}

require_python_311() {
    if [[ "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "3.11" ]]; then
        step "error: $PYTHON is not Python 3.11; the locks are compiled for 3.11" >&2
        exit 1
    fi
}

# sha256 of the given files: the locks and the calling script (a change to how the venv is
# built rebuilds it too).
recipe_digest() {
    cat "$@" | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

# Exits the calling script when the venv was built from this very recipe.
exit_if_up_to_date() {
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$1" && -x "$VENV/bin/python" ]]; then
        step "up to date: $VENV"
        exit 0
    fi
}
