"""Lattice KV benchmark (JetStreamKV): prints one JSON object.

    .venv/bin/python bench/lattice_kv.py [--calls N] [--callers C] [--quick]

On a 1-node nats-server (the bucket R1, file storage) and on a 3-node cluster (R3), each
started here on loopback, with 16 concurrent callers on one host:
- counter: the example counter's `increment` (reads `count`, writes it back, publishes):
  durable calls/s; calls per atomic batch (group commit); conflicts per call;
- put: a one-write tool, each call its own key, written without a read (blind): calls/s;
- two_hosts: the counter on two hosts (two connections in this process) sharing the
  callers: calls/s and attempts per call, a hot key contended across hosts;
- where the time goes: CPU per call of this process (callers, wasm, the KV client) and of
  the servers; and medians of sequential runs: a tool call that touches no KV (the call
  path), a read (`STREAM.MSG.GET` from the leader), an atomic batch of one write and its
  record (`publish` + commit request), one increment end to end.

Figures are medians over rounds; the machine is shared (servers, callers and wasm on the
same cores), so compare ratios. Target: >= 2,000 KV-writing calls/s on the 3-node cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.capsule import Capsule  # noqa: E402
from orchestrator.capsule.bus import EventBus  # noqa: E402
from orchestrator.capsule.gate import RateLimiter  # noqa: E402
from orchestrator.engine import WasmEngine  # noqa: E402
from orchestrator.lattice import txn  # noqa: E402
from orchestrator.lattice.connection import Lattice, LatticeAddress  # noqa: E402
from orchestrator.lattice.kvkeys import EXPECT, RECORD_TTL  # noqa: E402
from orchestrator.lattice.kvstore import JetStreamKV  # noqa: E402
from tests.natsserver import NatsServers, nats_servers  # noqa: E402

WAT = """
(module
  (import "extism:host/env" "input_offset" (func $input (result i64)))
  (import "extism:host/user" "astrid_kv_set" (func $kv_set (param i64 i64) (result i64)))
  (func (export "nothing") (result i32) (i32.const 0))
  (func (export "put") (result i32)
    (drop (call $kv_set (call $input) (call $input))) (i32.const 0)))
"""
MANIFEST = (
    '[package]\nname = "put"\nversion = "1.0.0"\n[[component]]\nfile = "put.wat"\n'
    "[capabilities]\nkv = true\n"
    '[[tool]]\nname = "put"\ninput_schema = { type = "object" }\n'
    '[[tool]]\nname = "nothing"\ninput_schema = { type = "object" }\n'
)


async def rate(call: Callable[[int], Awaitable[Any]], calls: int, callers: int) -> float:
    """Calls per second of `call(i)` from `callers` concurrent callers."""
    left = iter(range(calls))

    async def caller() -> None:
        for i in left:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return calls / (time.perf_counter() - started)


async def median_ms(call: Callable[[], Awaitable[Any]], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def server_cpu(servers: NatsServers) -> float:
    """CPU seconds the servers have used (user + system, from /proc)."""
    total = 0
    for node in servers.nodes:
        if node.process is not None and node.process.poll() is None:
            fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


async def measured(
    servers: NatsServers, cpu: dict[str, list[float]], call: Callable[[int], Awaitable[Any]], calls: int, callers: int
) -> float:
    """`rate`, noting this process's and the servers' CPU time per call (ms) in `cpu`."""
    client, server = time.process_time(), server_cpu(servers)
    result = await rate(call, calls, callers)
    cpu["client"].append((time.process_time() - client) * 1000 / calls)
    cpu["servers"].append((server_cpu(servers) - server) * 1000 / calls)
    return result


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


async def open_kv(urls: str, replicas: int) -> JetStreamKV:
    lattice = await Lattice.connect(LatticeAddress.parse(urls, name="bench"))
    return await JetStreamKV.open(lattice, replicas=replicas)


async def bench_servers(servers: NatsServers, *, calls: int, callers: int, rounds: int) -> dict[str, Any]:
    replicas = len(servers.nodes)
    kv = await open_kv(servers.urls, replicas)
    other = await open_kv(servers.urls, replicas)
    out: dict[str, Any] = {}
    with WasmEngine() as engine, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "put"
        folder.mkdir()
        (folder / "put.wat").write_text(WAT)
        (folder / "Capsule.toml").write_text(MANIFEST)
        bus = EventBus()
        unlimited = RateLimiter(messages_per_second=1e9, bytes_per_second=1e12)  # the counter publishes
        counter = await Capsule.load(
            ROOT / "capsules" / "counter",
            engine=engine,
            bus=bus,
            store=kv,
            workspace=Path(tmp),
            instances=4,
            rate=unlimited,
        )
        put = await Capsule.load(folder, engine=engine, bus=bus, store=kv, workspace=Path(tmp), instances=4)
        await counter.call_tool("increment", {})  # warm up: compile, connect, create the bucket's subjects

        figures: dict[str, list[float]] = {"counter": [], "put": [], "two_hosts": []}
        batches: dict[str, list[float]] = {"counter": [], "put": []}
        cpu: dict[str, dict[str, list[float]]] = {name: {"client": [], "servers": []} for name in ("counter", "put")}
        conflicts: list[float] = []
        attempts: list[float] = []
        other_calls = 0
        for _ in range(rounds):
            before, calls_before = dict(kv.stats), counter.calls
            conflicts_before = counter.conflicts
            increment = lambda i: counter.call_tool("increment", {})  # noqa: E731
            figures["counter"].append(await measured(servers, cpu["counter"], increment, calls, callers))
            used = delta(kv.stats, before)
            batches["counter"].append(used["calls"] / max(used["batches"], 1))
            conflicts.append((counter.conflicts - conflicts_before) / (counter.calls - calls_before))
            before = dict(kv.stats)

            async def put_one(i: int, run: str = uuid.uuid4().hex[:8]) -> None:
                await put.call_tool("put", {"k": f"{run}-{i}"})

            figures["put"].append(await measured(servers, cpu["put"], put_one, calls, callers))
            used = delta(kv.stats, before)
            batches["put"].append(used["calls"] / max(used["batches"], 1))

            on_other = await Capsule.load(
                ROOT / "capsules" / "counter",
                engine=engine,
                bus=bus,
                store=other,
                workspace=Path(tmp),
                instances=4,
                rate=unlimited,
            )
            tried: list[int] = []

            async def either(i: int, on_other: Capsule = on_other, tried: list[int] = tried) -> None:
                tried.append((await (on_other if i % 2 else counter).call_tool("increment", {})).attempts)

            figures["two_hosts"].append(await rate(either, calls // 2, callers))
            attempts.append(sum(tried) / len(tried))
            other_calls += on_other.calls
            await on_other.close()

        subject = kv.subjects.key("bench", "k")

        async def batch() -> None:
            txid = uuid.uuid4().hex
            await txn.send(
                kv.lattice.nc,
                [
                    (subject, b"v", {"Nats-Batch-Id": txid, "Nats-Batch-Sequence": "1"}),
                    (
                        kv.subjects.record(txid),
                        b"",
                        {
                            EXPECT: "0",
                            "Nats-TTL": RECORD_TTL,
                            "Nats-Batch-Id": txid,
                            "Nats-Batch-Sequence": "2",
                            "Nats-Batch-Commit": "1",
                        },
                    ),
                ],
                timeout=5,
            )

        repeat = 50
        out["costs_ms"] = {
            "call_without_kv": await median_ms(lambda: put.call_tool("nothing", {}), repeat),
            "read": await median_ms(lambda: kv.get("counter", "count"), repeat),
            "atomic_batch": await median_ms(batch, repeat),
            "increment": await median_ms(lambda: counter.call_tool("increment", {}), repeat),
        }
        out["calls_per_second"] = {name: round(statistics.median(values)) for name, values in figures.items()}
        out["calls_per_batch"] = {name: round(statistics.median(values), 1) for name, values in batches.items()}
        out["cpu_ms_per_call"] = {
            name: {side: round(statistics.median(values), 3) for side, values in sides.items()}
            for name, sides in cpu.items()
        }
        out["counter_conflicts_per_call"] = round(statistics.median(conflicts), 3)
        out["two_hosts_attempts_per_call"] = round(statistics.median(attempts), 2)
        stored = int(await kv.get("counter", "count") or b"0")
        out["counter_lost"] = counter.calls + other_calls - stored  # must be 0
        await counter.close()
        await put.close()
        bus.close()
    for each in (kv, other):
        await each.close()
        await each.lattice.close()
    return out


def run(count: int, *, calls: int, callers: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, nats_servers(Path(tmp), count=count) as servers:
        return asyncio.run(bench_servers(servers, calls=calls, callers=callers, rounds=rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="few calls, one round")
    options = parser.parse_args()
    calls, rounds = (300, 1) if options.quick else (options.calls, options.rounds)
    result = {
        "callers": options.callers,
        "calls": calls,
        "one_node_r1": run(1, calls=calls, callers=options.callers, rounds=rounds),
        "three_nodes_r3": run(3, calls=calls, callers=options.callers, rounds=rounds),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
