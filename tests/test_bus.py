"""The event bus: ordering and seq, NATS pattern matching, history, bounded queues that drop
the oldest, publishers that never wait, threads, wake-ups, close, and the event's shape."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.capsule.bus import (
    BusError,
    Event,
    EventBus,
    Subscription,
    SubscriptionClosed,
)
from orchestrator.errors import OrchestratorError
from orchestrator.topics import MAX_TOPIC_BYTES


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


async def started(task: asyncio.Task[Any]) -> None:
    """Wait until a just-created task is parked on its first wait (its coroutine awaits a
    future), with a backstop of 10 s: an event, not a count of event-loop turns."""
    async with asyncio.timeout(10):
        while getattr(task, "_fut_waiter", None) is None and not task.done():
            await asyncio.sleep(0.001)
    assert not task.done()


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()


# ---------------------------------------------------------------- ordering, seq, shape


def test_seq_is_monotonic_and_delivery_in_order() -> None:
    bus = EventBus()
    assert bus.last_seq == 0
    with bus.subscribe() as sub:
        published = [bus.publish(f"t.{i % 3}", i) for i in range(50)]
        assert seqs(published) == list(range(1, 51))
        assert bus.last_seq == 50
        got = sub.drain()
    assert got == published
    assert [e.payload for e in got] == list(range(50))
    assert sub.drain() == []


def test_publish_returns_the_event_it_delivers() -> None:
    bus = EventBus(clock=lambda: 12.0)
    with bus.subscribe("a.b") as sub:
        event = bus.publish("a.b", {"x": 1}, source="hello")
        assert sub.get_nowait() is event
        assert sub.get_nowait() is None
    assert event == Event("a.b", {"x": 1}, "hello", 1, 12000)
    assert bus.publish("a.b").source == "orch"
    assert bus.publish("a.b").payload is None


def test_to_dict_shape_and_json() -> None:
    bus = EventBus(clock=lambda: 1.5)
    event = bus.publish("orch.capsule.hello.running", {"phase": "running", "n": [1, 2]}, source="orch")
    d = event.to_dict()
    assert d == {
        "topic": "orch.capsule.hello.running",
        "payload": {"phase": "running", "n": [1, 2]},
        "source": "orch",
        "seq": 1,
        "timestamp_ms": 1500,
    }
    assert list(d) == ["topic", "payload", "source", "seq", "timestamp_ms"]
    assert json.loads(json.dumps(d)) == d


def test_event_is_frozen() -> None:
    event = EventBus().publish("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 7  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


def test_payload_is_kept_as_given() -> None:
    bus = EventBus()

    class NotJson:
        pass

    payload: dict[str, Any] = {"items": [1, 2]}
    odd = NotJson()
    with bus.subscribe() as sub:
        event = bus.publish("a", payload)
        bus.publish("b", odd)
        payload["items"].append(3)  # visible everywhere: nothing was copied or serialised
        first, second = sub.drain()
    assert first.payload is payload is event.payload
    assert bus.history()[0].payload is payload
    assert first.payload == {"items": [1, 2, 3]}
    assert second.payload is odd


def test_clock_injection() -> None:
    now = [1000.0]
    bus = EventBus(clock=lambda: now[0])
    assert bus.publish("a").timestamp_ms == 1_000_000
    now[0] = 1000.0421
    assert bus.publish("a").timestamp_ms == 1_000_042
    now[0] = 5.0
    assert bus.publish("a").timestamp_ms == 5000


def test_default_clock_is_wall_clock() -> None:
    import time

    before = int(time.time() * 1000)
    stamp = EventBus().publish("a").timestamp_ms
    assert before <= stamp <= int(time.time() * 1000)


# ---------------------------------------------------------------- patterns

MATCHES = [
    (">", "a", True),
    (">", "a.b.c", True),
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("*.*", "a.b", True),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "a", False),
    ("a.>", "b.a", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    # prefix siblings: tokens are compared whole, never as string prefixes
    ("orch.capsule.>", "orch.capsules.x", False),
    ("orch.capsule.*", "orch.capsule.hello", True),
    ("orch.capsule", "orch.capsules", False),
    ("orch.capsules", "orch.capsule", False),
    ("orch.cap.>", "orch.capsule.hello", False),
    ("orch.capsule.hello.>", "orch.capsule.hello2.running", False),
    ("orch.capsule.*.running", "orch.capsule.hello.running", True),
    ("orch.capsule.*.running", "orch.capsule.hello.stopped", False),
    ("orch.audit.denied", "orch.audit.denied", True),
    ("orch.audit.denied", "orch.audit.denied.more", False),
    ("Orch.a", "orch.a", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_pattern_matching(pattern: str, topic: str, expected: bool) -> None:
    bus = EventBus()
    bus.publish(topic, "before")  # routed and cached before the subscription exists
    with bus.subscribe(pattern) as sub:
        bus.publish(topic, "live")
        assert [e.payload for e in sub.drain()] == (["live"] if expected else [])
    assert [e.payload for e in bus.history(pattern)] == (["before", "live"] if expected else [])


def test_routes_follow_subscribe_and_unsubscribe() -> None:
    bus = EventBus()
    first = bus.subscribe("a.*")
    bus.publish("a.b", 1)
    second = bus.subscribe("a.b")
    bus.publish("a.b", 2)
    first.close()
    bus.publish("a.b", 3)
    second.close()
    bus.publish("a.b", 4)
    assert [e.payload for e in first.drain()] == [1, 2]
    assert [e.payload for e in second.drain()] == [2, 3]


def test_same_subscription_gets_an_event_once() -> None:
    bus = EventBus()
    with bus.subscribe("a.>") as one, bus.subscribe("a.>") as two:
        bus.publish("a.b.c")
        assert len(one.drain()) == 1
        assert len(two.drain()) == 1


def test_many_distinct_topics_overflow_the_route_cache() -> None:
    bus = EventBus(history=0)
    with bus.subscribe("t.*.even") as even, bus.subscribe("t.>") as every:
        for i in range(5000):
            bus.publish(f"t.{i}.{'even' if i % 2 == 0 else 'odd'}", i)
        assert [e.payload for e in even.drain()] == list(range(0, 5000, 2))[-1024:]
        assert len(every.drain()) == 1024
        assert every.dropped == 5000 - 1024


BAD_EITHER = [
    ("", "empty"),
    ("a..b", "empty token at position 1"),
    (".a", "empty token at position 0"),
    ("a.", "empty token at position 1"),
    ("a b", "whitespace"),
    ("a.\tb", "whitespace"),
    ("a.b\x00", "control"),
    ("a.b\x90", "control"),
    ("a.\u2003b", "whitespace"),
    ("x" * (MAX_TOPIC_BYTES + 1), "257 bytes"),
    ("é" * 129, "258 bytes"),  # 129 characters, 258 bytes
    (".".join("a" * 17), "17 tokens"),
]
MISPLACED_WILDCARDS = [
    ("a.>.b", "'>' may only be the whole last token"),
    (">.a", "'>' may only be the whole last token"),
    ("a*", "'*' must be a whole token"),
    ("a.b*", "'*' must be a whole token"),
    ("a.*b.c", "'*' must be a whole token"),
    ("a.>>", "'>' may only be the whole last token"),
    ("*>", "'*' must be a whole token"),
]


@pytest.mark.parametrize(("pattern", "message"), BAD_EITHER + MISPLACED_WILDCARDS)
def test_malformed_patterns_are_rejected(pattern: str, message: str) -> None:
    bus = EventBus()
    with pytest.raises(BusError, match=re.escape(message)):
        bus.subscribe(pattern)
    with pytest.raises(BusError, match=re.escape(message)):
        bus.history(pattern)
    assert bus.subscribers == 0


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        *BAD_EITHER,
        *[(text, "belong in patterns") for text, _ in MISPLACED_WILDCARDS],
        (">", "contains a wildcard ('*' or '>'): wildcards belong in patterns"),
        ("a.*", "belong in patterns"),
        ("a.b>", "belong in patterns"),
        ("*a", "belong in patterns"),
    ],
)
def test_malformed_topics_are_rejected(topic: str, message: str) -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        with pytest.raises(BusError, match=re.escape(message)) as caught:
            bus.publish(topic)
        assert sub.drain() == []
    assert str(caught.value).startswith("topic ")
    assert bus.last_seq == 0
    assert bus.history() == []


def test_non_string_topics_and_patterns_are_rejected() -> None:
    bus = EventBus()
    with pytest.raises(BusError, match="must be a string, not list"):
        bus.publish(["a"])  # type: ignore[arg-type]
    with pytest.raises(BusError, match="must be a string, not int"):
        bus.publish(3)  # type: ignore[arg-type]
    with pytest.raises(BusError, match="must be a string, not bytes"):
        bus.subscribe(b"a")  # type: ignore[arg-type]
    assert bus.last_seq == 0


def test_limits_are_inclusive_and_errors_are_ours() -> None:
    bus = EventBus()
    longest = "x" * MAX_TOPIC_BYTES
    deepest = ".".join("a" * 16)
    with bus.subscribe(longest) as sub:
        bus.publish(longest)
        assert len(sub.drain()) == 1
    bus.publish(deepest)
    assert len(bus.history(deepest)) == 1
    assert len(bus.history(".".join("*" * 16))) == 1
    assert issubclass(BusError, OrchestratorError)
    assert issubclass(SubscriptionClosed, BusError)


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(BusError, match="queue_size"):
        EventBus(queue_size=0)
    with pytest.raises(BusError, match="history"):
        EventBus(history=-1)
    bus = EventBus()
    with pytest.raises(BusError, match="queue_size"):
        bus.subscribe(queue_size=0)
    with pytest.raises(BusError, match="history"):
        bus.subscribe(history=-1)
    with pytest.raises(BusError, match="limit"):
        bus.history(limit=-1)
    assert bus.subscribers == 0


# ---------------------------------------------------------------- history


def test_history_ring_keeps_the_latest() -> None:
    bus = EventBus(history=5)
    for i in range(8):
        bus.publish(f"t.{i}")
    assert seqs(bus.history()) == [4, 5, 6, 7, 8]
    assert seqs(bus.history(limit=2)) == [7, 8]
    assert seqs(bus.history(limit=0)) == []
    assert seqs(bus.history(limit=99)) == [4, 5, 6, 7, 8]
    assert EventBus(history=0).history() == []


def test_history_with_patterns_and_limits() -> None:
    bus = EventBus()
    for i in range(10):
        bus.publish(f"orch.capsule.c{i % 2}.running", i)
        bus.publish("orch.audit.denied", i)
    c0 = bus.history("orch.capsule.c0.*")
    assert [e.payload for e in c0] == [0, 2, 4, 6, 8]
    assert [e.payload for e in bus.history("orch.capsule.*.running", limit=3)] == [7, 8, 9]
    assert [e.payload for e in bus.history("orch.audit.>", limit=2)] == [8, 9]
    assert len(bus.history("orch.>")) == 20
    assert bus.history("orch.nothing.>") == []
    assert seqs(bus.history()) == list(range(1, 21))


def test_subscribe_history_prefills_matching_events() -> None:
    bus = EventBus()
    for i in range(10):
        bus.publish("a.x" if i % 2 else "b.x", i)
    with bus.subscribe("a.*", history=3) as sub:
        bus.publish("a.y", "live")
        bus.publish("b.y", "other")
        assert [e.payload for e in sub.drain()] == [5, 7, 9, "live"]
        assert sub.dropped == 0
    with bus.subscribe("a.*", history=100) as sub:
        assert [e.payload for e in sub.drain()] == [1, 3, 5, 7, 9, "live"]
    with bus.subscribe("a.*") as sub:
        assert sub.drain() == []


def test_subscribe_history_is_capped_by_the_queue() -> None:
    bus = EventBus()
    for i in range(10):
        bus.publish("a", i)
    with bus.subscribe(history=10, queue_size=4) as sub:
        assert [e.payload for e in sub.drain()] == [6, 7, 8, 9]
        assert sub.dropped == 0
        for i in range(5):
            bus.publish("a", 10 + i)
        assert sub.dropped == 1
        assert [e.payload for e in sub.drain()] == [11, 12, 13, 14]


# ---------------------------------------------------------------- bounded queues


def test_full_queue_drops_the_oldest_and_counts() -> None:
    bus = EventBus()
    with bus.subscribe(queue_size=3) as sub:
        for i in range(10):
            bus.publish("a", i)
        assert sub.dropped == 7
        assert [e.payload for e in sub.drain()] == [7, 8, 9]
        bus.publish("a", 10)
        bus.publish("a", 11)
        assert sub.dropped == 7
        assert sub.get_nowait() is not None
        for i in range(3):
            bus.publish("a", 12 + i)
        assert sub.dropped == 8
        assert [e.payload for e in sub.drain()] == [12, 13, 14]


def test_default_queue_size_comes_from_the_bus() -> None:
    bus = EventBus(queue_size=2)
    with bus.subscribe() as small, bus.subscribe(queue_size=5) as large:
        for i in range(6):
            bus.publish("a", i)
        assert (small.dropped, large.dropped) == (4, 1)


def test_stuck_subscriber_never_blocks_the_publisher() -> None:
    assert not inspect.iscoroutinefunction(EventBus.publish)
    n = 100_000
    bus = EventBus()
    stuck = bus.subscribe(queue_size=10)
    fast = bus.subscribe(queue_size=n)
    for i in range(n):
        event = bus.publish("orch.tick", i)
        assert not inspect.isawaitable(event)
    assert bus.last_seq == n
    assert stuck.dropped == n - 10
    assert seqs(stuck.drain()) == list(range(n - 9, n + 1))
    got = fast.drain()
    assert fast.dropped == 0
    assert seqs(got) == list(range(1, n + 1))


async def test_stuck_async_reader_does_not_block_the_publisher() -> None:
    """A reader that is waiting but never scheduled (its loop is busy in our publish loop)."""
    bus = EventBus()
    with bus.subscribe(queue_size=10) as slow:
        reader = asyncio.create_task(slow.get())
        await started(reader)
        for i in range(1000):
            bus.publish("a", i)
        assert slow.dropped == 990
        assert (await reader).payload == 990
        assert [e.payload for e in slow.drain()] == list(range(991, 1000))


# ---------------------------------------------------------------- async reading and wake-ups


async def test_async_iteration_in_order() -> None:
    bus = EventBus()
    with bus.subscribe("a.>") as sub:

        async def read(count: int) -> list[int]:
            out = []
            async for event in sub:
                out.append(event.payload)
                if len(out) == count:
                    break
            return out

        reader = asyncio.create_task(read(5))
        await started(reader)
        for i in range(5):
            bus.publish("a.b", i)
            bus.publish("b.a", -i)
            await asyncio.sleep(0)
        assert await asyncio.wait_for(reader, 5) == [0, 1, 2, 3, 4]


async def test_get_returns_queued_event_at_once() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        bus.publish("a", 1)
        assert (await sub.get()).payload == 1


async def test_waiter_woken_from_the_loop_thread() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        reader = asyncio.create_task(sub.get())
        await started(reader)
        event = bus.publish("a", "x")
        assert await asyncio.wait_for(reader, 5) is event


async def test_waiter_woken_from_a_worker_thread_once_per_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    calls = []
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    bus = EventBus()
    with bus.subscribe() as sub:
        reader = asyncio.create_task(sub.get())
        await started(reader)
        await asyncio.to_thread(lambda: [bus.publish("a", i) for i in range(1000)])
        calls_after_publishing = len(calls)
        first = await asyncio.wait_for(reader, 5)
        assert first.payload == 0
        assert len(sub.drain()) == 999
        # one wake-up for the wait (plus to_thread's own completion callback), not one per event
        assert 1 <= calls_after_publishing <= 2
        assert sum(1 for c in calls if getattr(c[0], "__name__", "") == "_release") == 1
        # no waiter: publishing from a thread makes no threadsafe call at all
        before = len(calls)
        thread = threading.Thread(target=lambda: [bus.publish("a", i) for i in range(100)])
        thread.start()
        thread.join()
        assert len(calls) == before
        assert len(sub.drain()) == 100


async def test_concurrent_publishers_from_threads() -> None:
    threads, per_thread = 8, 5000
    total = threads * per_thread
    bus = EventBus(history=total)
    with bus.subscribe("w.>", queue_size=total) as sub:
        received: list[Event] = []

        async def read() -> None:
            async for event in sub:
                received.append(event)
                if len(received) == total:
                    return

        reader = asyncio.create_task(read())
        await started(reader)

        def work(worker: int) -> None:
            for i in range(per_thread):
                bus.publish(f"w.{worker}", (worker, i), source=f"capsule{worker}")

        await asyncio.to_thread(run_threads, threads, work)
        await asyncio.wait_for(reader, 10)
    assert sub.dropped == 0
    assert sorted(seqs(received)) == list(range(1, total + 1))
    assert seqs(received) == sorted(seqs(received))  # delivered in seq order
    for worker in range(threads):
        mine = [e.payload[1] for e in received if e.payload[0] == worker]
        assert mine == list(range(per_thread))  # each thread's own order kept
    assert bus.history() == received


async def test_subscribe_and_unsubscribe_while_threads_publish() -> None:
    """Every subscription, made and closed while threads publish, sees one gapless run of
    seq numbers: its history pre-fill joins the live events with no gap and no overlap."""
    bus = EventBus(history=1000)
    stop = threading.Event()
    published = [0, 0, 0]

    def work(worker: int) -> None:
        while not stop.is_set():
            bus.publish(f"load.{worker}", None)
            published[worker] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    made: list[tuple[Subscription, Event]] = []
    try:
        for round_ in range(200):
            sub = bus.subscribe(">", queue_size=1_000_000, history=(round_ % 4) * 5)
            made.append((sub, await asyncio.wait_for(sub.get(), 5)))  # woken from a worker
            if round_ >= 3:
                made[round_ - 3][0].close()
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert bus.subscribers == 3
    bus.close()
    assert bus.subscribers == 0
    assert bus.last_seq == sum(published)
    for round_, (sub, first) in enumerate(made):
        got = [first.seq, *seqs(sub.drain())]
        assert sub.dropped == 0
        assert got == list(range(got[0], got[0] + len(got))), f"gap or overlap in subscription {round_}"


async def test_second_concurrent_reader_is_refused() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        first = asyncio.create_task(sub.get())
        await started(first)
        with pytest.raises(BusError, match="already has a task waiting"):
            await sub.get()
        bus.publish("a", 1)
        assert (await first).payload == 1


async def test_cancelled_reader_loses_nothing() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        reader = asyncio.create_task(sub.get())
        await started(reader)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        reader = asyncio.create_task(sub.get())  # the cancelled wait left nothing behind
        await started(reader)
        bus.publish("a", 1)
        assert (await asyncio.wait_for(reader, 5)).payload == 1
        # cancelled just after being woken: the event stays queued
        reader = asyncio.create_task(sub.get())
        await started(reader)
        bus.publish("a", 2)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert (await asyncio.wait_for(sub.get(), 5)).payload == 2


def test_subscribe_without_a_running_loop() -> None:
    bus = EventBus()
    sub = bus.subscribe("a.*")
    bus.publish("a.b", 1)
    assert sub.get_nowait() is not None

    async def later() -> Event:
        reader = asyncio.create_task(sub.get())
        await started(reader)
        bus.publish("a.c", 2)
        return await reader

    assert asyncio.run(later()).payload == 2
    assert asyncio.run(later()).payload == 2  # and again on a fresh loop
    sub.close()


def test_reader_on_a_closed_loop_does_not_break_publishers() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    loop = asyncio.new_event_loop()

    async def wait_and_abandon() -> asyncio.Task[Event]:
        reader = asyncio.create_task(sub.get())
        await started(reader)
        return reader

    def on_its_own_thread() -> None:
        abandoned = loop.run_until_complete(wait_and_abandon())
        abandoned._log_destroy_pending = False  # type: ignore[attr-defined]
        loop.close()

    thread = threading.Thread(target=on_its_own_thread)
    thread.start()
    thread.join()
    event = bus.publish("a", 1)  # its waiter's loop is gone: publishing still works
    bus.publish("a", 2)
    assert sub.get_nowait() is event
    assert sub.drain()[0].payload == 2
    sub.close()


# ---------------------------------------------------------------- close


async def test_iteration_ends_on_subscription_close() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    got: list[int] = []

    async def read() -> None:
        async for event in sub:
            got.append(event.payload)

    reader = asyncio.create_task(read())
    await started(reader)
    bus.publish("a", 1)
    await asyncio.sleep(0)
    bus.publish("a", 2)
    sub.close()
    bus.publish("a", 3)  # after close: not delivered
    await asyncio.wait_for(reader, 5)
    assert got == [1, 2]
    assert sub.closed
    assert bus.subscribers == 0
    with pytest.raises(SubscriptionClosed):
        await sub.get()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()


async def test_bus_close_ends_every_subscription_from_another_thread() -> None:
    bus = EventBus()
    subs = [bus.subscribe(), bus.subscribe("a"), bus.subscribe("b")]

    async def count(sub: Subscription) -> int:
        return len([e async for e in sub])

    readers = [asyncio.create_task(count(s)) for s in subs]
    for r in readers:
        await started(r)
    bus.publish("a")
    await asyncio.to_thread(bus.close)
    assert await asyncio.wait_for(asyncio.gather(*readers), 5) == [1, 1, 0]
    assert bus.subscribers == 0
    assert all(s.closed for s in subs)
    with pytest.raises(BusError, match="closed"):
        bus.subscribe()
    assert bus.publish("a").seq == 2  # publishing after close still records history
    assert seqs(bus.history()) == [1, 2]
    bus.close()


async def test_close_keeps_queued_events_then_stops() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    for i in range(3):
        bus.publish("a", i)
    bus.close()
    assert [e.payload async for e in sub] == [0, 1, 2]
    assert sub.get_nowait() is None
    assert [e async for e in sub] == []


def test_close_is_idempotent_and_context_manager_closes() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        assert bus.subscribers == 1
        assert not sub.closed
        assert "open" in repr(sub)
    assert sub.closed
    assert "closed" in repr(sub)
    sub.close()
    assert bus.subscribers == 0
    other = bus.subscribe()
    sub.close()  # closing a closed one again does not touch the others
    assert bus.subscribers == 1
    other.close()
    with pytest.raises(RuntimeError), bus.subscribe() as failing:
        raise RuntimeError("boom")
    assert failing.closed
    assert bus.subscribers == 0


# ---------------------------------------------------------------- benchmark helper


def test_subscribers_that_never_read_lose_the_oldest_events_and_count_them() -> None:
    bus = EventBus()
    one = bus.subscribe(">")
    for i in range(20_000):
        bus.publish(f"bench.c{i & 7}.tick", {"n": i})
    assert (len(one.drain()), one.dropped) == (1024, 18_976)
    small = EventBus(queue_size=100)
    many = [small.subscribe(">") for _ in range(10)]
    for i in range(5_000):
        small.publish("bench.tick", i)
    assert (sum(len(s.drain()) for s in many), sum(s.dropped for s in many)) == (1000, 10 * 4900)
    nobody = EventBus()
    for i in range(1000):
        nobody.publish("bench.tick", i)
    assert nobody.last_seq == 1000
