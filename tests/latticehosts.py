"""Real `orch host` processes and `orch apply` runs for the lattice tests and bench.

Hosts are spawned as `python -m orchestrator host ...` (`orch host`), each with its own
state dir and log. Capsules are tiny WAT modules whose `version` tool
answers a digit, so a call tells which revision serves. Waits poll the lattice's own
status (`lattice_status`), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.status import lattice_status
from orchestrator.lattice.wiring import call_tool
from tests.natsserver import NatsServers
from tests.test_orchestrate import module

REPO = Path(__file__).resolve().parent.parent
ORCH = [sys.executable, "-m", "orchestrator"]
DEADLINE = 30.0


MANIFEST = """[package]
name = "ver"
version = "1.0.0"
description = "answers its version"

[[component]]
file = "v.wat"

[[tool]]
name = "version"
"""


def write_capsule(
    folder: Path, value: int | None, capabilities: str = "", *, wat: str | None = None, extra: str = ""
) -> None:
    """A `ver` capsule in `folder` answering `value`, granted `capabilities` (TOML lines of
    its [capabilities] table), with `extra` TOML after them; `wat` replaces the module text
    (say, a broken one)."""
    folder.mkdir(parents=True, exist_ok=True)
    granted = f"\n[capabilities]\n{capabilities}\n" if capabilities else ""
    (folder / "Capsule.toml").write_text(MANIFEST + granted + extra)
    (folder / "v.wat").write_text(wat if wat is not None else module(value or 0))


def write_config(root: Path, deployments: dict[str, dict[str, Any]], *, extra: str = "") -> Path:
    """config.yaml in `root`: each deployment `name: {path: ..., hosts: ..., labels: ...}`."""
    lines = ["version: 1", extra, "capsules:"]
    for name, fields in deployments.items():
        lines.append(f"  {name}:")
        for key, value in fields.items():
            shown = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}" if isinstance(value, dict) else value
            lines.append(f"    {key}: {shown}")
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text("\n".join(line for line in lines if line) + "\n")
    return path


def orch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ORCH, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)


def apply(config: Path, urls: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return orch("apply", str(config), "--lattice", urls, *extra)


@dataclass
class HostProcess:
    """One `orch host` OS process."""

    id: str
    folder: Path
    urls: str
    labels: dict[str, str] = field(default_factory=dict)
    drain_seconds: float = 20.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> HostProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [*ORCH, "host", "--lattice", self.urls, "--host-id", self.id]
        command += ["--state-dir", str(self.folder / "state"), "--drain-seconds", str(self.drain_seconds)]
        for key, value in self.labels.items():
            command += ["--label", f"{key}={value}"]
        with open(self.folder / "log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a drain); the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log(self) -> str:
        try:
            return (self.folder / "log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class Hosts:
    """Several hosts; killed however a test ends."""

    def __init__(self, root: Path, urls: str) -> None:
        self.root, self.urls = root, urls
        self.all: dict[str, HostProcess] = {}

    def start(self, host_id: str, **labels: str) -> HostProcess:
        host = HostProcess(host_id, self.root / host_id, self.urls, labels).start()
        self.all[host_id] = host
        return host

    def stop(self) -> None:
        for host in self.all.values():
            host.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {h.id}\n{h.log()}" for h in self.all.values())


async def wait_status(
    urls: str, check: Callable[[dict[str, Any]], bool], what: str, *, hosts: Hosts | None = None
) -> dict[str, Any]:
    """Poll the lattice's status until `check(status)`; the deadline is only a backstop."""
    end = time.monotonic() + DEADLINE
    address = LatticeAddress.parse(urls)
    status: dict[str, Any] = {}
    while True:
        status = await lattice_status(address)
        if check(status):
            return status
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}; status: {status}\n{hosts.logs() if hosts else ''}")
        await asyncio.sleep(0.1)


def capsule(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next((c for c in status["capsules"] if c["name"] == name), {"phase": None, "hosts": [], "on": []})


def live(status: dict[str, Any]) -> set[str]:
    return {h["id"] for h in status["hosts"] if h["alive"]}


async def call(urls: str, deployment: str, tool: str = "version", timeout: float = 5.0) -> tuple[bytes, str]:
    """One call over the lattice: (output, the host that answered)."""
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    try:
        output, details = await call_tool(lattice, deployment, tool, b"{}", timeout=timeout)
        return output, details["X-Host"]
    finally:
        await lattice.close()


@pytest.fixture
def hosts(tmp_path: Path, nats_server: NatsServers) -> Iterator[Hosts]:
    """`orch host` processes on the test's NATS server (started by the test), all stopped at
    the end. A fixture for every test module (tests/conftest.py registers this module)."""
    group = Hosts(tmp_path / "hosts", nats_server.urls)
    try:
        yield group
    finally:
        group.stop()


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The output of an `orch` run that must succeed."""
    assert done.returncode == 0, (done.stdout, done.stderr)
    return str(done.stdout)
