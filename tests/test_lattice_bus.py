"""The capsules' bus over the lattice, on a real nats-server with real capsules: several
Lattice connections, each with its own local bus, KV store and capsules, stand for hosts.

Covered: interceptors of a deployment running on two hosts handle each event exactly once
(counted by the guests themselves and by event identity); events published by capsules on
different hosts reach a lattice subscriber, with history; a version swap on one host while
events flow loses and repeats nothing; a drained host hands the deployment's events to the
other; partly overlapping patterns never deliver an event twice; hostile messages on bus
subjects are refused and counted; a slow reader is told what it lost; publishing from a
worker thread; an event too large for the server stays local and is counted.

Waits are on counts and `caught_up`, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capsule import Capsule, KVStore
from orchestrator.capsule.bus import EventBus
from orchestrator.engine import WasmEngine
from orchestrator.errors import GateError
from orchestrator.lattice.bus import DeploymentBus, LatticeBus, LatticeEvent, events, nats_patterns, patterns_overlap
from orchestrator.lattice.connection import Lattice, LatticeAddress, barrier
from orchestrator.lattice.history import stream_name
from tests.natsserver import NatsServers, wait_for

REPO = Path(__file__).resolve().parent.parent
LATTICE = "bus"


class Host:
    """One host: a lattice connection, a local bus, the lattice bus, a KV store, capsules."""

    def __init__(self, host_id: str, lattice: Lattice, root: Path, engine: WasmEngine, store: KVStore) -> None:
        self.id, self.lattice, self.root, self.engine, self.store = host_id, lattice, root, engine, store
        self.local = EventBus(history=10_000)
        self.bus = LatticeBus(lattice, self.local, host_id)
        self.capsules: dict[str, Capsule] = {}

    @classmethod
    async def start(cls, host_id: str, urls: str, root: Path, engine: WasmEngine) -> Host:
        root.mkdir(parents=True)
        for name in ("counter", "milestones"):
            shutil.copytree(REPO / "capsules" / name, root / name, ignore=shutil.ignore_patterns("assembly"))
        lattice = await Lattice.connect(LatticeAddress.parse(urls, name=LATTICE))
        host = cls(host_id, lattice, root, engine, await KVStore.open(root / "kv.sqlite3"))
        await host.bus.start()
        return host

    def deployment(self, name: str) -> DeploymentBus:
        return self.bus.for_deployment(name)

    async def launch(self, name: str, *, interceptors: bool = True) -> Capsule:
        capsule = await Capsule.load(
            self.root / name,
            engine=self.engine,
            bus=self.deployment(name),
            store=self.store,
            workspace=self.root,
            interceptors=interceptors,
        )
        self.capsules[name] = capsule
        await self.deployment(name).ready()
        return capsule

    async def call(self, name: str, tool: str, arguments: Any = None) -> Any:
        return json.loads((await self.capsules[name].call_tool(tool, arguments)).output)

    async def seen(self) -> int:
        return int((await self.call("milestones", "status"))["seen"])

    async def settled(self, name: str) -> None:
        """Everything NATS delivered so far is in the deployment's bus and handled."""
        deployment = self.deployment(name)
        await barrier(self.lattice.nc)
        await wait_for(lambda: deployment.pending == 0, f"{self.id}: NATS messages delivered")
        await self.capsules[name].caught_up(deployment.last_seq)

    def published(self, topic: str) -> list[tuple[str, int]]:
        return [(self.id, event.seq) for event in self.local.history(topic)]

    async def close(self) -> None:
        for capsule in self.capsules.values():
            await capsule.close()
        await self.bus.close()
        await self.store.close()
        await self.lattice.close()


@pytest.fixture
async def hosts(nats_server: NatsServers, tmp_path: Path, engine: WasmEngine) -> AsyncIterator[list[Host]]:
    made = [await Host.start(name, nats_server.urls, tmp_path / name, engine) for name in ("a", "b")]
    try:
        yield made
    finally:
        for host in made:
            await host.close()


@pytest.fixture
async def client(nats_server: NatsServers) -> AsyncIterator[Lattice]:
    lattice = await Lattice.connect(LatticeAddress.parse(nats_server.urls, name=LATTICE))
    try:
        yield lattice
    finally:
        await lattice.close()


async def stored(client: Lattice, count: int) -> None:
    """Until the history stream holds `count` events (the server stores them asynchronously)."""

    async def enough() -> bool:
        return (await client.js.stream_info(stream_name(client))).state.messages >= count

    await wait_for(enough, f"{count} events in the history stream")


def received(host: Host, name: str, topic: str) -> list[tuple[str, int]]:
    """(publishing host, its seq) of each event the deployment's bus on `host` received."""
    return [(e.host, e.origin_seq) for e in host.deployment(name).history(topic) if isinstance(e, LatticeEvent)]


# == once per deployment =========================================================================
async def test_interceptors_on_two_hosts_handle_each_event_once(hosts: list[Host]) -> None:
    for host in hosts:
        await host.launch("counter")
        await host.launch("milestones")
    total = 40
    for i in range(total):  # both hosts' counters publish counter.changed
        await hosts[i % 2].call("counter", "increment", {"by": 1})
    for host in hosts:
        await host.bus.flush()
    await wait_for(
        lambda: sum(len(received(h, "milestones", "counter.changed")) for h in hosts) >= total, "every event received"
    )
    for host in hosts:
        await host.settled("milestones")
    published = sorted(hosts[0].published("counter.changed") + hosts[1].published("counter.changed"))
    got = received(hosts[0], "milestones", "counter.changed") + received(hosts[1], "milestones", "counter.changed")
    assert len(published) == total and sorted(got) == published  # each exactly once, none lost
    assert all(received(h, "milestones", "counter.changed") for h in hosts)  # both hosts took a share
    seen = [await h.seen() for h in hosts]
    assert sum(seen) == total and all(seen)  # the guests themselves counted each event once
    assert hosts[0].deployment("milestones").duplicates == hosts[1].deployment("milestones").duplicates == 0


async def test_the_guest_sees_the_publishers_seq_and_timestamp(hosts: list[Host]) -> None:
    a, b = hosts
    deployment = b.deployment("watcher")
    subscription = deployment.subscribe("orders.>")
    await deployment.ready()
    sent = a.bus.publish("orders.new", {"id": 7}, source="shop", size=9)
    await a.bus.flush()
    event = await asyncio.wait_for(subscription.get(), 20)
    assert isinstance(event, LatticeEvent) and event.host == "a"
    assert (
        event.to_dict()
        == sent.to_dict()
        == {
            "topic": "orders.new",
            "payload": {"id": 7},
            "source": "shop",
            "seq": sent.seq,
            "timestamp_ms": sent.timestamp_ms,
        }
    )
    assert a.local.history("orders.>") == [sent]  # mirrored on the publishing host's own bus
    assert deployment.last_seq == event.seq == 1  # the deployment bus counts on its own
    subscription.close()


async def test_once_per_deployment_across_the_nodes_of_a_cluster(nats_cluster: NatsServers) -> None:
    urls = nats_cluster.urls.split(",")
    lattices = [await Lattice.connect(LatticeAddress.parse(url, name=LATTICE)) for url in urls]
    buses = [LatticeBus(lattice, EventBus(), f"h{i}") for i, lattice in enumerate(lattices)]
    try:
        for bus in buses:
            await bus.start()
        subscriptions = [bus.for_deployment("d").subscribe("work.*") for bus in buses[:2]]
        for bus in buses[:2]:
            await bus.for_deployment("d").ready()

        async def both_hosts_reached() -> bool:  # interest crosses the routes asynchronously
            buses[2].publish("work.probe", None, source="test")
            await buses[2].flush()
            return all(bus.for_deployment("d").received for bus in buses[:2])

        await wait_for(both_hosts_reached, "both hosts' subscriptions known on the third node")
        for i in range(60):
            buses[2].publish("work.item", {"i": i}, source="test")
        await buses[2].flush()

        def items() -> list[int]:
            return [e.payload["i"] for bus in buses[:2] for e in bus.for_deployment("d").history("work.item")]

        await wait_for(lambda: len(items()) >= 60, "every item received")
        for bus in buses[:2]:
            await barrier(bus.lattice.nc)
            await wait_for(lambda bus=bus: bus.for_deployment("d").pending == 0, "delivered")  # type: ignore[misc]
        assert sorted(items()) == list(range(60))  # each once, across the two hosts on two nodes
        assert sorted(e.payload["i"] for s in subscriptions for e in s.drain() if e.topic == "work.item") == list(
            range(60)
        )
    finally:
        for bus in buses:
            await bus.close()
        for lattice in lattices:
            await lattice.close()


# == events across hosts, and history ==============================================================
async def test_events_from_capsules_on_different_hosts_reach_a_subscriber(hosts: list[Host], client: Lattice) -> None:
    for host in hosts:
        await host.launch("counter")
    stream = events(client, "counter.>", history=0)
    assert await anext(stream) == {"live": True}
    await hosts[0].call("counter", "increment", {"by": 2})
    await hosts[1].call("counter", "increment", {"by": 5})
    live = [await asyncio.wait_for(anext(stream), 20) for _ in range(2)]
    await stream.aclose()
    await stored(client, 2)
    assert sorted((e["host"], e["payload"]["count"], e["source"], e["topic"]) for e in live) == [
        ("a", 2, "counter", "counter.changed"),
        ("b", 5, "counter", "counter.changed"),
    ]
    later = events(client, "counter.>", history=10)
    history = [await anext(later) for _ in range(3)]
    await later.aclose()
    assert history[-1] == {"live": True}
    assert sorted(history[:2], key=lambda e: e["host"]) == sorted(live, key=lambda e: e["host"])
    assert set(live[0]) == {"topic", "payload", "source", "seq", "timestamp_ms", "host"}


async def test_history_then_live_without_a_gap_or_a_repeat(hosts: list[Host], client: Lattice) -> None:
    a = hosts[0]
    for i in range(30):
        a.bus.publish(f"feed.{'even' if i % 2 == 0 else 'odd'}", {"i": i}, source="test")
    await a.bus.flush()
    await stored(client, 30)
    stream = events(client, "feed.even", history=5)
    first = [await anext(stream) for _ in range(6)]
    assert [e["payload"]["i"] for e in first[:5]] == [20, 22, 24, 26, 28] and first[5] == {"live": True}
    for i in range(30, 36):
        a.bus.publish(f"feed.{'even' if i % 2 == 0 else 'odd'}", {"i": i}, source="test")
    await a.bus.flush()
    live = [await asyncio.wait_for(anext(stream), 20) for _ in range(3)]
    await stream.aclose()
    assert [e["payload"]["i"] for e in live] == [30, 32, 34]
    await stored(client, 36)
    everything = events(client, ">", history=3)
    assert [(await anext(everything)).get("payload") for _ in range(3)] == [{"i": 33}, {"i": 34}, {"i": 35}]
    await everything.aclose()


async def test_a_slow_reader_is_told_what_it_lost(hosts: list[Host], client: Lattice) -> None:
    a = hosts[0]
    stream = events(client, "flood.>", queue_size=10)
    assert await anext(stream) == {"live": True}

    async def flood(start: int) -> None:
        for i in range(start, start + 100):
            a.bus.publish("flood.x", {"i": i}, source="test")
        await a.bus.flush()

    await flood(0)
    got: list[int] = []
    lost = 0
    while not got or got[-1] != 199:
        item = await asyncio.wait_for(anext(stream), 20)
        if "lost" in item:
            lost += item["lost"]["dropped"]
            assert item["lost"]["total"] == lost
            if lost < 100:  # the second flood overflows the queue while the reader holds this notice
                await flood(100)
                await barrier(client.nc)
        else:
            got.append(item["payload"]["i"])
    await stream.aclose()
    assert len(got) + lost == 200 and got == sorted(got)  # what was not shown was announced


async def test_events_refuse_malformed_patterns_and_history(client: Lattice) -> None:
    for pattern in ("a..b", "a.>.b", "", "a b"):
        with pytest.raises(GateError):
            await anext(events(client, pattern))
    for history in (-1, 10_001):
        with pytest.raises(GateError, match="history"):
            await anext(events(client, ">", history))


# == handover and drain ===========================================================================
async def test_a_version_swap_on_a_host_loses_and_repeats_nothing(hosts: list[Host]) -> None:
    a, b = hosts
    old = await a.launch("milestones")
    deployment = a.deployment("milestones")

    async def burst(start: int, count: int) -> None:
        for i in range(start, start + count):
            b.bus.publish("counter.changed", {"count": i}, source="counter")
        await b.bus.flush()

    await burst(1, 150)
    await old.caught_up(1)  # the swap comes after the old version has handled some events
    new = await Capsule.load(
        a.root / "milestones", engine=a.engine, bus=deployment, store=a.store, workspace=a.root, interceptors=False
    )
    handed_over = await old.stop_interceptors()  # as the reconciler swaps versions
    new.start_interceptors(after_seq=handed_over)
    a.capsules["milestones"] = new
    await old.close()
    await burst(151, 150)
    await wait_for(lambda: deployment.received >= 300, "every event received")
    await a.settled("milestones")
    assert await a.seen() == 300  # the KV is shared by both versions: every event counted once
    assert 1 <= handed_over < 300 and deployment.duplicates == 0


async def test_a_draining_host_hands_the_deployments_events_to_the_other(hosts: list[Host], client: Lattice) -> None:
    a, b = hosts
    for host in hosts:
        await host.launch("milestones")
    publisher = LatticeBus(client, EventBus(), "publisher")
    await publisher.start()
    try:
        for i in range(40):
            publisher.publish("counter.changed", {"count": i}, source="counter")
        await publisher.flush()
        await wait_for(
            lambda: sum(h.deployment("milestones").received for h in hosts) >= 40, "the first events received"
        )
        await a.deployment("milestones").stop_receiving()  # a's drain
        await a.settled("milestones")
        before = a.deployment("milestones").received
        for i in range(40, 80):
            publisher.publish("counter.changed", {"count": i}, source="counter")
        await publisher.flush()
        await wait_for(lambda: before + b.deployment("milestones").received >= 80, "the rest received by b")
        await b.settled("milestones")
        assert a.deployment("milestones").received == before  # nothing more went to a
        assert await a.seen() + await b.seen() == 80  # nothing lost, nothing twice
        assert a.deployment("milestones").patterns == []
    finally:
        await publisher.close()


# == patterns ======================================================================================
def test_patterns_that_overlap_become_one_subscription() -> None:
    assert patterns_overlap("a.*", "*.b") and patterns_overlap("a.>", "a.b.c") and patterns_overlap("*", "x")
    assert not patterns_overlap("a.>", "a") and not patterns_overlap("a.b", "a.c") and not patterns_overlap("a", "a.b")
    assert nats_patterns({"a.*", "*.b"}) == {">"}
    assert nats_patterns({"a.*", "a.>"}) == {"a.>"}
    assert nats_patterns({"a.b", "c.d", "e.>"}) == {"a.b", "c.d", "e.>"}


async def test_overlapping_patterns_on_two_hosts_deliver_each_event_once(hosts: list[Host], client: Lattice) -> None:
    subscriptions = []
    for host in hosts:
        deployment = host.deployment("both")
        subscriptions += [deployment.subscribe("a.*"), deployment.subscribe("*.b")]
        await deployment.ready()
        assert deployment.patterns == [">"]
    publisher = LatticeBus(client, EventBus(), "publisher")
    await publisher.start()
    try:
        for topic in ("a.b", "a.c", "c.b", "c.c", "a.b"):
            publisher.publish(topic, None, source="test")
        await publisher.flush()
        await wait_for(lambda: sum(h.deployment("both").received for h in hosts) >= 5, "every event received")
        for host in hosts:
            await barrier(host.lattice.nc)
            await wait_for(lambda host=host: host.deployment("both").pending == 0, "delivered")  # type: ignore[misc]
        topics = sorted(e.topic for s in subscriptions for e in s.drain())
        assert topics == ["a.b", "a.b", "a.b", "a.b", "a.c", "c.b"]  # two a.b events, each in both patterns' subs
        assert sum(h.deployment("both").received for h in hosts) == 5
    finally:
        await publisher.close()
        for subscription in subscriptions:
            subscription.close()


# == hostile input and limits =====================================================================
async def test_hostile_messages_on_bus_subjects_are_refused_and_counted(hosts: list[Host], client: Lattice) -> None:
    a = hosts[0]
    deployment = a.deployment("target")
    subscription = deployment.subscribe(">")
    await deployment.ready()
    names = client.names
    good = {"source": "s", "host": "h", "run": "r", "seq": 1, "timestamp_ms": 1, "payload": None}
    hostile = [
        b"",
        b"garbage \xff",
        b"[1, 2]",
        json.dumps({**good, "seq": -1}).encode(),
        json.dumps({**good, "seq": True}).encode(),
        json.dumps({**good, "source": 5}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "run"}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ]
    for data in hostile:
        await client.nc.publish(names.bus("x.y"), data)
    await client.nc.publish(names.bus(".".join(["t"] * 20)), json.dumps(good).encode())  # 20 tokens: not a topic
    await client.nc.publish(names.bus("x.fine"), json.dumps(good).encode())
    await barrier(client.nc)
    event = await asyncio.wait_for(subscription.get(), 20)
    await wait_for(lambda: deployment.rejected == len(hostile) + 1, "every hostile message refused")
    assert event.topic == "x.fine" and deployment.received == 1
    subscription.close()


async def test_a_publish_from_a_worker_thread_reaches_the_lattice(hosts: list[Host], client: Lattice) -> None:
    a = hosts[0]
    stream = events(client, "threads.>")
    assert await anext(stream) == {"live": True}
    await asyncio.to_thread(lambda: [a.bus.publish("threads.x", {"i": i}, source="t") for i in range(50)])
    got = [(await asyncio.wait_for(anext(stream), 20))["payload"]["i"] for _ in range(50)]
    await stream.aclose()
    assert got == list(range(50))  # in publish order


async def test_an_event_too_large_for_the_server_stays_local_and_is_counted(hosts: list[Host], client: Lattice) -> None:
    a = hosts[0]
    stream = events(client, "big.>")
    assert await anext(stream) == {"live": True}
    a.bus.publish("big.one", "x" * (9 << 20), source="t")  # over the server's 8 MB
    a.bus.publish("big.two", "small", source="t")
    assert (await asyncio.wait_for(anext(stream), 20))["topic"] == "big.two"
    await stream.aclose()
    assert a.bus.unsent == 1 and [e.topic for e in a.local.history("big.>")] == ["big.one", "big.two"]


async def test_a_deployment_name_nats_cannot_carry_is_refused(hosts: list[Host]) -> None:
    with pytest.raises(GateError, match="over the lattice's limit"):
        hosts[0].bus.for_deployment("é" * 600)
