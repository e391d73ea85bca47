"""Lattice tool-call benchmark: prints one JSON object with figures and targets.

    .venv/bin/python bench/lattice_calls.py [--calls N] [--seconds S] [--rounds R]

A nats-server (one node, loopback) and two host processes, each running the example
`counter` capsule (its own KV store) and a CallServer for it, in the deployment's queue
group. This process is the client:

- latency: N sequential `counter.get` calls (reads KV) through `call_tool` (cross-host: the
  host is another process), against the same call made in this process on the same capsule
  (`Capsule.call_tool`, no NATS), and against a bare NATS request/reply to an echo
  responder in a host process (what NATS itself costs). p50/p99 in ms, per round; the
  median over rounds is reported. Targets: cross-host p50 <= 2 ms, p99 <= 10 ms.
- throughput: 16 clients (16 Lattice connections) calling `counter.get` in a loop for S
  seconds: calls/s, failures, and how the two hosts shared the calls. The load generator
  shares the machine's cores with the server and both hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.capsule import Capsule, KVStore  # noqa: E402
from orchestrator.capsule.bus import EventBus  # noqa: E402
from orchestrator.engine import WasmEngine  # noqa: E402
from orchestrator.lattice.calls import CallServer, LatticeCallError, call_tool  # noqa: E402
from orchestrator.lattice.connection import Lattice, LatticeAddress, barrier  # noqa: E402
from tests.natsserver import nats_servers  # noqa: E402

CLIENTS = 16
LATTICE = "bench"


def percentile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


async def load_counter(folder: Path, engine: WasmEngine) -> tuple[Capsule, KVStore]:
    store = await KVStore.open(folder.parent / f"{folder.name}.kv.sqlite3")
    capsule = await Capsule.load(folder, engine=engine, bus=EventBus(), store=store, workspace=folder.parent)
    return capsule, store


# -- a host process --------------------------------------------------------------------------
async def host_main(urls: str, folder: Path, host_id: str) -> None:
    with WasmEngine() as engine:
        capsule, store = await load_counter(folder, engine)
        lattice = await Lattice.connect(LatticeAddress.parse(urls, name=LATTICE))

        async def call(deployment: str, tool: str, arguments: Any) -> Any:
            return await capsule.call_tool(tool, arguments)

        server = CallServer(lattice, call, host_id)
        await server.serve("counter")

        async def echo(msg: Any) -> None:
            await lattice.nc.publish(msg.reply, msg.data)

        await lattice.nc.subscribe("bench.echo", queue="echo", cb=echo)
        await barrier(lattice.nc)
        print("serving", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        await server.close()
        await lattice.close()
        await capsule.close()
        await store.close()


def start_host(urls: str, folder: Path, host_id: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--host", urls, str(folder), host_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line != b"serving\n":
        raise RuntimeError(f"host {host_id} did not start: {line!r}")
    return process


# -- the client ------------------------------------------------------------------------------
async def latency(urls: str, capsule: Capsule, calls: int) -> dict[str, Any]:
    client = await Lattice.connect(LatticeAddress.parse(urls, name=LATTICE))
    try:
        for _ in range(200):  # warm up both paths
            await call_tool(client, "counter", "get", b"{}")
            await capsule.call_tool("get", {})
        remote, local, bare = [], [], []
        for _ in range(calls):
            started = time.perf_counter()
            await call_tool(client, "counter", "get", b"{}")
            remote.append(time.perf_counter() - started)
            started = time.perf_counter()
            await capsule.call_tool("get", {})
            local.append(time.perf_counter() - started)
            started = time.perf_counter()
            await client.nc.request("bench.echo", b'{"count":0}', timeout=5)
            bare.append(time.perf_counter() - started)
        return {
            name: {"p50_ms": percentile_ms(values, 0.5), "p99_ms": percentile_ms(values, 0.99)}
            for name, values in (("cross_host", remote), ("local_in_process", local), ("bare_nats_request", bare))
        }
    finally:
        await client.close()


async def throughput(urls: str, seconds: float) -> dict[str, Any]:
    clients = [await Lattice.connect(LatticeAddress.parse(urls, name=LATTICE)) for _ in range(CLIENTS)]
    ok = 0
    failures: dict[str, int] = {}
    hosts: dict[str, int] = {}
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def loop(client: Lattice) -> None:
        nonlocal ok
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                _, headers = await call_tool(client, "counter", "get", b"{}")
            except LatticeCallError as error:
                failures[error.kind] = failures.get(error.kind, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            ok += 1
            hosts[headers["X-Host"]] = hosts.get(headers["X-Host"], 0) + 1

    try:
        started = time.monotonic()
        await asyncio.gather(*(loop(client) for client in clients))
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            await client.close()
    return {
        "clients": CLIENTS,
        "calls_per_s": round(ok / elapsed),
        "p50_ms": percentile_ms(latencies, 0.5),
        "p99_ms": percentile_ms(latencies, 0.99),
        "failures": failures,
        "calls_by_host": hosts,
    }


async def run(urls: str, base: Path, calls: int, seconds: float, rounds: int) -> dict[str, Any]:
    folders = []
    for name in ("host-a", "host-b", "local"):
        folder = base / name / "counter"
        shutil.copytree(ROOT / "capsules" / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
        folders.append(folder)
    hosts = [start_host(urls, folders[i], name) for i, name in enumerate(("host-a", "host-b"))]
    try:
        with WasmEngine() as engine:
            capsule, store = await load_counter(folders[2], engine)
            try:
                lat = [await latency(urls, capsule, calls) for _ in range(rounds)]
                put = [await throughput(urls, seconds) for _ in range(rounds)]
            finally:
                await capsule.close()
                await store.close()
    finally:
        for process in hosts:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    figures = {
        path: {q: statistics.median(r[path][q] for r in lat) for q in ("p50_ms", "p99_ms")}
        for path in ("cross_host", "local_in_process", "bare_nats_request")
    }
    best = max(put, key=lambda r: r["calls_per_s"])
    return {
        "setup": "1 nats-server, 2 host processes serving counter (queue group), client in this process, loopback",
        "latency_sequential": figures,
        "latency_rounds": lat,
        "cross_host_overhead_p50_ms": round(figures["cross_host"]["p50_ms"] - figures["local_in_process"]["p50_ms"], 3),
        "throughput_16_clients": {
            "median_calls_per_s": statistics.median(r["calls_per_s"] for r in put),
            "best_round": best,
            "rounds": put,
        },
        "targets": {
            "cross_host_p50_ms": 2.0,
            "cross_host_p99_ms": 10.0,
            "met": figures["cross_host"]["p50_ms"] <= 2.0 and figures["cross_host"]["p99_ms"] <= 10.0,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per latency round")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--host", nargs=3, metavar=("URLS", "FOLDER", "ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host:
        asyncio.run(host_main(args.host[0], Path(args.host[1]), args.host[2]))
        return
    with (
        tempfile.TemporaryDirectory(prefix="lattice-bench-") as scratch,
        nats_servers(Path(scratch) / "nats") as servers,
    ):
        figures = asyncio.run(run(servers.urls, Path(scratch), args.calls, args.seconds, args.rounds))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
