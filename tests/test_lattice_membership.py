"""Heartbeats, host ids, labels, the scheduler's lease and the assignments entry, on a real
nats-server (orchestrator.lattice.membership, .lease, .scheduler).

TTL expiry is the server's: the tests that need it wait for it (a few seconds), polling.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.control.statedir import StateDirError
from orchestrator.errors import GateError
from orchestrator.lattice import lease
from orchestrator.lattice.artifacts import LatticeDataError
from orchestrator.lattice.connection import Lattice, LatticeAddress, LatticeError
from orchestrator.lattice.membership import (
    HOST_ID_FILE,
    HostInfo,
    beat,
    check_host_id,
    default_host_id,
    leave,
    live_hosts,
    parse_label,
    resolve_host_id,
    wait_event,
    wait_unused,
)
from orchestrator.lattice.scheduler import Assignments, Scheduler, read_assignments
from tests.natsserver import NatsServers, wait_for


@pytest.fixture
async def lattice(nats_server: NatsServers) -> AsyncIterator[Lattice]:
    connected = await Lattice.connect(LatticeAddress.parse(nats_server.urls))
    try:
        yield connected
    finally:
        await connected.close()


def test_host_ids_and_labels_are_checked_where_they_enter(tmp_path: Path) -> None:
    assert check_host_id("web-1_a") == "web-1_a"
    for bad in ("", "-lead", "a.b", "a b", "é", "x" * 65, "a>", "*"):
        with pytest.raises(GateError, match="host id"):
            check_host_id(bad)
    assert parse_label("zone=eu-west") == ("zone", "eu-west")
    assert parse_label("k8s.io/arch=") == ("k8s.io/arch", "")
    for bad, why in (("zone", "KEY=VALUE"), ("=eu", "label key"), ("a b=c", "label key"), ("k=\n", "printable")):
        with pytest.raises(GateError, match=why):
            parse_label(bad)
    assert check_host_id(default_host_id("abc123")).endswith("-abc123")


def test_a_host_keeps_its_id_in_its_state_dir(tmp_path: Path) -> None:
    made = resolve_host_id(tmp_path, None)
    assert resolve_host_id(tmp_path, None) == made
    assert resolve_host_id(tmp_path, "given") == "given"
    (tmp_path / HOST_ID_FILE).write_text("not an id!\n")
    with pytest.raises(StateDirError, match="remove the file"):
        resolve_host_id(tmp_path, None)
    (tmp_path / HOST_ID_FILE).unlink()
    os.mkfifo(tmp_path / HOST_ID_FILE)  # never blocks: not a regular file
    with pytest.raises(StateDirError, match=HOST_ID_FILE):
        resolve_host_id(tmp_path, None)


async def test_heartbeats_list_live_hosts_and_expire_by_themselves(lattice: Lattice) -> None:
    await beat(lattice, HostInfo("a", {"zone": "eu"}, started_ms=1))
    await beat(lattice, HostInfo("b", draining=True))
    hosts, bad = await live_hosts(lattice)
    assert set(hosts) == {"a", "b"} and bad == {}
    assert dict(hosts["a"].labels) == {"zone": "eu"} and hosts["b"].draining
    await leave(lattice, "b")
    assert set((await live_hosts(lattice))[0]) == {"a"}

    async def expired() -> bool:
        return not (await live_hosts(lattice))[0]

    await wait_for(expired, "the heartbeat's TTL to expire", deadline=15)


async def test_values_that_are_not_heartbeats_are_reported_not_trusted(lattice: Lattice) -> None:
    bucket = await lattice.bucket(lattice.names.hosts, history=1)
    await bucket.put("x", b"\xff not json")
    await bucket.put("y", json.dumps({"id": "someone-else"}).encode())
    await bucket.put("z", json.dumps({"id": "z", "labels": {"bad key": "v"}}).encode())
    await bucket.put("w", json.dumps({"id": "w", "labels": {}, "draining": "yes"}).encode())
    await bucket.put("v", json.dumps({"id": "v", "labels": {"k": 1}}).encode())
    hosts, bad = await live_hosts(lattice)
    assert hosts == {} and set(bad) == {"v", "w", "x", "y", "z"}
    assert all(why.startswith("not a heartbeat") for why in bad.values())


async def test_a_host_id_in_use_by_a_live_host_is_refused(lattice: Lattice) -> None:
    other = HostInfo("twin", hostname="elsewhere", pid=1)
    await beat(lattice, other)
    me = HostInfo("twin", hostname="here", pid=2)

    async def keep_beating() -> None:
        while True:
            await beat(lattice, other)
            await asyncio.sleep(0.5)

    beating = asyncio.get_running_loop().create_task(keep_beating())
    try:
        with pytest.raises(LatticeError, match=r"host id twin is in use by a live host \(pid 1 on elsewhere\)"):
            await wait_unused(lattice, "twin", me=me)
        await wait_unused(lattice, "twin", me=other)  # its own heartbeat: fine
    finally:
        beating.cancel()
    await wait_unused(lattice, "twin", me=me)  # once the other stops beating, its key expires


async def test_the_lease_has_one_holder_and_passes_on_when_it_expires(lattice: Lattice) -> None:
    held = await lease.acquire(lattice, "a")
    assert held is not None and await lease.holder(lattice) == "a"
    assert await lease.acquire(lattice, "b") is None
    renewed = await lease.renew(lattice, "a", held)
    assert renewed is not None and renewed.revision > held.revision
    assert await lease.renew(lattice, "a", held) is None  # a stale revision: lost
    await lease.release(lattice, renewed)
    assert await lease.holder(lattice) is None
    taken = await lease.acquire(lattice, "b")
    assert taken is not None and await lease.holder(lattice) == "b"

    async def expired() -> bool:
        return await lease.acquire(lattice, "c") is not None

    await wait_for(expired, "b's lease to expire", deadline=15)
    assert await lease.holder(lattice) == "c"
    assert await lease.renew(lattice, "b", taken) is None


async def test_racing_for_the_lease_exactly_one_wins(lattice: Lattice) -> None:
    results = await asyncio.gather(*(lease.acquire(lattice, f"h{i}") for i in range(8)))
    assert sum(r is not None for r in results) == 1


async def test_the_lease_holder_places_and_a_stale_holder_writes_nothing(lattice: Lattice) -> None:
    await beat(lattice, HostInfo("a"))
    await beat(lattice, HostInfo("b"))
    first = Scheduler(lattice=lattice, host_id="a")
    second = Scheduler(lattice=lattice, host_id="b")
    await first.turn()
    await second.turn()
    assert first.holding and not second.holding
    revision, stored = await read_assignments(lattice)
    assert stored is not None and stored.deployments == {} and stored.by == "a"  # nothing applied yet
    assert first.held is not None
    await lease.release(lattice, first.held)  # a pause long enough to lose the lease
    await second.turn()
    assert second.holding
    first.held = lease.Held(first.held.revision, 0)  # it still believes it holds the lease
    first._renewed = 0.0  # and that it is time to renew
    await first.turn()
    assert not first.holding
    assert (await read_assignments(lattice))[0] == revision  # nothing written by the stale holder
    await second.stop()
    assert await lease.holder(lattice) is None


def test_malformed_assignments_are_refused() -> None:
    good = Assignments(0, {"x": ("a",)}, {"y": "why"}, "a", 1, 2)
    assert Assignments.parse(good.to_bytes(), revision=5).deployments == {"x": ("a",)}
    for bad in (
        b"nope",
        b"[]",
        json.dumps({"format": 2}).encode(),
        json.dumps({"format": 1, "deployments": {"x": "a"}, "problems": {}}).encode(),
        json.dumps({"format": 1, "deployments": {"x": [1]}, "problems": {}}).encode(),
        json.dumps({"format": 1, "deployments": [], "problems": {}}).encode(),
        json.dumps({"format": 1, "deployments": {}, "problems": {}, "at_ms": "now"}).encode(),
    ):
        with pytest.raises(LatticeDataError, match="the scheduler rewrites them"):
            Assignments.parse(bad, revision=1)


async def test_malformed_stored_assignments_are_rewritten(lattice: Lattice) -> None:
    bucket = await lattice.bucket(lattice.names.assignments, history=16)
    await bucket.put("placement", b"garbage")
    await beat(lattice, HostInfo("a"))
    scheduler = Scheduler(lattice=lattice, host_id="a")
    await scheduler.turn()
    _, stored = await read_assignments(lattice)
    assert stored is not None and stored.by == "a"
    await scheduler.stop()


async def test_a_loop_waiting_for_an_event_always_ends_when_cancelled() -> None:
    event = asyncio.Event()
    turns = 0

    async def loop() -> None:  # the shape of the host's loops
        nonlocal turns
        while True:
            await wait_event(event, 10)
            event.clear()
            turns += 1

    task = asyncio.get_running_loop().create_task(loop())
    while not event._waiters:  # the loop is waiting
        await asyncio.sleep(0.01)
    event.set()  # the event and the cancellation arrive together (asyncio.wait_for on 3.11 loses it)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled() and turns == 0
    assert await wait_event(asyncio.Event(), 0.01) is False
