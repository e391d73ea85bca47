"""EventBus: in-process publish/subscribe on NATS-style topics.

Topics are dot-separated tokens (`orch.capsule.hello.running`); a subscription's pattern may
use `*` for exactly one token and, as its last token, `>` for one or more. Publishers never
block and never wait: each subscription has a bounded queue, and when it is full the oldest
event is dropped and the subscription's `dropped` counter goes up. A ring buffer keeps the
most recent events for late subscribers (the dashboard). Sequence numbers count 1, 2, 3, ...
across the whole bus, so gaps a subscriber sees are exactly its losses.

`publish` is thread-safe: the event loop and the wasm worker threads both call it. A
subscription is read on an event loop (`async for`, `get`) or anywhere without waiting
(`get_nowait`, `drain`). A waiting reader is woken directly when the publisher runs on its
loop's thread, and with one `call_soon_threadsafe` per wait (not per event) otherwise.

Delivery is routed by a per-topic cache of matching subscriptions (rebuilt lazily after
each subscribe or unsubscribe), so a publish is one dict lookup and one append per
matching subscriber. Subject syntax and matching are orchestrator.topics. The interface is
kept small so that NATS can carry the bus (orchestrator.lattice).

Memory is bounded by bytes as well as by count. Each Event carries a `size`: the byte
length of its payload as the publisher knows it (`publish(..., size=len(raw))`, as the
airlock does for a capsule's publish), or else measured once at publish as the length of
its JSON (system events: small and rare), plus a fixed overhead and the topic. The history
ring keeps at most `history` events and `history_bytes` bytes; each subscription's queue at
most `queue_size` events and `queue_bytes` bytes (always at least the newest event), and
drops the oldest beyond either. Queues and the ring share the same Event objects. `follow`
subscribes together with a Replay of the history that hands the backlog out chunk by chunk
from the ring, so a late subscriber's backlog pins nothing the ring does not already hold.

Used by the airlocks (capsule publishes), the reconciler (system events) and the control
API (live tail).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ..errors import OrchestratorError
from ..topics import Tokens, TopicError, split_pattern, split_topic, tokens_match

logger = logging.getLogger(__name__)

ROUTE_CACHE_TOPICS = 4096
"""Distinct topics whose routes are cached; past that the cache starts over."""

HISTORY_BYTES = 64 << 20
"""Default byte cap of the history ring (its count cap is `history`)."""

QUEUE_BYTES = 64 << 20
"""Default byte cap of a subscription's queue (its count cap is `queue_size`)."""

EVENT_OVERHEAD = 100
"""Bytes counted per event besides its payload and topic (the Event object itself)."""


class BusError(OrchestratorError):
    """A malformed topic or pattern, a bad argument, or a use of a closed bus."""


class SubscriptionClosed(BusError):
    """`get()` on a closed subscription whose queue is empty (iteration just ends)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One published event. `payload` is the very object the publisher passed (not copied).
    `size`: the bytes this event counts for in the history and the queues (not compared)."""

    topic: str
    payload: Any
    source: str
    seq: int
    timestamp_ms: int
    size: int = field(default=EVENT_OVERHEAD, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape interceptors and the dashboard see:
        `{topic, payload, source, seq, timestamp_ms}`."""
        return {
            "topic": self.topic,
            "payload": self.payload,
            "source": self.source,
            "seq": self.seq,
            "timestamp_ms": self.timestamp_ms,
        }


def _filter(pattern: tuple[str, ...], events: list[Event]) -> list[Event]:
    """The events whose topic matches `pattern`, in order (one split per distinct topic)."""
    if pattern == (">",):
        return events
    verdicts: dict[str, bool] = {}
    out = []
    for event in events:
        ok = verdicts.get(event.topic)
        if ok is None:
            ok = verdicts[event.topic] = tokens_match(pattern, event.topic.split("."))
        if ok:
            out.append(event)
    return out


def payload_size(payload: Any) -> int:
    """An upper estimate of `payload`'s JSON length in bytes (ASCII-escaped, so never below
    its UTF-8 length). A payload that is not JSON counts as its `str()`."""
    if payload is None:
        return 4
    try:
        return len(json.dumps(payload, default=str))
    except (ValueError, TypeError, RecursionError):  # a cycle, or something odd inside
        try:
            return len(repr(payload))
        except RecursionError:
            return EVENT_OVERHEAD


def _checked(split: Callable[[object], Tokens], text: object) -> Tokens:
    """`split(text)`, with a malformed topic or pattern raised as a BusError."""
    try:
        return split(text)
    except TopicError as error:
        raise BusError(str(error)) from None


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Subscription:
    """Events whose topic matches `pattern`, in publish order; an async iterator of Event.

    Iteration (and `get`) waits for the next event; after `close()` (of the subscription or
    the bus) it still yields what was already queued, then stops, like a closed channel.
    `dropped` counts the events this subscription lost because its queue was full (by count
    or by bytes; `queued` and `queued_bytes` say what it holds now). One task
    at a time may wait on a subscription. Not waiting, `get_nowait` and `drain` work on any
    thread. Use it as a context manager (`with bus.subscribe(...) as sub:`) so that it is
    closed: an open subscription that nobody reads still costs an append per event.
    """

    __slots__ = (
        "_bus",
        "_bytes",
        "_closed",
        "_lock",
        "_max_bytes",
        "_maxlen",
        "_queue",
        "_tokens",
        "_waiter",
        "_waiter_loop",
        "_waiter_thread",
        "dropped",
        "pattern",
    )

    def __init__(self, bus: EventBus, pattern: str, tokens: tuple[str, ...], queue_size: int, queue_bytes: int) -> None:
        self.pattern = pattern
        self.dropped = 0
        self._bus = bus
        self._tokens = tokens
        self._lock = bus._lock
        self._maxlen = queue_size
        self._max_bytes = queue_bytes
        self._bytes = 0
        self._queue: deque[Event] = deque(maxlen=queue_size)
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._waiter_loop: asyncio.AbstractEventLoop | None = None
        self._waiter_thread = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Events waiting in the queue now."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """The sum of the queued events' sizes."""
        return self._bytes

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {self.pattern!r} {state} queued={len(self._queue)} dropped={self.dropped}>"

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    async def get(self) -> Event:
        """The next event, waiting for it on the running loop. Raises SubscriptionClosed once
        the subscription is closed and its queue empty."""
        while True:
            with self._lock:
                if self._queue:
                    event = self._queue.popleft()
                    self._bytes -= event.size
                    return event
                if self._closed:
                    raise SubscriptionClosed(f"subscription {self.pattern!r} is closed")
                if self._waiter is not None:
                    raise BusError(f"subscription {self.pattern!r} already has a task waiting on it")
                loop = asyncio.get_running_loop()
                waiter = loop.create_future()
                self._waiter = waiter
                self._waiter_loop = loop
                self._waiter_thread = threading.get_ident()
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None

    def get_nowait(self) -> Event | None:
        """The next queued event, or None if there is none. Never waits."""
        with self._lock:
            if not self._queue:
                return None
            event = self._queue.popleft()
            self._bytes -= event.size
            return event

    def drain(self) -> list[Event]:
        """Every event queued now, oldest first, without waiting."""
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
            self._bytes = 0
        return events

    def _put(self, event: Event) -> None:
        """Queue `event`, dropping the oldest beyond the count or byte cap (never the newest).
        Called with the bus lock held."""
        queue = self._queue
        if len(queue) == self._maxlen:  # the deque drops its oldest on append
            self._bytes -= queue[0].size
            self.dropped += 1
        queue.append(event)
        self._bytes += event.size
        while self._bytes > self._max_bytes and len(queue) > 1:
            self._bytes -= queue.popleft().size
            self.dropped += 1

    def close(self) -> None:
        """Unsubscribe: no further events arrive; a waiting reader wakes. Idempotent."""
        self._bus._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _wake(self) -> None:
        """Wake the waiting reader. Called with the bus lock held and `_waiter` set."""
        waiter = self._waiter
        assert waiter is not None and self._waiter_loop is not None
        self._waiter = None
        if self._waiter_thread == threading.get_ident():
            if not waiter.done():
                waiter.set_result(None)
            return
        try:
            self._waiter_loop.call_soon_threadsafe(_release, waiter)
        except RuntimeError:  # that loop is closed: nobody is left to wake
            logger.debug("subscription %r: its reader's event loop is closed", self.pattern)


class Replay:
    """The history half of `EventBus.follow`: the seqs of the matching events recorded when
    the subscription was made, handed out oldest first by `take`, chunk by chunk, from the
    history ring. It holds seqs, not events; an event that left the ring before it was taken
    is counted in the `lost` that `take` returns. Thread-safe."""

    __slots__ = ("_bus", "_next", "_seqs")

    def __init__(self, bus: EventBus, seqs: array[int]) -> None:
        self._bus = bus
        self._seqs = seqs
        self._next = 0

    @property
    def remaining(self) -> int:
        """Events not yet taken (or found lost)."""
        return len(self._seqs) - self._next

    def take(self, *, max_events: int, max_bytes: int) -> tuple[list[Event], int]:
        """The next events, up to `max_events` and `max_bytes` (always at least one if any is
        left), and how many of the skipped ones had already left the ring."""
        events: list[Event] = []
        lost = total = 0
        seqs = self._seqs
        with self._bus._lock:
            ring = self._bus._ring
            first = ring[0].seq if ring else self._bus._seq + 1
            while self._next < len(seqs) and len(events) < max_events and (not events or total < max_bytes):
                seq = seqs[self._next]
                self._next += 1
                if seq < first:
                    lost += 1
                    continue
                event = ring[seq - first]
                events.append(event)
                total += event.size
        return events, lost


class EventBus:
    """Publish/subscribe with bounded per-subscriber queues and a history ring.

    `history`, `history_bytes`: the ring's caps (events, bytes) for late subscribers and
    `history()`. `queue_size`, `queue_bytes`: default caps of a subscription's queue.
    `clock`: wall clock in seconds, for `timestamp_ms`.
    """

    def __init__(
        self,
        *,
        history: int = 1000,
        history_bytes: int = HISTORY_BYTES,
        queue_size: int = 1024,
        queue_bytes: int = QUEUE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history < 0:
            raise BusError(f"history must be >= 0, not {history}")
        if history_bytes < 0:
            raise BusError(f"history_bytes must be >= 0, not {history_bytes}")
        if queue_size < 1:
            raise BusError(f"queue_size must be >= 1, not {queue_size}")
        if queue_bytes < 1:
            raise BusError(f"queue_bytes must be >= 1, not {queue_bytes}")
        self._lock = threading.Lock()
        self._clock = clock
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._ring: deque[Event] = deque()
        self._ring_max = history
        self._ring_max_bytes = history_bytes
        self._ring_bytes = 0
        self._seq = 0
        self._subs: tuple[Subscription, ...] = ()
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def last_seq(self) -> int:
        """The seq of the latest event, 0 before the first."""
        return self._seq

    @property
    def retained(self) -> int:
        """Events in the history ring now."""
        return len(self._ring)

    @property
    def retained_bytes(self) -> int:
        """The sum of the sizes of the events in the history ring."""
        return self._ring_bytes

    def publish(self, topic: str, payload: Any = None, *, source: str = "orch", size: int | None = None) -> Event:
        """Record and deliver one event; returns it. Never blocks on subscribers; thread-safe.

        `payload` is delivered as given (a JSON value by convention; not copied). `size`: the
        payload's length in bytes when the caller knows it (the raw JSON it was parsed from);
        otherwise it is measured here, once. Raises BusError for a malformed topic. After
        `close()` events still go to the history.
        """
        if size is None:
            size = payload_size(payload)
        elif isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BusError(f"size must be an integer >= 0, not {size!r}")
        size += EVENT_OVERHEAD + len(topic) if isinstance(topic, str) else EVENT_OVERHEAD
        with self._lock:
            try:
                subs = self._routes.get(topic)
            except TypeError:  # unhashable: not a string
                subs = None
            if subs is None:
                subs = self._route(topic)
            self._seq += 1
            event = Event(topic, payload, source, self._seq, int(self._clock() * 1000), size)
            self._record(event)
            for sub in subs:
                sub._put(event)
                if sub._waiter is not None:
                    sub._wake()
        return event

    def _record(self, event: Event) -> None:
        """Append to the ring, evicting the oldest beyond its caps. Called with the lock held."""
        ring = self._ring
        ring.append(event)
        self._ring_bytes += event.size
        while ring and (len(ring) > self._ring_max or self._ring_bytes > self._ring_max_bytes):
            self._ring_bytes -= ring.popleft().size

    def _route(self, topic: str) -> tuple[Subscription, ...]:
        """Check `topic` and cache the subscriptions it goes to. Called with the lock held."""
        tokens = _checked(split_topic, topic)
        subs = tuple(sub for sub in self._subs if tokens_match(sub._tokens, tokens))
        if len(self._routes) >= ROUTE_CACHE_TOPICS:
            self._routes.clear()
        self._routes[topic] = subs
        return subs

    def _new(self, pattern: str, queue_size: int | None, queue_bytes: int | None, history: int) -> Subscription:
        tokens = _checked(split_pattern, pattern)
        size = self._queue_size if queue_size is None else queue_size
        limit = self._queue_bytes if queue_bytes is None else queue_bytes
        if size < 1:
            raise BusError(f"queue_size must be >= 1, not {size}")
        if limit < 1:
            raise BusError(f"queue_bytes must be >= 1, not {limit}")
        if history < 0:
            raise BusError(f"history must be >= 0, not {history}")
        return Subscription(self, pattern, tokens, size, limit)

    def _add(self, sub: Subscription) -> None:
        """Register `sub`. Called with the lock held."""
        if self._closed:
            raise BusError("the event bus is closed")
        self._subs = (*self._subs, sub)
        self._routes = {}

    def subscribe(
        self, pattern: str = ">", *, queue_size: int | None = None, queue_bytes: int | None = None, history: int = 0
    ) -> Subscription:
        """A new subscription to the topics matching `pattern`.

        `queue_size` and `queue_bytes` override the bus defaults. `history=N` first queues
        the last N matching events from the ring buffer (at most what the queue's caps
        allow: the newest ones), with no gap or overlap before the live events. No running
        loop is needed: a reader binds to the loop it awaits on, so a subscription made in
        sync code can be read later in any loop.
        """
        sub = self._new(pattern, queue_size, queue_bytes, history)
        with self._lock:
            if history and not self._closed:
                backlog: list[Event] = []
                total = 0
                for event in reversed(_filter(sub._tokens, list(self._ring))):
                    if len(backlog) == min(history, sub._maxlen) or (backlog and total + event.size > sub._max_bytes):
                        break
                    backlog.append(event)
                    total += event.size
                sub._queue.extend(reversed(backlog))
                sub._bytes = total
            self._add(sub)
        return sub

    def follow(
        self, pattern: str = ">", *, history: int, queue_size: int | None = None, queue_bytes: int | None = None
    ) -> tuple[Replay, Subscription]:
        """A subscription to the live events matching `pattern` and a Replay of the last
        `history` matching events before it (no gap, no overlap). Unlike
        `subscribe(history=N)`, the backlog does not go through the queue, so its caps apply
        to live events only and the backlog costs nothing beyond the ring."""
        sub = self._new(pattern, queue_size, queue_bytes, history)
        seqs: array[int] = array("q")
        with self._lock:
            if history:
                verdicts: dict[str, bool] = {}
                for event in reversed(self._ring):
                    ok = verdicts.get(event.topic)
                    if ok is None:
                        ok = verdicts[event.topic] = tokens_match(sub._tokens, event.topic.split("."))
                    if ok:
                        seqs.append(event.seq)
                        if len(seqs) == history:
                            break
            self._add(sub)
        seqs.reverse()
        return Replay(self, seqs), sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub._closed:
                return
            sub._closed = True
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._routes = {}
            if sub._waiter is not None:
                sub._wake()

    def history(self, pattern: str = ">", limit: int | None = None) -> list[Event]:
        """The last `limit` (default: all) recorded events matching `pattern`, oldest first."""
        tokens = _checked(split_pattern, pattern)
        if limit is not None and limit < 0:
            raise BusError(f"limit must be >= 0, not {limit}")
        with self._lock:
            recorded = list(self._ring)
        events = _filter(tokens, recorded)
        if limit is None:
            return events
        return events[len(events) - limit :] if limit else []

    def close(self) -> None:
        """End every subscription (readers get what is queued, then iteration stops); no new
        subscriptions. Publishing still works and fills the history. Idempotent."""
        with self._lock:
            self._closed = True
            subs, self._subs, self._routes = self._subs, (), {}
            for sub in subs:
                sub._closed = True
                if sub._waiter is not None:
                    sub._wake()
