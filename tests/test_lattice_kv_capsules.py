"""The example counter capsule on the lattice KV, end to end, on real nats-servers: hosts
in one process and in several OS processes incrementing one count concurrently, with API
writes racing them; a failed call; SIGKILL of a host that was writing; SIGKILL of the
stream leader of a 3-node cluster with 3 replicas.

Serializable means: every acknowledged increment answered a count that no other
increment answered, the counts run on one by one from each value an API write set, and
the stored count is the last of them. Durable means: no count that was acknowledged is
ever missing from the store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule.bus import EventBus
from orchestrator.engine import WasmEngine
from orchestrator.errors import CapabilityDenied, OrchestratorError
from orchestrator.lattice.kvstore import JetStreamKV
from tests.conftest import CAPSULES, REPO
from tests.natsserver import NatsServers, wait_for
from tests.test_lattice_kv import OpenHost, opening_hosts


@pytest.fixture
async def open_hosts() -> AsyncIterator[OpenHost]:
    async with opening_hosts() as open_one:
        yield open_one


async def counter_on(kv: JetStreamKV, engine: WasmEngine, bus: EventBus, workspace: Path, **options: Any) -> Capsule:
    return await Capsule.load(CAPSULES / "counter", engine=engine, bus=bus, store=kv, workspace=workspace, **options)


def count_of(output: bytes) -> int:
    return int(json.loads(output)["count"])


def assert_counted_on(answered: list[int], bases: list[int]) -> None:
    """Each answer is unique, and the answers after each base run on from it one by one."""
    assert len(answered) == len(set(answered))
    tops = [*bases[1:], 10**15]
    for low, high in zip(bases, tops, strict=True):
        run = sorted(a for a in answered if low < a < high)
        assert run == list(range(low + 1, low + 1 + len(run))), low


async def test_two_hosts_in_one_process_lose_no_increment(
    nats_server: NatsServers, engine: WasmEngine, open_hosts: OpenHost
) -> None:
    a, b = await open_hosts(nats_server.urls), await open_hosts(nats_server.urls)
    bus_a, bus_b = EventBus(), EventBus()
    events = [bus.subscribe("counter.changed", queue_size=10_000) for bus in (bus_a, bus_b)]
    with tempfile.TemporaryDirectory() as workspace:
        on_a = await counter_on(a, engine, bus_a, Path(workspace), instances=2)
        on_b = await counter_on(b, engine, bus_b, Path(workspace), instances=2)
        answered: list[int] = []

        async def caller(counter: Capsule) -> None:
            for _ in range(15):
                answered.append(count_of((await counter.call_tool("increment", {})).output))

        await asyncio.gather(*(caller(on_a if i % 2 else on_b) for i in range(16)))
        total = 16 * 15
        assert sorted(answered) == list(range(1, total + 1))  # each count answered exactly once
        assert await a.get("counter", "count") == str(total).encode()
        assert count_of((await on_b.call_tool("get", {})).output) == total
        published = sorted(e.payload["count"] for sub in events for e in sub.drain())
        assert published == list(range(1, total + 1))  # one event per acknowledged call, never per attempt
        assert on_a.errors == on_b.errors == 0
        assert on_a.conflicts + on_b.conflicts > 0  # the hosts did race
        await on_a.close()
        await on_b.close()
    bus_a.close()
    bus_b.close()


async def test_a_failed_call_leaves_nothing_on_any_host(
    nats_server: NatsServers, engine: WasmEngine, tmp_path: Path, open_hosts: OpenHost
) -> None:
    folder = tmp_path / "ungranted"
    shutil.copytree(CAPSULES / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
    manifest = folder / "Capsule.toml"
    manifest.write_text(manifest.read_text().replace('ipc_publish = ["counter.*"]', 'ipc_publish = ["other.*"]'))
    a, b = await open_hosts(nats_server.urls), await open_hosts(nats_server.urls)
    bus = EventBus()
    counter = await Capsule.load(folder, engine=engine, bus=bus, store=a, workspace=tmp_path)
    with pytest.raises(CapabilityDenied, match=r"capability denied: ipc_publish counter\.changed"):
        await counter.call_tool("increment", {})  # wrote count, then published outside its grant
    assert await b.get("counter", "count") is None and await b.capsules() == []
    assert a.stats["batches"] == 0  # nothing was ever sent
    await counter.close()
    bus.close()


# ---- hosts in other OS processes --------------------------------------------------------------
class Worker:
    """A `tests.lattice_kv_worker` process and what it printed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.answered: list[int] = []
        self.errors: list[str] = []
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, urls: str, *args: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.lattice_kv_worker",
            urls,
            "--lattice",
            "t",  # as open_host
            *args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode().strip()
            if line == "ready":
                self.ready.set()
            elif line.startswith("ok "):
                self.answered.append(int(line[3:]))
            elif line.startswith("error "):
                self.errors.append(line)
            elif line.startswith("done"):
                self.finished.set()
        self.finished.set()

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        await worker.close()


async def test_hosts_in_several_processes_with_api_writes_racing_lose_no_increment(
    nats_server: NatsServers, workers: list[Worker], open_hosts: OpenHost
) -> None:
    """Each API write sets `count` to a value the calls cannot reach (k * 10**6); the next
    one waits until a call has counted on from it."""
    for _ in range(3):
        workers.append(await Worker.start(nats_server.urls, "--calls", "150", "--callers", "6"))
    api = await open_hosts(nats_server.urls)
    for worker in workers:
        await wait_for(worker.ready.is_set, "the worker's capsule", 60)

    def answered() -> list[int]:
        return [count for worker in workers for count in worker.answered]

    bases = [0]
    for k in (1, 2, 3):
        await wait_for(lambda k=k: len(answered()) >= 60 * k, "more increments", 60)
        await api.set("counter", "count", str(k * 10**6).encode())
        bases.append(k * 10**6)
        await wait_for(lambda k=k: k * 10**6 + 1 in answered(), f"an increment from {k * 10**6}")
    for worker in workers:
        await wait_for(worker.finished.is_set, "the worker to finish its calls", 90)
        assert worker.errors == [] and await worker.process.wait() == 0
    counts = answered()
    assert len(counts) == 3 * 150
    assert_counted_on(counts, bases)
    assert await api.get("counter", "count") == str(max(counts)).encode()  # the last answer is what is stored
    assert max(counts) > 3 * 10**6


async def test_no_acknowledged_increment_is_lost_when_a_writing_host_is_killed(
    nats_server: NatsServers, workers: list[Worker], open_hosts: OpenHost
) -> None:
    callers = 8
    worker = await Worker.start(nats_server.urls, "--calls", "0", "--callers", str(callers))
    workers.append(worker)
    await wait_for(lambda: len(worker.answered) >= 80, "acknowledged increments", 60)
    worker.process.kill()  # SIGKILL, mid-write
    await worker.process.wait()
    await worker.finished.wait()
    acknowledged = worker.answered
    kv = await open_hosts(nats_server.urls)
    stored = int(await kv.get("counter", "count") or b"0")
    assert len(set(acknowledged)) == len(acknowledged)
    assert max(acknowledged) <= stored  # every acknowledged increment is stored
    assert len(acknowledged) <= stored <= len(acknowledged) + callers  # at most the calls in flight were unanswered
    assert sorted(acknowledged)[: len(acknowledged) - callers] == list(range(1, len(acknowledged) - callers + 1))


# ---- a 3-node cluster losing its stream leader ------------------------------------------------
async def test_writes_resume_with_none_lost_when_the_stream_leader_of_a_3_node_cluster_is_killed(
    nats_cluster: NatsServers, engine: WasmEngine, tmp_path: Path, open_hosts: OpenHost
) -> None:
    kv = await open_hosts(nats_cluster.urls, replicas=3)
    bus = EventBus()
    counter = await counter_on(kv, engine, bus, tmp_path, instances=2)
    answered: list[int] = []
    failures: list[str] = []
    running = True

    async def caller() -> None:
        while running:
            try:
                answered.append(count_of((await counter.call_tool("increment", {})).output))
            except OrchestratorError as error:
                failures.append(f"{type(error).__name__}: {error}")

    callers = [asyncio.create_task(caller()) for _ in range(8)]
    try:
        await wait_for(lambda: len(answered) >= 100, "increments before the kill", 60)
        info = await kv.lattice.js.stream_info(kv.subjects.stream)
        assert info.cluster is not None and info.cluster.leader
        leader = next(node for node in nats_cluster.nodes if node.name == info.cluster.leader)
        leader.kill()
        before = len(answered)
        await wait_for(lambda: len(answered) >= before + 100, "increments after the leader died", 90)
    finally:
        running = False
        await asyncio.gather(*callers)
    assert failures == []
    stored = int(await kv.get("counter", "count") or b"0")
    assert sorted(answered) == list(range(1, stored + 1))  # nothing acknowledged was lost, nothing doubled
    assert kv.stats["retries"] + kv.stats["unknown"] > 0  # it did wait for the election
    await counter.close()
    bus.close()
