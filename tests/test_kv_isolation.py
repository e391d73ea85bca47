"""KV isolation: tool calls are serializable (optimistic, validated when staged).

Store level, with `CallKV` views on worker threads: a call whose read key changed before it
staged conflicts and stages nothing; key listings conflict with a key added or removed
under them; disjoint calls do not conflict; a read-only call sees no skew and waits for the
uncommitted data it read.

End to end, with the real counter capsule (its `increment` reads `count`, adds, writes it
back) through `Capsule.call_tool` on real wasm: N acknowledged increments from 16
concurrent callers count exactly N, with 1, 2 and 4 instances, each count is answered once,
and each `counter.changed` event is published once; the same with API writes
(`KVStore.set`) racing the calls. A call made to conflict (an API write lands between its
read and its staging) runs again, reports both attempts' fuel, and its event reaches the
milestones interceptor exactly once; one that always conflicts runs alone, then gives up
having published nothing. A publish outside the grant still traps and is audited at once.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule.airlocks import AUDIT_TOPIC
from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.gate import RateLimiter
from orchestrator.capsule.kv import CallKV
from orchestrator.capsule.store import _LISTING, CONFLICT, Batch, KVConflict, KVStore, _stripe
from orchestrator.engine import WasmEngine
from orchestrator.errors import CapabilityDenied
from tests.conftest import CAPSULES


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KVStore]:
    kv = await KVStore.open(tmp_path / "kv.sqlite3")
    yield kv
    await kv.close()


async def on_thread(function: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def apart(capsule: str, *names: str) -> list[str]:
    """Keys `name-i` (one per name, the same i) in different version stripes, also apart from
    the capsule's listing stripe: two keys sharing a stripe conflict (a needless retry)."""
    for i in range(1000):
        keys = [f"{name}-{i}" for name in names]
        stripes = {_stripe((capsule, key)) for key in [*keys, _LISTING]}
        if len(stripes) == len(keys) + 1:
            return keys
    raise AssertionError("no keys apart")


# ---- the store ---------------------------------------------------------------------------------
async def test_a_changed_read_is_a_conflict_and_stages_nothing(store: KVStore) -> None:
    await store.set("a", "k", b"1")
    call = CallKV(store, "a")
    assert await on_thread(call.get, "k") == b"1"
    await store.set("a", "k", b"5")  # an API write between the call's read and its staging
    call.set("k", b"2")
    call.set("other", b"x")
    assert await on_thread(call.finish) is CONFLICT
    assert store.stats["conflicts"] == 1
    await store.commit()
    assert await store.get("a", "k") == b"5"
    assert await store.get("a", "other") is None


async def test_a_read_of_an_absent_key_conflicts_with_its_creation(store: KVStore) -> None:
    call = CallKV(store, "a")
    assert await on_thread(call.get, "lock") is None
    other = CallKV(store, "a")
    assert await on_thread(other.get, "lock") is None
    other.set("lock", b"other")
    assert isinstance(await on_thread(other.finish), Batch)  # first to stage wins
    call.set("lock", b"mine")
    assert await on_thread(call.finish) is CONFLICT
    await store.commit()
    assert await store.get("a", "lock") == b"other"


async def test_disjoint_calls_and_blind_writes_do_not_conflict(store: KVStore) -> None:
    x, y, z = apart("a", "x", "y", "z")
    first, second = CallKV(store, "a"), CallKV(store, "a")
    assert await on_thread(first.get, x) is None
    assert await on_thread(second.get, y) is None
    first.set(x, b"1")
    first.set(z, b"first")  # written without being read: nothing to validate
    second.set(y, b"2")
    second.set(z, b"second")
    assert isinstance(await on_thread(second.finish), Batch)
    assert isinstance(await on_thread(first.finish), Batch)
    await store.commit()
    assert [await store.get("a", key) for key in (x, y)] == [b"1", b"2"]
    assert await store.get("a", z) == b"first"  # staged last: the serial order is the staging order


async def test_a_blind_write_conflicts_with_a_call_that_read_the_key(store: KVStore) -> None:
    reader = CallKV(store, "a")
    assert await on_thread(reader.get, "k") is None
    blind = CallKV(store, "a")
    blind.set("k", b"blind")
    assert isinstance(await on_thread(blind.finish), Batch)
    reader.set("seen", b"nothing")
    assert await on_thread(reader.finish) is CONFLICT  # it read a value that is gone


async def test_a_listing_conflicts_with_a_key_added_or_removed_under_it(store: KVStore) -> None:
    await store.set("a", "job/1", b"x")
    for change in ("add", "remove"):
        call = CallKV(store, "a")
        listed = await on_thread(call.keys, "job/")
        call.set("count", str(len(listed)).encode())
        if change == "add":
            await store.set("a", "job/2", b"x")
        else:
            await store.delete("a", "job/1")
        assert await on_thread(call.finish) is CONFLICT, change
    assert await store.get("a", "count") is None


async def test_a_listing_does_not_conflict_with_a_value_changing(store: KVStore) -> None:
    (job,) = apart("a", "job/")
    await store.set("a", job, b"x")
    call = CallKV(store, "a")
    assert await on_thread(call.keys, "job/") == [job]
    await store.set("a", job, b"y")  # the same keys, another value
    call.set("count", b"1")
    assert isinstance(await on_thread(call.finish), Batch)


async def test_a_read_only_call_sees_no_skew(store: KVStore) -> None:
    await store.set("a", "from", b"10")
    await store.set("a", "to", b"0")
    reader = CallKV(store, "a")
    assert await on_thread(reader.get, "from") == b"10"
    mover = CallKV(store, "a")  # moves 10 from "from" to "to"
    assert await on_thread(mover.get, "from") == b"10"
    mover.set("from", b"0")
    mover.set("to", b"10")
    assert isinstance(await on_thread(mover.finish), Batch)
    assert await on_thread(reader.get, "to") == b"10"  # 10 + 10: a sum that never existed
    assert await on_thread(reader.finish) is CONFLICT  # so the call runs again


async def test_a_read_only_call_waits_for_the_data_it_read_to_commit(store: KVStore) -> None:
    writer = CallKV(store, "a")
    writer.set("k", b"new")
    ticket = await on_thread(writer.finish)
    reader = CallKV(store, "a")
    assert await on_thread(reader.get, "k") == b"new"  # staged, not committed
    waits_for = await on_thread(reader.finish)
    assert waits_for is ticket
    await store.commit(waits_for)
    assert await store.get("a", "k") == b"new"
    clean = CallKV(store, "a")
    assert await on_thread(clean.get, "k") == b"new"
    assert await on_thread(clean.finish) is None  # committed data: nothing to wait for


# ---- the counter capsule, end to end -----------------------------------------------------------
@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[tuple[WasmEngine, EventBus, KVStore, Path]]:
    store = await KVStore.open(tmp_path / "kv.sqlite3")
    bus = EventBus()
    with WasmEngine() as engine:
        yield engine, bus, store, tmp_path
    await store.close()
    bus.close()


async def load(host: tuple[WasmEngine, EventBus, KVStore, Path], name: str, **options: Any) -> Capsule:
    engine, bus, store, workspace = host
    return await Capsule.load(CAPSULES / name, engine=engine, bus=bus, store=store, workspace=workspace, **options)


async def increments(counter: Capsule, total: int, *, callers: int = 16) -> list[int]:
    """`total` increments by `callers` concurrent callers; the counts they were answered."""
    answered: list[int] = []

    async def caller(share: int) -> None:
        for _ in range(share):
            answered.append(json.loads((await counter.call_tool("increment", {})).output)["count"])

    await asyncio.gather(*(caller(total // callers) for _ in range(callers)))
    return answered


@pytest.mark.parametrize("instances", [1, 2, 4])
async def test_parallel_instances_lose_no_increment(
    host: tuple[WasmEngine, EventBus, KVStore, Path], instances: int
) -> None:
    _, bus, store, _ = host
    events = bus.subscribe("counter.changed", queue_size=10_000)
    counter = await load(host, "counter", instances=instances)
    total = 480
    answered = await increments(counter, total)
    assert sorted(answered) == list(range(1, total + 1))  # each count answered exactly once
    assert await store.get("counter", "count") == str(total).encode()
    assert json.loads((await counter.call_tool("get", {})).output) == {"count": total}
    published = [e.payload["count"] for e in events.drain()]
    assert sorted(published) == list(range(1, total + 1))  # one event per call, never per attempt
    assert counter.errors == 0 and counter.calls == total + 1
    await counter.close()


async def test_api_writes_racing_increments_are_never_lost(host: tuple[WasmEngine, EventBus, KVStore, Path]) -> None:
    """Each API write sets `count` to a value calls cannot reach (k * 10**6); the next one
    waits until a call has counted on from it. Serializable means every call's answer is
    its predecessor + 1, with no answer twice, and every API value taken up."""
    _, _, store, _ = host
    counter = await load(host, "counter", instances=4)
    rounds = 12
    answered: list[int] = []
    progress = asyncio.Condition()
    writing = True

    async def caller() -> None:
        calls = 0
        while writing or calls < 30:  # at least 30 calls each, and until the writes are done
            count = json.loads((await counter.call_tool("increment", {})).output)["count"]
            calls += 1
            async with progress:
                answered.append(count)
                progress.notify_all()

    async def writer() -> None:
        for k in range(1, rounds + 1):
            await store.set("counter", "count", str(k * 10**6).encode())
            async with progress:
                await progress.wait_for(lambda k=k: k * 10**6 + 1 in answered)  # type: ignore[misc]

    async with asyncio.timeout(90):
        callers = [asyncio.create_task(caller()) for _ in range(16)]
        try:
            await writer()
        finally:
            writing = False
        await asyncio.gather(*callers)
    assert len(answered) == len(set(answered)) == counter.calls >= 480
    bases = [0] + [k * 10**6 for k in range(1, rounds + 1)]
    for low, high in zip(bases, [*bases[1:], 10**12], strict=True):
        run = sorted(a for a in answered if low < a < high)
        assert run == list(range(low + 1, low + 1 + len(run))), low  # counted on, one by one
    last = max(answered)
    assert last > rounds * 10**6  # the last API write was counted on too
    assert await store.get("counter", "count") == str(last).encode()
    await counter.close()


class RacingClock:
    """The publish rate limiter's clock, which the counter's `increment` consults after it
    read and wrote `count`: armed, it first makes an API write to `count` (so that call
    conflicts), from the call's worker thread."""

    def __init__(self, store: KVStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.loop = store, loop
        self.armed = False
        self.fired = 0

    def __call__(self) -> float:
        if self.armed and threading.current_thread() is not threading.main_thread():
            self.armed = False
            self.fired += 1
            write = self.store.set("counter", "count", b"100")
            asyncio.run_coroutine_threadsafe(write, self.loop).result(30)
        return time.monotonic()


async def test_a_conflicted_call_runs_again_and_its_event_is_delivered_once(
    host: tuple[WasmEngine, EventBus, KVStore, Path],
) -> None:
    _, bus, store, _ = host
    clock = RacingClock(store, asyncio.get_running_loop())
    milestones = await load(host, "milestones")
    counter = await load(host, "counter", rate=RateLimiter(clock=clock))
    plain = await counter.call_tool("increment", {"by": 1})  # count 1, no conflict
    assert plain.attempts == 1
    clock.armed = True
    raced = await counter.call_tool("increment", {"by": 1})
    assert clock.fired == 1
    assert json.loads(raced.output) == {"count": 101}  # the re-run read the API's 100
    assert raced.attempts == 2 and counter.conflicts == 1
    assert raced.fuel_used > 1.5 * plain.fuel_used  # both attempts' fuel
    await milestones.caught_up(bus.last_seq)
    assert [e.payload for e in bus.history("counter.changed")] == [{"count": 1}, {"count": 101}]
    assert json.loads((await milestones.call_tool("status", {})).output) == {"last": 101, "seen": 2}
    assert await store.get("counter", "count") == b"101"
    await counter.close()
    await milestones.close()


async def test_a_call_that_keeps_conflicting_runs_alone_then_gives_up(
    host: tuple[WasmEngine, EventBus, KVStore, Path],
) -> None:
    from orchestrator.capsule.capsule import MAX_ATTEMPTS

    _, bus, store, _ = host

    class Always(RacingClock):
        def __call__(self) -> float:
            self.armed = True
            return super().__call__()

    clock = Always(store, asyncio.get_running_loop())
    counter = await load(host, "counter", rate=RateLimiter(clock=clock))
    with pytest.raises(KVConflict, match=f"changed under it {MAX_ATTEMPTS} times"):
        await counter.call_tool("increment", {})
    assert clock.fired == MAX_ATTEMPTS
    assert counter.conflicts == MAX_ATTEMPTS and counter.errors == 1
    assert bus.history("counter.changed") == []  # no attempt published anything
    assert await store.get("counter", "count") == b"100"
    await counter.close()


async def test_a_publish_denial_still_traps_and_is_audited_at_once(
    host: tuple[WasmEngine, EventBus, KVStore, Path], tmp_path: Path
) -> None:
    _, bus, store, _ = host
    folder = tmp_path / "ungranted"
    shutil.copytree(CAPSULES / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
    manifest = folder / "Capsule.toml"
    manifest.write_text(manifest.read_text().replace('ipc_publish = ["counter.*"]', 'ipc_publish = ["other.*"]'))
    engine, _, _, workspace = host
    counter = await Capsule.load(folder, engine=engine, bus=bus, store=store, workspace=workspace)
    with pytest.raises(CapabilityDenied, match=r"capability denied: ipc_publish counter\.changed"):
        await counter.call_tool("increment", {})  # wrote count, then published outside its grant
    assert [(e.payload["capability"], e.payload["target"]) for e in bus.history(AUDIT_TOPIC)] == [
        ("ipc_publish", "counter.changed")
    ]
    assert bus.history("counter.>") == []
    assert await store.get("counter", "count") is None  # the failed call's write was dropped
    await counter.close()
