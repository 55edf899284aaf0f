#!/usr/bin/env bash
# The Python client against the Rust client on one release gateway, in one run:
# the gateway pinned to core 0, each client in turn on core 1. Order round trip
# p50/p99 and orders/s, closed loop and a window of 64 (python/bench/roundtrip.py,
# client/examples/roundtrip.rs). Needs the package installed in target/python
# (./scripts/test.sh does it) or PYTHON pointing at one that has it. The session rate
# limit is lifted: this measures round trips, not the limiter.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
python="${PYTHON:-$target/python/bin/python}"
# Absolute, without resolving the venv's symlink (that would leave the venv).
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
orders="${ORDERS:-5000}"
cargo build --release -q -p gateway
cargo build --release -q -p gateway-client --example roundtrip
dir=$(mktemp -d)
trap 'kill "$gateway" 2>/dev/null; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$dir" && exec taskset -c 0 "$target/release/gateway" --listen "127.0.0.1:$port" --set 'admin.listen=""' \
    --set session.max_messages_per_second=1000000 2>gateway.log) &
gateway=$!
for _ in $(seq 600); do grep -qs "gateway listening" "$dir/gateway.log" && break; sleep 0.1; done
grep -qs "gateway listening" "$dir/gateway.log" || { echo "the gateway did not start:"; cat "$dir/gateway.log"; exit 1; }
cd "$dir"
for round in 1 2; do
    taskset -c 1 "$target/release/examples/roundtrip" "127.0.0.1:$port" "$orders"
    taskset -c 1 "$python" "$OLDPWD/python/bench/roundtrip.py" --gateway "127.0.0.1:$port" --orders "$orders"
done
