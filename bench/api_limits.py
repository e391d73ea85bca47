"""Control API bounds benchmark (security review findings 13-14): prints one JSON object.

    .venv/bin/python bench/api_limits.py [--quick]

- bus_memory: an Orchestrator in this process; 1,500 publishes of distinct 1 MiB payloads
  (the size given, as the airlock knows it). Reported: RSS before and after (MiB), the
  events and bytes the history kept. Before the byte cap: RSS 78 -> 1,591 MiB.
- history_stream: then a client (a spawned process) asks for `history=10000` and reads
  slowly (64 KiB every 10 ms). Reported: this process's RSS peak above the start while the
  stream runs (sampled every 20 ms), events delivered and announced lost. Before: one
  client took RSS to 2,471 MiB within 8 s (the backlog serialised at once).
- slowloris: `orch up` (default limits) in its own process; 2,000 connections each send
  a request head's first line and then a header byte per second. Reported: the server's
  connection count (GET /v1/status `api`), a normal client's status latency amid the flood,
  how many flood connections the server had closed 12 s later (head_timeout is 10 s).
  Before: all 2,000 stayed open for 100 s.
- fd_limit: `orch up` with RLIMIT_NOFILE 1024 (soft = hard); 1,100 idle connections.
  Reported: the connection cap it chose, whether a status call and a tool call succeed amid
  the flood, seconds until a wasm rewritten during the flood runs, and whether the log says
  "Too many open files". Before: calls timed out and the watcher missed the wasm.

The machine is shared: latencies are indications, not targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.api.client import Client  # noqa: E402
from orchestrator.api.server import ControlServer  # noqa: E402
from orchestrator.control.runtime import Orchestrator  # noqa: E402

MIB = 1 << 20
SPAWN = multiprocessing.get_context("spawn")
UP_WITH_LIMIT = """import resource, runpy, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
sys.argv = ["orch", *sys.argv[1:]]
runpy.run_module("orchestrator", run_name="__main__")
"""


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def deployment(root: Path) -> Path:
    for name in ("counter", "milestones", "notes"):
        shutil.copytree(ROOT / "capsules" / name, root / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(ROOT / "config.yaml", root / "config.yaml")
    return root / "config.yaml"


# -- in this process: the bus and a slow history reader -------------------------------------------
def slow_reader(path: str, history: int, result: Any) -> None:
    """GET /v1/events?history=N, reading 64 KiB every 10 ms until `event: live`."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(f"GET /v1/events?history={history} HTTP/1.1\r\nHost: orch\r\n\r\n".encode())
    pending, delivered, lost = b"", 0, 0
    while True:
        chunk = client.recv(1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        done = False
        for line in lines:
            delivered += line.startswith(b"id: ")
            if line.startswith(b'data: {"dropped"'):
                lost += json.loads(line[6:])["dropped"]
            done = done or line == b"event: live"
        if done:
            break
        time.sleep(0.01)
    client.close()
    result.put({"delivered": delivered, "lost": lost})


async def in_process(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        orchestrator = Orchestrator(deployment(root), watch=False)
        await orchestrator.start()
        server = ControlServer(orchestrator, state_dir=root / ".orch")
        await server.start()
        try:
            before = rss_mib()
            count = 300 if quick else 1500
            for i in range(count):
                payload = str(i) * (MIB // len(str(i)))  # a distinct 1 MiB string each time
                orchestrator.bus.publish("bench.blob", payload, size=len(payload))
            bus = orchestrator.bus
            memory = {
                "published": count,
                "payload_mib": 1,
                "rss_before_mib": round(before),
                "rss_after_mib": round(rss_mib()),
                "retained_events": bus.retained,
                "retained_mib": round(bus.retained_bytes / MIB, 1),
            }
            start, peak = rss_mib(), 0.0
            queue = SPAWN.Queue()
            reader = SPAWN.Process(target=slow_reader, args=(str(server.path), 10_000, queue))
            reader.start()
            began = time.monotonic()
            while reader.is_alive() or queue.empty():
                peak = max(peak, rss_mib())
                await asyncio.sleep(0.02)
                if time.monotonic() - began > 120:
                    break
            got = queue.get(timeout=10)
            reader.join(10)
            stream = {
                "history_requested": 10_000,
                **got,
                "seconds": round(time.monotonic() - began, 2),
                "rss_start_mib": round(start),
                "rss_peak_above_start_mib": round(peak - start, 1),
            }
        finally:
            await server.stop()
            await orchestrator.stop(2)
    return {"bus_memory": memory, "history_stream": stream}


# -- orch up in its own process ---------------------------------------------------------------------
class Up:
    def __init__(self, root: Path, *, limit: int | None = None) -> None:
        self.root = root / "deployment"
        self.root.mkdir()
        self.config = deployment(self.root)
        self.sock = self.root / ".orch" / "orch.sock"
        self.log = root / "up.log"
        command = [sys.executable, "-m", "orchestrator"]
        if limit is not None:
            command = [sys.executable, "-c", UP_WITH_LIMIT, str(limit)]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [*command, "up", str(self.config), "--log-format", "json"],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def ready(self) -> None:
        for _ in range(1200):
            if self.sock.exists():
                return
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        raise RuntimeError("orch up did not start")

    def stop(self) -> str:
        self.process.send_signal(2)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        return self.log.read_text(errors="replace")


def open_connections(path: Path, count: int, first: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        if first:
            client.sendall(first)
        client.setblocking(False)
        sockets.append(client)
    return sockets


def closed_count(sockets: list[socket.socket]) -> int:
    closed = 0
    for client in sockets:
        try:
            closed += client.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


async def timed_status(api: Client) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    status = await api.status()
    return status, round((time.monotonic() - started) * 1000, 1)


async def slowloris(quick: bool) -> dict[str, Any]:
    count = 500 if quick else 2000
    with tempfile.TemporaryDirectory() as folder:
        up = Up(Path(folder))
        try:
            await up.ready()
            sockets = await asyncio.to_thread(open_connections, up.sock, count, b"GET /v1/status HTTP/1.1\r\n")
            stop = threading.Event()

            def trickle() -> None:
                while not stop.wait(1.0):
                    for client in sockets:
                        with contextlib.suppress(OSError):
                            client.send(b"X")

            thread = threading.Thread(target=trickle, daemon=True)
            thread.start()
            async with Client(up.sock) as api:
                status, latency = await timed_status(api)
                during = {"server_connections": status["api"]["connections"], "status_ms": latency}
                await asyncio.sleep(12)
                after = (await api.status())["api"]
            stop.set()
            thread.join(5)
            closed = closed_count(sockets)
            for client in sockets:
                client.close()
        finally:
            up.stop()
    return {
        "flood": count,
        "during": during,
        "after_12_s": {
            "flood_closed_by_server": closed,
            **{key: after[key] for key in ("connections", "evicted", "head_timeouts")},
        },
    }


async def fd_limit(quick: bool) -> dict[str, Any]:
    count = 1100
    with tempfile.TemporaryDirectory() as folder:
        up = Up(Path(folder), limit=1024)
        try:
            await up.ready()
            async with Client(up.sock) as api:
                before = (await api.status())["api"]["max_connections"]
                sockets = await asyncio.to_thread(open_connections, up.sock, count)
                status, latency = await timed_status(api)
                body, _ = await api.call("counter", "increment", b'{"by": 1}')
                version = next(c["version"] for c in status["capsules"] if c["name"] == "counter")
                wasm = up.root / "capsules" / "counter" / "counter.wasm"
                wasm.write_bytes(wasm.read_bytes() + b"\x00\x06\x05bench")  # a custom section: a new version
                written, reloaded_after = time.monotonic(), None
                while time.monotonic() - written < 30:
                    now = next(c for c in (await api.status())["capsules"] if c["name"] == "counter")
                    if now["version"] != version and now["phase"] == "Running":
                        reloaded_after = round(time.monotonic() - written, 2)
                        break
                    await asyncio.sleep(0.05)
                final = (await api.status())["api"]
            for client in sockets:
                client.close()
        finally:
            log = up.stop()
    return {
        "rlimit_nofile": 1024,
        "flood": count,
        "max_connections": before,
        "status_ms_amid_flood": latency,
        "tool_call": json.loads(body),
        "server": {k: final[k] for k in ("connections", "evicted", "refused")},
        "wasm_reloaded_after_s": reloaded_after,
        "too_many_open_files_in_log": "Too many open files" in log or "Errno 24" in log,
    }


async def run(quick: bool) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # this process holds the floods
    return {
        **(await in_process(quick)),
        "slowloris": await slowloris(quick),
        "fd_limit": await fd_limit(quick),
        "machine": {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller floods and bus (about 30 s)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.quick)), indent=2))


if __name__ == "__main__":
    main()
