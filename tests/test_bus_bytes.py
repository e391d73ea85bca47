"""The event bus bounded by bytes: each event's size, the history ring's and the queues' byte
caps, and `follow`'s Replay, which hands the history out in chunks without pinning it.

Assertions are on the sizes and counts the bus keeps (and, for the Replay, on which payload
objects stay alive), never on the process's memory.
"""

from __future__ import annotations

import gc
import json
import threading
import weakref
from typing import Any

import pytest

from orchestrator.capsule.bus import EVENT_OVERHEAD, BusError, Event, EventBus, payload_size

MIB = 1 << 20


class Blob:
    """A payload object whose lifetime a test can watch (dicts cannot be weakly referenced)."""

    def __init__(self, n: int) -> None:
        self.n = n


def overhead(topic: str) -> int:
    return EVENT_OVERHEAD + len(topic)


# ---------------------------------------------------------------- an event's size


def test_a_given_size_is_used_and_a_missing_one_is_measured_from_the_json() -> None:
    bus = EventBus()
    given = bus.publish("cap.big", {"x": 1}, size=MIB)
    assert given.size == MIB + overhead("cap.big")
    payload = {"capsule": "hello", "phase": "running", "note": "é" * 10}
    measured = bus.publish("orch.capsule.hello.running", payload)
    assert measured.size == len(json.dumps(payload)) + overhead("orch.capsule.hello.running")
    assert len(json.dumps(payload)) >= len(json.dumps(payload, ensure_ascii=False).encode())  # an upper estimate
    assert bus.publish("a.b").size == payload_size(None) + overhead("a.b")
    assert given == Event("cap.big", {"x": 1}, "orch", 1, given.timestamp_ms)  # size is not compared


def test_payloads_that_are_not_json_still_get_a_size() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    bus = EventBus()
    for payload in (Blob(1), cyclic, deep, float("nan"), {1: {2, 3}}):
        event = bus.publish("odd", payload)
        assert event.size >= EVENT_OVERHEAD
    assert bus.retained_bytes == sum(e.size for e in bus.history())


@pytest.mark.parametrize("size", [-1, True, 1.5, "10"])
def test_a_bad_size_is_refused_and_nothing_is_recorded(size: Any) -> None:
    bus = EventBus()
    with pytest.raises(BusError, match="size"):
        bus.publish("a", 1, size=size)
    assert (bus.last_seq, bus.retained, bus.retained_bytes) == (0, 0, 0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"history_bytes": -1}, "history_bytes"), ({"queue_bytes": 0}, "queue_bytes")],
)
def test_bad_byte_caps_are_refused(kwargs: dict[str, int], needle: str) -> None:
    with pytest.raises(BusError, match=needle):
        EventBus(**kwargs)
    with pytest.raises(BusError, match="queue_bytes"):
        EventBus().subscribe(queue_bytes=0)
    with pytest.raises(BusError, match="queue_bytes"):
        EventBus().follow(history=1, queue_bytes=-5)


# ---------------------------------------------------------------- the history ring


def test_the_history_is_bounded_by_bytes_as_well_as_by_count() -> None:
    bus = EventBus(history=10_000, history_bytes=64 * MIB)
    for i in range(1500):  # 1,500 publishes of 1 MiB each, as a capsule's airlock reports them
        bus.publish("cap.blob", {"i": i}, size=MIB)
    each = MIB + overhead("cap.blob")
    assert bus.retained == 64 * MIB // each == 63
    assert bus.retained_bytes == 63 * each <= 64 * MIB
    assert [e.seq for e in bus.history()] == list(range(1500 - 62, 1501))  # the newest, in order
    for i in range(20_000):  # small events: now the count cap binds
        bus.publish("orch.tick", i)
    assert bus.retained == 10_000
    assert bus.retained_bytes == sum(e.size for e in bus.history()) < 64 * MIB


def test_an_event_larger_than_the_history_cap_is_delivered_but_not_kept() -> None:
    bus = EventBus(history_bytes=MIB)
    bus.publish("small", 1)
    with bus.subscribe() as sub:
        bus.publish("huge", None, size=2 * MIB)
        assert [e.topic for e in sub.drain()] == ["huge"]
    assert (bus.retained, bus.retained_bytes) == (0, 0)
    assert bus.history() == []


def test_a_zero_count_history_keeps_nothing() -> None:
    bus = EventBus(history=0)
    bus.publish("a", 1)
    assert (bus.retained, bus.retained_bytes) == (0, 0)


async def test_threads_publishing_sizes_keep_the_accounting_exact() -> None:
    bus = EventBus(history=500, history_bytes=200_000, queue_size=300)
    sub = bus.subscribe(queue_bytes=100_000)

    def publish(worker: int) -> None:
        for i in range(2000):
            bus.publish(f"w.{worker}", i, size=(i * 37 + worker) % 5000)

    threads = [threading.Thread(target=publish, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert bus.last_seq == 8000
    assert bus.retained_bytes == sum(e.size for e in bus.history()) <= 200_000
    assert bus.retained <= 500
    queued = sub.drain()
    assert sum(e.size for e in queued) <= 100_000 and len(queued) <= 300
    assert sub.dropped + len(queued) == 8000
    assert sub.queued_bytes == 0


# ---------------------------------------------------------------- subscription queues


def test_a_queue_is_bounded_by_bytes_and_counts_what_it_drops() -> None:
    bus = EventBus()
    each = MIB + overhead("cap.blob")
    with bus.subscribe(queue_size=1000, queue_bytes=3 * MIB) as sub:
        for i in range(10):
            bus.publish("cap.blob", i, size=MIB)
        assert (sub.queued, sub.queued_bytes, sub.dropped) == (2, 2 * each, 8)
        assert sub.get_nowait() is not None
        assert (sub.queued, sub.queued_bytes) == (1, each)
        assert [e.payload for e in sub.drain()] == [9]
        assert (sub.queued, sub.queued_bytes) == (0, 0)


def test_a_queue_keeps_the_newest_event_even_when_it_alone_is_over_the_cap() -> None:
    bus = EventBus()
    with bus.subscribe(queue_bytes=1000) as sub:
        bus.publish("a", "small")
        bus.publish("a", None, size=5000)
        assert (sub.queued, sub.dropped) == (1, 1)
        assert sub.queued_bytes == 5000 + overhead("a")


async def test_get_releases_the_bytes_it_hands_out() -> None:
    bus = EventBus()
    with bus.subscribe(queue_bytes=10 * MIB) as sub:
        bus.publish("a", 1, size=MIB)
        bus.publish("a", 2, size=MIB)
        assert (await sub.get()).payload == 1
        assert sub.queued_bytes == MIB + overhead("a")


def test_subscribe_history_fills_the_queue_newest_first_within_its_byte_cap() -> None:
    bus = EventBus()
    for i in range(10):
        bus.publish("h", i, size=MIB)
    each = MIB + overhead("h")
    with bus.subscribe(history=10, queue_bytes=3 * each) as sub:
        assert [e.payload for e in sub.drain()] == [7, 8, 9]
    with bus.subscribe(history=10, queue_bytes=10) as sub:  # at least the newest one
        assert [e.payload for e in sub.drain()] == [9]


# ---------------------------------------------------------------- follow: history as a Replay


def test_follow_replays_the_history_in_chunks_then_the_live_events_follow_without_a_gap() -> None:
    bus = EventBus()
    for i in range(20):
        bus.publish("a.x" if i % 2 else "b.x", i, size=1000)
    replay, sub = bus.follow("a.*", history=6)
    bus.publish("a.y", "live")
    assert replay.remaining == 6
    chunks = []
    while replay.remaining:
        events, lost = replay.take(max_events=100, max_bytes=2500)
        assert lost == 0
        chunks.append([e.payload for e in events])
    assert chunks == [[9, 11, 13], [15, 17, 19]]  # 3 x 1,103 bytes reach 2,500
    assert [e.payload for e in sub.drain()] == ["live"]
    first, _ = bus.follow(history=3)[0].take(max_events=1, max_bytes=1 << 30)
    assert [e.payload for e in first] == [18]
    sub.close()


def test_a_replay_always_hands_out_one_event_and_respects_max_events() -> None:
    bus = EventBus()
    for i in range(5):
        bus.publish("a", i, size=MIB)
    replay, sub = bus.follow(history=5)
    assert [e.payload for e in replay.take(max_events=10, max_bytes=1)[0]] == [0]
    assert [e.payload for e in replay.take(max_events=2, max_bytes=1 << 40)[0]] == [1, 2]
    sub.close()


def test_a_replay_pins_nothing_and_counts_what_left_the_ring_as_lost() -> None:
    bus = EventBus(history=10)
    blobs = [Blob(i) for i in range(10)]
    alive = [weakref.ref(blob) for blob in blobs]
    for blob in blobs:
        bus.publish("b", blob)
    replay, sub = bus.follow("b", history=10)
    del blobs, blob
    for i in range(6):  # six newer events push the six oldest out of the ring
        bus.publish("other", i)
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * 6 + [False] * 4  # the Replay holds no events
    events, lost = replay.take(max_events=100, max_bytes=1 << 30)
    assert lost == 6 and [e.payload.n for e in events] == [6, 7, 8, 9]
    assert replay.remaining == 0
    assert [e.topic for e in sub.drain()] == []  # "other" does not match "b"
    sub.close()


def test_follow_caps_the_live_queue_only() -> None:
    bus = EventBus()
    for i in range(5):
        bus.publish("a", i, size=MIB)
    replay, sub = bus.follow(history=5, queue_size=2, queue_bytes=10 * MIB)
    assert replay.remaining == 5 and sub.queued == 0
    for i in range(3):
        bus.publish("a", f"live{i}")
    assert sub.queued == 2 and sub.dropped == 1
    assert len(replay.take(max_events=100, max_bytes=1 << 40)[0]) == 5
    sub.close()


def test_follow_on_a_closed_bus_is_refused() -> None:
    bus = EventBus()
    bus.close()
    with pytest.raises(BusError, match="closed"):
        bus.follow(history=1)
    with pytest.raises(BusError, match="history"):
        EventBus().follow(history=-1)
