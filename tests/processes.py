"""Real `orch` processes for the tests: spawn `orch up`, wait until it serves, stop it.

Readiness is what the orchestrator reports (`GET /v1/status` says `ready` once the first
plan is applied), polled over its socket, never a fixed sleep.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.api.server import socket_alive

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 15.0


def example_deployment(root: Path) -> Path:
    """The repository's example config and capsules, copied under `root`."""
    for name in ("counter", "milestones", "notes"):
        shutil.copytree(REPO / "capsules" / name, root / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    return root / "config.yaml"


def orch(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run `orch ARGS...` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        cwd=cwd or REPO,
        timeout=timeout,
        check=False,
    )


def spawn_up(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`orch up CONFIG --log-format json` in its own process, its output into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "up", str(config), "--log-format", "json", "--no-watch"],
            cwd=config.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_up(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (a clean stop), and SIGKILL if it is not done within the deadline."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def wait_serving(process: subprocess.Popen[bytes], sock: Path, log: Path) -> None:
    """Until `orch up` serves and has applied its first plan (its status says `ready`)."""
    end = time.monotonic() + DEADLINE
    while not (socket_alive(sock) and status_over(sock)["orchestrator"]["ready"]):
        assert process.poll() is None, f"orch up exited {process.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < end, f"orch up is not serving: {log.read_text()[-2000:]}"
        time.sleep(0.02)


def status_over(sock: Path) -> Any:
    """GET /v1/status over the unix socket, synchronously."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(DEADLINE)
        conn.connect(str(sock))
        conn.sendall(b"GET /v1/status HTTP/1.1\r\nHost: orch\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])
