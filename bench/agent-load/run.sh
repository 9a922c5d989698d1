#!/usr/bin/env bash
# Agent load benchmark: builds the release agent, hvnodectl and the load client, starts an
# unprivileged agent on loopback with temporary directories, registers it with a fresh
# hvnodectl state, runs the load for 10 s and prints agent_rps / agent_p50_ms / agent_p99_ms.
# Target on 2 cores: >= 20k req/s, p99 <= 5 ms. Loopback only; everything is removed at exit.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
target=${CARGO_TARGET_DIR:-$top/target}
export CARGO_TARGET_DIR=$target
duration=${DURATION:-10}
connections=${CONNECTIONS:-32}

cargo build --release -q -p hvnode-agent -p hvnodectl -p hvnode-bench-agent-load
bin=$target/release

work=$(mktemp -d /tmp/hvnode-agent-load.XXXXXX)
agent_pid=
cleanup() {
    if [ -n "$agent_pid" ]; then
        kill "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/data" "$work/run" "$work/images"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/hvnode-agent" --listen "127.0.0.1:$port" --socket "$work/agent.sock" \
    --data-dir "$work/data" --run-dir "$work/run" --images-dir "$work/images" \
    --init-socket "$work/init.sock" >"$work/agent.log" 2>&1 &
agent_pid=$!

code=
for _ in $(seq 100); do
    if [ -S "$work/agent.sock" ]; then
        code=$(curl -sf --max-time 2 --unix-socket "$work/agent.sock" http://localhost/v1/registration \
            | jq -r '.pairing_code // empty' || true)
        [ -n "$code" ] && break
    fi
    kill -0 "$agent_pid" 2>/dev/null || { echo "error: the agent exited:" >&2; cat "$work/agent.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$code" ] || { echo "error: no pairing code from the agent's socket within 10 s" >&2; cat "$work/agent.log" >&2; exit 1; }

state=$work/manager
"$bin/hvnodectl" --state-dir "$state" init --name bench-manager >/dev/null
"$bin/hvnodectl" --state-dir "$state" register bench --url "https://127.0.0.1:$port" --code "$code" --yes \
    >/dev/null 2>"$work/register.log" || { cat "$work/register.log" >&2; exit 1; }

timeout $((duration + 30)) "$bin/hvnode-bench-agent-load" --url "https://127.0.0.1:$port" \
    --state-dir "$state" --connections "$connections" --duration "$duration"
