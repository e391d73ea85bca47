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

Used by the airlocks (capsule publishes), the reconciler (system events) and the control
API (live tail).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..errors import OrchestratorError
from ..topics import Tokens, TopicError, split_pattern, split_topic, tokens_match

logger = logging.getLogger(__name__)

ROUTE_CACHE_TOPICS = 4096
"""Distinct topics whose routes are cached; past that the cache starts over."""


class BusError(OrchestratorError):
    """A malformed topic or pattern, a bad argument, or a use of a closed bus."""


class SubscriptionClosed(BusError):
    """`get()` on a closed subscription whose queue is empty (iteration just ends)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One published event. `payload` is the very object the publisher passed (not copied)."""

    topic: str
    payload: Any
    source: str
    seq: int
    timestamp_ms: int

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
    `dropped` counts the events this subscription lost because its queue was full. One task
    at a time may wait on a subscription. Not waiting, `get_nowait` and `drain` work on any
    thread. Use it as a context manager (`with bus.subscribe(...) as sub:`) so that it is
    closed: an open subscription that nobody reads still costs an append per event.
    """

    __slots__ = (
        "_bus",
        "_closed",
        "_lock",
        "_maxlen",
        "_queue",
        "_tokens",
        "_waiter",
        "_waiter_loop",
        "_waiter_thread",
        "dropped",
        "pattern",
    )

    def __init__(self, bus: EventBus, pattern: str, tokens: tuple[str, ...], queue_size: int) -> None:
        self.pattern = pattern
        self.dropped = 0
        self._bus = bus
        self._tokens = tokens
        self._lock = bus._lock
        self._maxlen = queue_size
        self._queue: deque[Event] = deque(maxlen=queue_size)
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._waiter_loop: asyncio.AbstractEventLoop | None = None
        self._waiter_thread = 0

    @property
    def closed(self) -> bool:
        return self._closed

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
                    return self._queue.popleft()
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
            return self._queue.popleft() if self._queue else None

    def drain(self) -> list[Event]:
        """Every event queued now, oldest first, without waiting."""
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        return events

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


class EventBus:
    """Publish/subscribe with bounded per-subscriber queues and a history ring.

    `history`: events kept for late subscribers and `history()`. `queue_size`: default
    capacity of a subscription's queue. `clock`: wall clock in seconds, for `timestamp_ms`.
    """

    def __init__(self, *, history: int = 1000, queue_size: int = 1024, clock: Callable[[], float] = time.time) -> None:
        if history < 0:
            raise BusError(f"history must be >= 0, not {history}")
        if queue_size < 1:
            raise BusError(f"queue_size must be >= 1, not {queue_size}")
        self._lock = threading.Lock()
        self._clock = clock
        self._queue_size = queue_size
        self._ring: deque[Event] = deque(maxlen=history)
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

    def publish(self, topic: str, payload: Any = None, *, source: str = "orch") -> Event:
        """Record and deliver one event; returns it. Never blocks on subscribers; thread-safe.

        `payload` is delivered as given (a JSON value by convention; not copied). Raises
        BusError for a malformed topic. After `close()` events still go to the history.
        """
        with self._lock:
            try:
                subs = self._routes.get(topic)
            except TypeError:  # unhashable: not a string
                subs = None
            if subs is None:
                subs = self._route(topic)
            self._seq += 1
            event = Event(topic, payload, source, self._seq, int(self._clock() * 1000))
            self._ring.append(event)
            for sub in subs:
                queue = sub._queue
                if len(queue) == sub._maxlen:
                    sub.dropped += 1
                queue.append(event)
                if sub._waiter is not None:
                    sub._wake()
        return event

    def _route(self, topic: str) -> tuple[Subscription, ...]:
        """Check `topic` and cache the subscriptions it goes to. Called with the lock held."""
        tokens = _checked(split_topic, topic)
        subs = tuple(sub for sub in self._subs if tokens_match(sub._tokens, tokens))
        if len(self._routes) >= ROUTE_CACHE_TOPICS:
            self._routes.clear()
        self._routes[topic] = subs
        return subs

    def subscribe(self, pattern: str = ">", *, queue_size: int | None = None, history: int = 0) -> Subscription:
        """A new subscription to the topics matching `pattern`.

        `queue_size` overrides the bus default. `history=N` first queues the last N matching
        events from the ring buffer (at most `queue_size` of them), with no gap or overlap
        before the live events. No running loop is needed: a reader binds to the loop it
        awaits on, so a subscription made in sync code can be read later in any loop.
        """
        tokens = _checked(split_pattern, pattern)
        size = self._queue_size if queue_size is None else queue_size
        if size < 1:
            raise BusError(f"queue_size must be >= 1, not {size}")
        if history < 0:
            raise BusError(f"history must be >= 0, not {history}")
        sub = Subscription(self, pattern, tokens, size)
        with self._lock:
            if self._closed:
                raise BusError("the event bus is closed")
            if history:
                backlog = _filter(tokens, list(self._ring))
                sub._queue.extend(backlog[-min(history, size) :])
            self._subs = (*self._subs, sub)
            self._routes = {}
        return sub

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
