#!/usr/bin/env bash
# make run-gateway: a real redis-server (Unix socket, no disk), two simulated nodes in front of the
# fake engine sharing it, and the gateway in front of both, all on loopback. Ctrl-C stops them all.
set -euo pipefail
BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8080}
NODE_PORTS=${NODE_PORTS:-"8001 8002"}
RUN=$(mkdir -p "${RUN_DIR:-build/run-gateway}" && cd "${RUN_DIR:-build/run-gateway}" && pwd)
REDIS=$(command -v redis-server || echo /usr/sbin/redis-server)
[ -x "$REDIS" ] || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$REDIS" --port 0 --unixsocket "$RUN/redis.sock" --unixsocketperm 700 --save "" --appendonly no \
    --dir "$RUN" --loglevel warning &
pids+=($!)
nodes=()
for port in $NODE_PORTS; do
    "$BIN/tee-inference" serve --engine fake --tee simulated --host 127.0.0.1 --port "$port" \
        --redis "unix://$RUN/redis.sock" >"$RUN/node-$port.log" 2>&1 &
    pids+=($!)
    nodes+=(--node "http://127.0.0.1:$port")
done
echo "nodes on ${NODE_PORTS} (logs in $RUN); try, once the gateway says the nodes verified:"
echo "  curl -s http://$HOST:$PORT/v1/chat/completions -H 'content-type: application/json' -i \\"
echo "    -d '{\"model\": \"fake-model\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'"
echo "  $BIN/tee-inference verify url http://$HOST:$PORT --model fake-model --allow-simulated --allow-plaintext --no-measurements"
"$BIN/tee-inference" gateway "${nodes[@]}" --allow-simulated --allow-plaintext --no-measurements \
    --redis "unix://$RUN/redis.sock" --outbox "$RUN/outbox.sqlite3" --host "$HOST" --port "$PORT" &
pids+=($!)
wait "${pids[-1]}"
