"""Control API benchmark: prints one JSON object with figures and targets.

    .venv/bin/python bench/api.py [--rounds N] [--quick] [--server-profile FILE]

The orchestrator runs as `orch up <config> --no-watch --log-format json` in a separate
process (its stdout, one JSON line per bus event, goes to a file), in a temp dir holding a
copy of capsules/counter and a tiny WAT capsule `bench` (publishes on `bench.*`, writes KV).

- tool_calls: 16 clients (16 `orchestrator.api.client.Client`s, so 16 keep-alive connections
  over the unix socket) each calling `POST /v1/capsules/<capsule>/tools/<tool>` in a loop
  for a fixed time: `get` (counter, reads KV only), `increment` (counter, a durable KV write
  committed before the answer, and a publish of `counter.changed`) and `kv_write` (bench: one
  durable KV write, no publish). Reported per tool: calls/s, ok calls/s, p50/p99 latency of
  the ok calls (ms), failures (with their kinds), and CPU per call of the server and of the
  load generator (from /proc), so the client's cost can be told apart from the server's.
  Targets: >= 2,000 calls/s with 16 clients; p99 < 20 ms.
  Every capsule's publishes pass a RateLimiter of 1,000 messages/s with a 1 s burst
  (orchestrator/gate.py; the launcher in runtime.py keeps the default), so past that rate
  `increment` fails (`publish_rate_limited`); `kv_write` is the same durable write without
  the publish. `increment_count_check` compares how far the count moved with the increments
  that answered ok (a failed call's staged write is still committed).
  The load generator SHARES THE MACHINE'S 2 CORES with the server. `tool_calls` runs it in
  this process (one process, 16 connections); `tool_calls_2_load_processes` runs it as two
  spawned processes of 8 connections each (the client side is then not bound to one GIL,
  but still competes for the same 2 cores). `server_cpu_calls_per_s` = 1 / server CPU per
  call: what the server could serve with a whole core to itself (it is mostly one GIL).
- events: one client reading `GET /v1/events?topic=bench.>` (in a spawned process) while
  events are published at 10,000/s for a few seconds. Reported: events/s received, events
  lost (sum of the `event: lost` notices), delivery lag (receive wall clock minus the
  event's `timestamp_ms`), and whether the stream kept up (everything received, nothing
  lost, the end marker within a second). Target: keeps up with 10,000 events/s.
  * `in_process` (what the target is judged on): an Orchestrator + ControlServer in THIS
    process (so without the `orch up` stdout printer), `orchestrator.bus.publish` called
    from the event loop at a paced 10,000/s (a full run adds 20,000 and 40,000/s, for
    headroom), the SSE client in a spawned process.
  * `via_capsule`: the `bench` capsule's `burst` tool publishes 100 events per call through
    the `astrid_ipc_publish` airlock, called at 100 calls/s over the API of `orch up`
    (10,000 attempts/s). The rate limit above caps this path near 1,000/s (plus the burst):
    `accepted_per_s` shows it; the rest are refused (the guest sees an error result).

Figures are medians over rounds (latency percentiles: per round, then the median); the
machine is shared, so compare ratios rather than absolute numbers. `--quick` takes ~20 s,
a full run ~95 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.api.client import Client, RemoteError  # noqa: E402
from orchestrator.api.server import ControlServer  # noqa: E402
from orchestrator.control.runtime import Orchestrator  # noqa: E402

CLIENTS = 16
EVENT_RATE = 10_000
PER_CALL = 100  # events published by one call of the `bench` capsule's `burst` tool
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0
TICKS = os.sysconf("SC_CLK_TCK")
SPAWN = multiprocessing.get_context("spawn")

BENCH_WAT = """
(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "load_u8" (func $load_u8 (param i64) (result i32)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/user" "astrid_ipc_publish" (func $publish (param i64 i64) (result i64)))
  (import "extism:host/user" "astrid_kv_set" (func $kv_set (param i64 i64) (result i64)))
  (memory 1)
  (data (i32.const 0) "bench.tick")
  (data (i32.const 16) "bench.probe")
  (data (i32.const 32) "bench.end")
  (data (i32.const 48) "{\\"n\\":1}")
  (data (i32.const 64) "key")
  ;; a kernel block holding len bytes of linear memory at ptr
  (func $block (param $ptr i32) (param $len i32) (result i64) (local $p i64) (local $i i32)
    (local.set $p (call $alloc (i64.extend_i32_u (local.get $len))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (call $store_u8
          (i64.add (local.get $p) (i64.extend_i32_u (local.get $i)))
          (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $p))
  ;; publish n times on the topic at ptr/len; the output is the number accepted (u64 LE)
  (func $emit (param $ptr i32) (param $len i32) (param $n i32) (result i32)
    (local $topic i64) (local $payload i64) (local $i i32) (local $ok i64) (local $out i64)
    (local.set $topic (call $block (local.get $ptr) (local.get $len)))
    (local.set $payload (call $block (i32.const 48) (i32.const 7)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.eqz (call $load_u8 (call $publish (local.get $topic) (local.get $payload))))
          (then (local.set $ok (i64.add (local.get $ok) (i64.const 1)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $out (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $out) (local.get $ok))
    (call $output_set (local.get $out) (i64.const 8))
    (i32.const 0))
  (func (export "burst") (result i32) (call $emit (i32.const 0) (i32.const 10) (i32.const PER_CALL)))
  (func (export "probe") (result i32) (call $emit (i32.const 16) (i32.const 11) (i32.const 1)))
  (func (export "end") (result i32) (call $emit (i32.const 32) (i32.const 9) (i32.const 1)))
  ;; one durable KV write, no publish (traps if the write is refused)
  (func (export "write") (result i32)
    (if (call $load_u8
          (call $kv_set (call $block (i32.const 64) (i32.const 3)) (call $block (i32.const 48) (i32.const 7))))
      (then unreachable))
    (i32.const 0)))
""".replace("PER_CALL", str(PER_CALL))
BENCH_TOOLS = ("burst", "probe", "end", "write")
BENCH_MANIFEST = (
    '[package]\nname = "bench"\nversion = "1.0.0"\n[[component]]\nfile = "bench.wat"\n'
    '[capabilities]\nkv = true\nipc_publish = ["bench.>"]\n'
    + "".join(f'[[tool]]\nname = "{t}"\ninput_schema = {{ type = "object" }}\n' for t in BENCH_TOOLS)
)
TOOLS = {"get": ("counter", "get"), "increment": ("counter", "increment"), "kv_write": ("bench", "write")}
CONFIG = """version: 1
workspace: .
state_dir: .orch
capsules:
  counter:
    path: counter
    config: {step: 1}
    # every increment publishes counter.changed: allow more than the default 1000/s, as an
    # operator would for a deployment expected to take thousands of calls per second
    publish_rate: {messages_per_second: 100000}
  bench:
    path: bench
"""


# -- helpers -------------------------------------------------------------------------------
def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def median(values: list[Any], digits: int = 1) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def write_deployment(base: Path) -> Path:
    shutil.copytree(ROOT / "capsules" / "counter", base / "counter")
    (base / "bench").mkdir()
    (base / "bench" / "bench.wat").write_text(BENCH_WAT)
    (base / "bench" / "Capsule.toml").write_text(BENCH_MANIFEST)
    config = base / "config.yaml"
    config.write_text(CONFIG)
    return config


# -- the orchestrator in another process ---------------------------------------------------
class Server:
    """`orch up` in a subprocess; its event lines go to a file (read only to see it ready)."""

    def __init__(self, base: Path, config: Path, profile: Path | None) -> None:
        self.base = base
        self.socket = base / ".orch" / "orch.sock"
        self._out_path = base / "orch.stdout"
        self._err_path = base / "orch.stderr"
        python = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
        with open(self._out_path, "wb") as out, open(self._err_path, "wb") as err:
            self.process = subprocess.Popen(
                [*python, "-m", "orchestrator", "up", str(config), "--no-watch", "--log-format", "json"],
                cwd=base,
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready(self) -> float:
        """Seconds until stdout shows orch.reconcile.finished and the API answers."""
        started = time.perf_counter()
        deadline = started + READY_TIMEOUT_S
        seen = False
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"orch up exited with {self.process.returncode}: {self._stderr()}")
            if not seen:
                for line in self._out_path.read_text(errors="replace").splitlines():
                    event = json.loads(line) if line.startswith("{") else {}
                    if event.get("topic") == "orch.reconcile.finished":
                        if event.get("payload", {}).get("failing"):
                            raise RuntimeError(f"capsules failing at start: {event['payload']}")
                        seen = True
            if seen and self.socket.exists():
                with contextlib.suppress(OSError, RemoteError):
                    async with Client(self.socket, timeout=2.0) as client:
                        await client.status()
                        return time.perf_counter() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"orch up not ready after {READY_TIMEOUT_S} s: {self._stderr()}")

    def _stderr(self) -> str:
        return self._err_path.read_text(errors="replace")[-2000:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# -- tool calls ----------------------------------------------------------------------------
async def _hammer(socket: str, label: str, clients: int, seconds: float, start_at: float, server_pid: int) -> dict:
    """`clients` connections calling TOOLS[label] in a loop from wall time `start_at` for `seconds`."""
    capsule, tool = TOOLS[label]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    messages: list[str] = []
    calls = 0

    async with contextlib.AsyncExitStack() as stack:
        pool = [await stack.enter_async_context(Client(Path(socket), timeout=CALL_TIMEOUT_S)) for _ in range(clients)]
        await asyncio.gather(*(c.status() for c in pool))  # every client connected before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0, server0, started = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
        deadline = started + seconds

        async def worker(client: Client) -> None:
            nonlocal calls
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await client.call(capsule, tool, b"{}")
                except RemoteError as error:
                    errors[error.kind] += 1
                    if len(messages) < 3:
                        messages.append(f"{error.status} {error.kind}: {error}"[:300])
                except Exception as error:  # a client-side failure (timeout, connection)
                    errors[type(error).__name__] += 1
                    if len(messages) < 3:
                        messages.append(f"{type(error).__name__}: {error}"[:300])
                else:
                    latencies.append(time.perf_counter() - t0)
                calls += 1

        await asyncio.gather(*(worker(c) for c in pool))
        elapsed = time.perf_counter() - started
        cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server_pid) - server0
    return {
        "calls": calls,
        "ok": len(latencies),
        "seconds": elapsed,
        "latencies": latencies,
        "errors": dict(errors),
        "messages": messages,
        "client_cpu_s": cpu,
        "server_cpu_s": server_cpu,
    }


def hammer_process(socket: str, label: str, clients: int, seconds: float, start_at: float, server_pid: int) -> dict:
    """`_hammer` in a load-generator process (module level: spawned workers import it)."""
    return asyncio.run(_hammer(socket, label, clients, seconds, start_at, server_pid))


def warm_process() -> int:
    return os.getpid()


def combine(parts: list[dict]) -> dict[str, Any]:
    """One round's figures from the parts of the load (one per load-generator process)."""
    calls = sum(p["calls"] for p in parts)
    ok = sum(p["ok"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    latencies = [x for p in parts for x in p["latencies"]]
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    server_rate = statistics.mean(p["server_cpu_s"] / p["seconds"] for p in parts)  # server CPU s per s
    client_rate = sum(p["client_cpu_s"] / p["seconds"] for p in parts)
    per_s = calls / seconds
    return {
        "calls_per_s": per_s,
        "ok_calls_per_s": ok / seconds,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "calls": calls,
        "failures": calls - ok,
        "errors": dict(errors),
        "messages": [m for p in parts for m in p["messages"]][:3],
        "server_cpu_us_per_call": server_rate / per_s * 1e6 if per_s else None,
        "client_cpu_us_per_call": client_rate / per_s * 1e6 if per_s else None,
        "server_cpu_util": server_rate,
        "client_cpu_util": client_rate,
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["errors"])
    server_us = median([r["server_cpu_us_per_call"] for r in rounds])
    report: dict[str, Any] = {
        "clients": CLIENTS,
        "calls_per_s": round(statistics.median(r["calls_per_s"] for r in rounds)),
        "ok_calls_per_s": round(statistics.median(r["ok_calls_per_s"] for r in rounds)),
        "p50_ms": median([r["p50_ms"] for r in rounds], 3),
        "p99_ms": median([r["p99_ms"] for r in rounds], 3),
        "calls": sum(r["calls"] for r in rounds),
        "failures": sum(r["failures"] for r in rounds),
        "server_cpu_us_per_call": server_us,
        "client_cpu_us_per_call": median([r["client_cpu_us_per_call"] for r in rounds]),
        "server_cpu_util": median([r["server_cpu_util"] for r in rounds], 2),
        "client_cpu_util": median([r["client_cpu_util"] for r in rounds], 2),
        "server_cpu_calls_per_s": round(1e6 / server_us) if server_us else None,
    }
    if errors:
        report["errors"] = dict(errors)
        report["first_errors"] = first = [m for r in rounds for m in r["messages"]][:3]
        report["publish_rate_limited"] = any("publish rate limit" in m for m in first)
    return report


async def count(socket: Path) -> int:
    async with Client(socket, timeout=CALL_TIMEOUT_S) as client:
        output, _ = await client.call("counter", "get", b"{}")
    return int(json.loads(output)["count"])


async def bench_tool_calls(
    server: Server, rounds: int, seconds: float, pool: ProcessPoolExecutor
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """(load from this process, load from two spawned processes), each {label: figures} for
    TOOLS, and how far the count moved against the increments that answered ok."""
    socket = str(server.socket)
    before = await count(server.socket)
    here: dict[str, list[dict]] = {label: [] for label in TOOLS}
    apart: dict[str, list[dict]] = {label: [] for label in TOOLS}
    loop = asyncio.get_running_loop()
    for _ in range(rounds):
        for label in TOOLS:
            part = await _hammer(socket, label, CLIENTS, seconds, time.time(), server.pid)
            here[label].append(combine([part]))
            start_at = time.time() + 0.3  # both processes connect first, then start together
            futures = [
                loop.run_in_executor(pool, hammer_process, socket, label, CLIENTS // 2, seconds, start_at, server.pid)
                for _ in range(2)
            ]
            apart[label].append(combine(list(await asyncio.gather(*futures))))
    increments = here["increment"] + apart["increment"]
    failed = sum(r["failures"] for r in increments)
    check = {
        "ok_calls": sum(r["calls"] for r in increments) - failed,
        "failed_calls": failed,
        "count_advanced": await count(server.socket) - before,
    }
    return (
        {tool: summarize(results) for tool, results in here.items()},
        {tool: summarize(results) for tool, results in apart.items()},
        check,
    )


# -- events --------------------------------------------------------------------------------
async def _read_events(socket: str, pattern: str, ready: Any, timeout: float) -> dict[str, Any]:
    received = lost = notices = 0
    lags: list[float] = []
    first = last = 0.0
    end_at: float | None = None
    client = Client(Path(socket), timeout=timeout)

    async def consume() -> None:
        nonlocal received, lost, notices, first, last, end_at
        async with contextlib.aclosing(client.events(topic=pattern)) as stream:
            async for item in stream:
                now = time.time()
                if "live" in item:  # the end-of-history marker
                    continue
                if "lost" in item:
                    lost += int(item["lost"]["dropped"])
                    notices += 1
                elif item["topic"] == "bench.probe":
                    ready.set()
                elif item["topic"] == "bench.end":
                    end_at = now
                    return
                else:
                    received += 1
                    lags.append(now - item["timestamp_ms"] / 1000)
                    first = first or now
                    last = now

    async with client:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(consume(), timeout)
    return {
        "received": received,
        "lost": lost,
        "lost_notices": notices,
        "first": first,
        "last": last,
        "end_at": end_at,
        "lag_p50_ms": percentile_ms(lags, 0.5),
        "lag_p99_ms": percentile_ms(lags, 0.99),
        "lag_max_ms": round(max(lags) * 1000, 3) if lags else None,
    }


def reader_process(socket: str, pattern: str, ready: Any, results: Any, timeout: float) -> None:
    """The SSE client, in a spawned process: puts its figures on `results`."""
    results.put(asyncio.run(_read_events(socket, pattern, ready, timeout)))


class Reader:
    """A spawned SSE client on `bench.>`; `probe` publishes bench.probe until it has one."""

    def __init__(self, socket: Path, timeout: float) -> None:
        self.ready = SPAWN.Event()
        self.results = SPAWN.Queue()
        self.process = SPAWN.Process(
            target=reader_process, args=(str(socket), "bench.>", self.ready, self.results, timeout), daemon=True
        )
        self.process.start()
        self.timeout = timeout

    async def until_ready(self, probe: Any) -> None:
        deadline = time.perf_counter() + 30
        while not self.ready.is_set():
            if time.perf_counter() > deadline or not self.process.is_alive():
                raise RuntimeError("the SSE client never received a probe event")
            await probe()
            await asyncio.sleep(0.05)

    async def result(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        report: dict[str, Any] = await loop.run_in_executor(None, self.results.get, True, self.timeout + 30)
        await loop.run_in_executor(None, self.process.join, 10)
        return report


def stream_figures(got: dict[str, Any], published: int, publish_s: float, done_at: float) -> dict[str, Any]:
    span = got["last"] - got["first"]
    end_at = got["end_at"]
    kept_up = got["received"] == published and got["lost"] == 0 and end_at is not None and end_at - done_at < 1.0
    return {
        "published": published,
        "published_per_s": round(published / publish_s) if publish_s else None,
        "received": got["received"],
        "received_per_s": round(got["received"] / span) if span > 0 else None,
        "lost": got["lost"],
        "lost_notices": got["lost_notices"],
        "lag_p50_ms": got["lag_p50_ms"],
        "lag_p99_ms": got["lag_p99_ms"],
        "lag_max_ms": got["lag_max_ms"],
        "end_after_last_publish_ms": round((end_at - done_at) * 1000, 1) if end_at is not None else None,
        "kept_up": kept_up,
    }


async def bench_events_via_capsule(server: Server, seconds: float) -> dict[str, Any]:
    """The `bench` capsule publishing through its airlock at 10,000 attempts/s (rate-limited)."""
    async with Client(server.socket, timeout=CALL_TIMEOUT_S) as client:
        reader = Reader(server.socket, seconds + 20)
        await reader.until_ready(lambda: client.call("bench", "probe", b"{}"))
        await asyncio.sleep(1.2)  # the probes used some of the burst: start with a full bucket
        calls = round(seconds * EVENT_RATE / PER_CALL)
        accepted = late = 0
        started = time.perf_counter()
        for i in range(calls):
            pause = started + i * PER_CALL / EVENT_RATE - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            elif pause < -0.05:
                late += 1
            output, _ = await client.call("bench", "burst", b"{}")
            accepted += int.from_bytes(output[:8], "little")
        publish_s = time.perf_counter() - started
        done_at = time.time()
        while int.from_bytes((await client.call("bench", "end", b"{}"))[0][:8], "little") == 0:
            await asyncio.sleep(0.002)  # the rate limit refused it: a token comes every 1 ms
        got = await reader.result()
    figures = stream_figures(got, accepted, publish_s, done_at)
    return {
        "attempted": calls * PER_CALL,
        "attempted_per_s": round(calls * PER_CALL / publish_s),
        "accepted": accepted,
        "accepted_per_s": round(accepted / publish_s),
        "refused_by_rate_limit": calls * PER_CALL - accepted,
        "late_calls": late,
        **figures,
    }


async def paced_publish(orchestrator: Orchestrator, rate: int, seconds: float) -> tuple[int, float]:
    """Publish `rate` events/s on bench.tick from the event loop for `seconds`: (count, seconds)."""
    bus = orchestrator.bus
    total = round(rate * seconds)
    payload = {"n": 1}
    sent = 0
    started = time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            bus.publish("bench.tick", payload, source="bench")
            sent += 1
        await asyncio.sleep(0.001)
    return sent, time.perf_counter() - started


async def bench_events_in_process(config: Path, plan: list[tuple[int, int]], seconds: float) -> dict[str, Any]:
    """For each (rate, rounds) of `plan`: `rounds` runs of `seconds` publishing at `rate`/s."""
    orchestrator = Orchestrator(config, watch=False, environ={})
    await orchestrator.start()
    assert orchestrator.desired is not None
    server = ControlServer(orchestrator, state_dir=orchestrator.desired.config.state_dir)
    await server.start()
    report: dict[str, Any] = {}
    try:
        for rate, rounds in plan:
            runs = []
            for _ in range(rounds):
                reader = Reader(server.path, seconds + 20)
                await reader.until_ready(lambda: _probe(orchestrator))
                await asyncio.sleep(0.1)
                published, publish_s = await paced_publish(orchestrator, rate, seconds)
                done_at = time.time()
                orchestrator.bus.publish("bench.end", None, source="bench")
                runs.append(stream_figures(await reader.result(), published, publish_s, done_at))
            report[f"rate_{rate}"] = {
                "target_per_s": rate,
                "rounds": rounds,
                "published_per_s": median([r["published_per_s"] for r in runs], 0),
                "received_per_s": median([r["received_per_s"] for r in runs], 0),
                "received": sum(r["received"] for r in runs),
                "published": sum(r["published"] for r in runs),
                "lost": sum(r["lost"] for r in runs),
                "lost_notices": sum(r["lost_notices"] for r in runs),
                "lag_p50_ms": median([r["lag_p50_ms"] for r in runs], 3),
                "lag_p99_ms": median([r["lag_p99_ms"] for r in runs], 3),
                "lag_max_ms": max((r["lag_max_ms"] or 0.0) for r in runs),
                "end_after_last_publish_ms": median([r["end_after_last_publish_ms"] for r in runs]),
                "kept_up": all(r["kept_up"] for r in runs),
            }
    finally:
        await server.stop()
        await orchestrator.stop()
    return report


async def _probe(orchestrator: Orchestrator) -> None:
    orchestrator.bus.publish("bench.probe", None, source="bench")


# -- main ----------------------------------------------------------------------------------
async def run(rounds: int, quick: bool, profile: Path | None) -> dict[str, Any]:
    seconds = 0.75 if quick else 2.0
    with tempfile.TemporaryDirectory(prefix="orch-api-") as tmp:
        base = Path(tmp)
        config = write_deployment(base)
        with ProcessPoolExecutor(max_workers=2, mp_context=SPAWN) as pool:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(pool, warm_process) for _ in range(2)))
            server = Server(base, config, profile)
            try:
                ready_s = await server.ready()
                here, apart, increment_check = await bench_tool_calls(server, rounds, seconds, pool)
                via_capsule = await bench_events_via_capsule(server, 1.5 if quick else 3.0)
            finally:
                exit_code = server.stop()
        plan = [(EVENT_RATE, 1)] if quick else [(EVENT_RATE, min(rounds, 3)), (2 * EVENT_RATE, 1), (4 * EVENT_RATE, 1)]
        in_process = await bench_events_in_process(config, plan, 1.5 if quick else 3.0)
    targets: dict[str, bool] = {}
    for label, figures in here.items():
        targets[f"{label}_ge_2000_calls_per_s"] = figures["ok_calls_per_s"] >= 2000 and figures["failures"] == 0
        targets[f"{label}_p99_lt_20ms"] = figures["p99_ms"] is not None and figures["p99_ms"] < 20
    targets["events_keep_up_10000_per_s"] = bool(in_process[f"rate_{EVENT_RATE}"]["kept_up"])
    return {
        "rounds": rounds,
        "quick": quick,
        "seconds_per_run": seconds,
        "cpus": os.cpu_count(),
        "server_ready_s": round(ready_s, 3),
        "server_exit_code": exit_code,
        "tool_calls": here,
        "tool_calls_2_load_processes": apart,
        "increment_count_check": increment_check,
        "events": {"in_process": in_process, "via_capsule": via_capsule},
        "targets_met": targets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="shorter runs, 2 rounds (smoke run)")
    parser.add_argument("--server-profile", type=Path, help="run `orch up` under cProfile, writing this file")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    profile = args.server_profile.absolute() if args.server_profile else None
    with contextlib.redirect_stdout(sys.stderr):  # nothing but the report on stdout
        report = asyncio.run(run(rounds, args.quick, profile))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
