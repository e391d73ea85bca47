"""Host benchmark: prints one JSON object.

    .venv/bin/python bench/host.py [--rounds N] [--quick]

- kv: durable tool calls per second through `Capsule.call_tool` (schema check, wasm on the
  capsule's worker threads, KV write staged by the airlock, group commit before the
  result), with one KV write per call and with 100 writes per call, 64 calls in flight,
  `instances=2`. Target: >= 5,000 calls/s with one write per call. The reference is the
  same loop with a tool that writes nothing (the cost of the call path itself).
- bus: events per second published to 1 and to 100 subscribers that never read (drop-oldest
  keeps publishers unblocked). Target: >= 200,000/s to 1 subscriber.
- counter: the example counter capsule (`increment` reads `count`, adds one, writes it
  back, publishes counter.changed) from 16 concurrent callers with `instances` 1, 2 and 4:
  durable increments per second and KV conflicts (attempts run again) per call. The final
  count must equal the increments acknowledged (`lost` must be 0).
- host_call: the cost of one airlock call from the guest (`astrid_clock_ms`, the cheapest,
  and `astrid_kv_get` of a cached key), from a loop of 10,000 calls minus the same loop
  without them.

Figures are medians over rounds; the machine is shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.capsule import Capsule  # noqa: E402
from orchestrator.capsule.bus import EventBus  # noqa: E402
from orchestrator.capsule.gate import RateLimiter  # noqa: E402
from orchestrator.capsule.store import KVStore  # noqa: E402
from orchestrator.engine import WasmEngine  # noqa: E402

WAT = """
(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "input_offset" (func $input (result i64)))
  (import "extism:host/user" "astrid_kv_set" (func $kv_set (param i64 i64) (result i64)))
  (import "extism:host/user" "astrid_kv_get" (func $kv_get (param i64) (result i64)))
  (import "extism:host/user" "astrid_clock_ms" (func $clock (result i64)))
  (func $key (param $i i32) (result i64) (local $k i64)
    (local.set $k (call $alloc (i64.const 2)))
    (call $store_u8 (local.get $k) (i32.const 107))
    (call $store_u8 (i64.add (local.get $k) (i64.const 1)) (i32.add (local.get $i) (i32.const 1)))
    (local.get $k))
  (func (export "nothing") (result i32) (i32.const 0))
  (func (export "write1") (result i32)
    (drop (call $kv_set (call $key (i32.const 0)) (call $input))) (i32.const 0))
  (func (export "write100") (result i32) (local $i i32) (local $k i64)
    (local.set $k (call $key (i32.const 0)))
    (loop $l
      (call $store_u8 (i64.add (local.get $k) (i64.const 1)) (i32.add (local.get $i) (i32.const 1)))
      (drop (call $kv_set (local.get $k) (call $input)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))
    (i32.const 0))
  (func (export "loop") (result i32) (local $i i32) (local $x i64)
    (loop $l
      (local.set $x (i64.add (local.get $x) (i64.extend_i32_u (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
    (i32.wrap_i64 (i64.and (local.get $x) (i64.const 0))))
  (func (export "clock") (result i32) (local $i i32) (local $x i64)
    (loop $l
      (local.set $x (i64.add (local.get $x) (call $clock)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
    (i32.wrap_i64 (i64.and (local.get $x) (i64.const 0))))
  (func (export "kv_get") (result i32) (local $i i32) (local $k i64)
    (local.set $k (call $key (i32.const 0)))
    (loop $l
      (drop (call $kv_get (local.get $k)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
    (i32.const 0)))
"""
TOOLS = ("nothing", "write1", "write100", "loop", "clock", "kv_get")
MANIFEST = (
    '[package]\nname = "bench"\nversion = "1.0.0"\n[[component]]\nfile = "bench.wat"\n'
    "[capabilities]\nkv = true\n[limits]\nfuel = 10_000_000_000\n"
    + "".join(f'[[tool]]\nname = "{t}"\ninput_schema = {{ type = "object" }}\n' for t in TOOLS)
)


async def throughput(capsule: Capsule, tool: str, calls: int, in_flight: int = 64) -> float:
    """Tool calls per second with `in_flight` concurrent callers."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await capsule.call_tool(tool, {"v": 1})

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return calls / (time.perf_counter() - started)


async def per_call_us(capsule: Capsule, tool: str, repeat: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        await capsule.call_tool(tool, {})
    return (time.perf_counter() - started) / repeat * 1e6


def publish_rate(*, subscribers: int, events: int) -> float:
    """Events/s published to `subscribers` subscriptions to `>` that never read."""
    bus = EventBus()
    subs = [bus.subscribe(">") for _ in range(subscribers)]
    topics = [f"bench.capsule.c{i}.tick" for i in range(8)]
    payload = {"n": 1, "text": "hello"}
    publish = bus.publish
    start = time.perf_counter()
    for i in range(events):
        publish(topics[i & 7], payload, source="bench")
    seconds = time.perf_counter() - start
    for sub in subs:
        sub.close()
    bus.close()
    return events / seconds


async def bench_capsule(rounds: int, quick: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench"
        folder.mkdir()
        (folder / "bench.wat").write_text(WAT)
        (folder / "Capsule.toml").write_text(MANIFEST)
        store = await KVStore.open(Path(tmp) / "kv.sqlite3")
        bus = EventBus()
        engine = WasmEngine()
        capsule = await Capsule.load(folder, engine=engine, bus=bus, store=store, workspace=Path(tmp), instances=2)
        calls = 2000 if quick else 6000
        samples: dict[str, list[float]] = {"nothing": [], "write1": [], "write100": []}
        host: dict[str, list[float]] = {"clock": [], "kv_get": []}
        for _ in range(rounds):
            for tool, rates in samples.items():
                count = calls // (10 if tool == "write100" else 1)
                rates.append(await throughput(capsule, tool, count))
            base = await per_call_us(capsule, "loop")
            for tool, costs in host.items():
                costs.append((await per_call_us(capsule, tool) - base) / 10_000)
        if await store.get("bench", "k\x01") != b'{"v":1}':  # the key the write tools write first
            raise SystemExit("bench: the write tools wrote nothing: the figures would be meaningless")
        commits = store.stats["commits"]
        rows = store.stats["rows_written"]
        await capsule.close()
        await store.close()
        engine.close()
        bus.close()
    nothing, write1, write100 = (statistics.median(samples[t]) for t in ("nothing", "write1", "write100"))
    return {
        "kv": {
            "calls_per_s_no_write": round(nothing),
            "calls_per_s_1_write": round(write1),
            "calls_per_s_100_writes": round(write100),
            "kv_writes_per_s_100_per_call": round(write100 * 100),
            "1_write_over_no_write": round(write1 / nothing, 3),
            "rows_per_commit": round(rows / max(commits, 1), 1),
        },
        "host_call": {
            "astrid_clock_ms_us": round(statistics.median(host["clock"]), 3),
            "astrid_kv_get_cached_us": round(statistics.median(host["kv_get"]), 3),
        },
    }


async def bench_counter(rounds: int, quick: bool) -> dict[str, object]:
    calls = 1600 if quick else 4800
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = await KVStore.open(Path(tmp) / "kv.sqlite3")
        bus = EventBus()
        engine = WasmEngine()
        for instances in (1, 2, 4):
            capsule = await Capsule.load(
                ROOT / "capsules" / "counter",
                engine=engine,
                bus=bus,
                store=store,
                workspace=Path(tmp),
                name=f"counter{instances}",
                instances=instances,
                rate=RateLimiter(messages_per_second=1e9, bytes_per_second=1e12),  # publishes unlimited
            )
            rates = [await throughput(capsule, "increment", calls, in_flight=16) for _ in range(rounds)]
            count = int(await store.get(capsule.name, "count") or b"0")
            result[f"instances_{instances}"] = {
                "increments_per_s": round(statistics.median(rates)),
                "conflicts_per_call": round(capsule.conflicts / capsule.calls, 3),
                "lost": capsule.calls - count,
            }
            await capsule.close()
        await store.close()
        engine.close()
        bus.close()
    return result


def bench_bus(rounds: int, quick: bool) -> dict[str, object]:
    events = 50_000 if quick else 200_000
    result: dict[str, object] = {}
    for subscribers in (1, 100):
        rates = [publish_rate(subscribers=subscribers, events=events) for _ in range(rounds)]
        result[f"events_per_s_{subscribers}_subscriber{'s' if subscribers > 1 else ''}"] = round(
            statistics.median(rates)  # type: ignore[arg-type]
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    report = {
        "rounds": rounds,
        **asyncio.run(bench_capsule(rounds, args.quick)),
        "counter": asyncio.run(bench_counter(rounds, args.quick)),
        "bus": bench_bus(rounds, args.quick),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
