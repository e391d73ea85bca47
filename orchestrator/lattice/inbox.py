"""A deployment's bus on one host: what its capsule publishes and what its interceptors
receive from the lattice, once per deployment (orchestrator.lattice.bus explains the design).

`DeploymentBus` is an EventBus, so a Capsule takes it as its `bus` unchanged: `publish`
goes to the owner (the host's LatticeBus: the local bus, then NATS); `subscribe` (the
InterceptorRunner's) also brings the NATS subscriptions in line with the patterns
subscribed: one per pattern, in the deployment's queue group, `>` in place of partly
overlapping ones, a pattern nobody uses kept LINGER_S longer for the next version. Events
received are recorded in this bus with its own sequence numbers (what `after_seq` and
`history` mean at a handover) as `LatticeEvent`s, whose `to_dict` carries the publisher's seq
and timestamp; a second copy of an event (same run and seq) is dropped.

Used by orchestrator.lattice.bus.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from ..capsule.bus import EVENT_OVERHEAD, BusError, Event, EventBus, Replay, Subscription
from ..capsule.interceptors import INTERCEPTOR_QUEUE, subscription_patterns
from ..throttle import Throttle
from .connection import Lattice, barrier, leave_queue_group
from .history import parse_event
from .naming import encode_token

logger = logging.getLogger(__name__)


class Owner(Protocol):
    """What a deployment bus needs of the host's LatticeBus."""

    lattice: Lattice
    loop: asyncio.AbstractEventLoop | None
    loop_thread: int
    throttle: Throttle

    def publish(self, topic: str, payload: Any = None, *, source: str = "orch", size: int | None = None) -> Event: ...
    def loop_or_running(self) -> asyncio.AbstractEventLoop: ...
    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None: ...


LINGER_S = 5.0
"""How long a NATS subscription nobody uses is kept (a reload's handover takes it over)."""

INBOX_HISTORY = 16_384
INBOX_HISTORY_BYTES = 64 << 20
RECENT = 16_384
"""(run, seq) keys remembered per deployment to drop a second copy of an event."""


@dataclass(frozen=True, slots=True)
class LatticeEvent(Event):
    """An event received over NATS: `seq` orders it in the deployment's bus; `to_dict` (what
    interceptors and streams see) carries the publisher's `origin_seq` and timestamp."""

    origin_seq: int = field(default=0, compare=False)
    host: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "payload": self.payload,
            "source": self.source,
            "seq": self.origin_seq,
            "timestamp_ms": self.timestamp_ms,
        }


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both patterns (both valid)."""
    left, right = a.split("."), b.split(".")
    for index in range(max(len(left), len(right))):
        x = left[index] if index < len(left) else None
        y = right[index] if index < len(right) else None
        if x == ">":
            return y is not None
        if y == ">":
            return x is not None
        if x is None or y is None:
            return False
        if x != y and "*" not in (x, y):
            return False
    return True


def nats_patterns(patterns: set[str]) -> set[str]:
    """What to subscribe to on NATS for `patterns`, no event matching two of them."""
    kept = subscription_patterns(sorted(patterns))
    if any(patterns_overlap(a, b) for i, a in enumerate(kept) for b in kept[i + 1 :]):
        return {">"}
    return set(kept)


class DeploymentBus(EventBus):
    """The bus of one deployment on this host: publishes go to the lattice; subscriptions
    (its interceptors') receive the lattice's events once per deployment."""

    def __init__(self, owner: Owner, name: str) -> None:
        super().__init__(history=INBOX_HISTORY, history_bytes=INBOX_HISTORY_BYTES, queue_size=INTERCEPTOR_QUEUE)
        self.name = name
        self._owner = owner
        self._queue = encode_token(name)
        self._nats: dict[str, NatsSubscription] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._dirty = False
        self._receiving = True
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.received = 0  # events delivered into this bus
        self.duplicates = 0  # second copies dropped
        self.rejected = 0  # messages that were not bus events

    # -- what the capsule does -----------------------------------------------------------------
    def publish(self, topic: str, payload: Any = None, *, source: str = "orch", size: int | None = None) -> Event:
        """To the host's local bus and the lattice; never blocks; thread-safe."""
        return self._owner.publish(topic, payload, source=source, size=size)

    def subscribe(
        self, pattern: str = ">", *, queue_size: int | None = None, queue_bytes: int | None = None, history: int = 0
    ) -> Subscription:
        sub = super().subscribe(pattern, queue_size=queue_size, queue_bytes=queue_bytes, history=history)
        self._receiving = True  # a version started after a drain receives again
        self._changed()
        return sub

    def follow(
        self, pattern: str = ">", *, history: int, queue_size: int | None = None, queue_bytes: int | None = None
    ) -> tuple[Replay, Subscription]:
        replay, sub = super().follow(pattern, history=history, queue_size=queue_size, queue_bytes=queue_bytes)
        self._receiving = True
        self._changed()
        return replay, sub

    def _unsubscribe(self, sub: Subscription) -> None:
        super()._unsubscribe(sub)
        self._changed()

    def close(self) -> None:
        super().close()
        self._changed()

    @property
    def pending(self) -> int:
        """Messages NATS delivered to this host that are not yet in this bus."""
        return sum(sub.pending_msgs for sub in self._nats.values())

    @property
    def patterns(self) -> list[str]:
        """The NATS patterns subscribed to now (lingering ones included)."""
        return sorted(self._nats)

    # -- NATS subscriptions --------------------------------------------------------------------
    def _changed(self) -> None:
        """The subscribed patterns changed: bring the NATS subscriptions in line (a task)."""
        loop = self._owner.loop
        if loop is None:
            return  # start() syncs every deployment bus
        if threading.get_ident() != self._owner.loop_thread:
            loop.call_soon_threadsafe(self._changed)
            return
        self._dirty = True
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = loop.create_task(self._sync(), name=f"lattice-bus-{self.name}")

    def _wanted(self) -> set[str]:
        if not self._receiving:
            return set()
        with self._lock:
            open_patterns = {sub.pattern for sub in self._subs}
        return nats_patterns(open_patterns) if open_patterns else set()

    async def _sync(self) -> None:
        nc = self._owner.lattice.nc
        while self._dirty:
            self._dirty = False
            wanted = self._wanted()
            for pattern in sorted(wanted - set(self._nats)):
                try:
                    self._nats[pattern] = await nc.subscribe(
                        self._owner.lattice.names.bus(pattern), queue=self._queue_of(pattern), cb=self._on_message
                    )
                except nats.errors.Error as error:
                    logger.warning("deployment %s: cannot subscribe to %s: %s", self.name, pattern, error)
            for pattern in wanted:
                timer = self._linger.pop(pattern, None)
                if timer is not None:
                    timer.cancel()
            for pattern in set(self._nats) - wanted:
                if pattern not in self._linger:
                    delay = LINGER_S if self._receiving else 0.0
                    self._linger[pattern] = self._owner.loop_or_running().call_later(delay, self._expire, pattern)

    def _expire(self, pattern: str) -> None:
        self._linger.pop(pattern, None)
        if pattern not in self._wanted():
            self._owner.spawn(self._leave(pattern))

    async def _leave(self, pattern: str) -> None:
        subscription = self._nats.get(pattern)
        if subscription is None:
            return
        try:
            await leave_queue_group(subscription)  # what was routed here arrives
        except nats.errors.Error as error:
            logger.debug("deployment %s: leaving %s: %s", self.name, pattern, error)
        if self._nats.get(pattern) is subscription:
            del self._nats[pattern]

    def _queue_of(self, pattern: str) -> str:
        return f"{self._queue}.{hashlib.sha256(pattern.encode()).hexdigest()[:16]}"

    async def ready(self) -> None:
        """Return once the NATS server has this bus's subscriptions (for tests and start-up)."""
        while self._sync_task is not None and not self._sync_task.done():
            await self._sync_task
        await barrier(self._owner.lattice.nc)

    async def stop_receiving(self) -> None:
        """Leave the queue groups now (events already routed here still arrive), so other
        hosts take this deployment's events: a host's drain, before `caught_up(last_seq)`."""
        self._receiving = False
        for timer in self._linger.values():
            timer.cancel()
        self._linger.clear()
        await self.ready()
        await asyncio.gather(*(self._leave(pattern) for pattern in list(self._nats)))

    # -- receiving -----------------------------------------------------------------------------
    async def _on_message(self, msg: Msg) -> None:
        owner = self._owner
        try:
            topic = owner.lattice.names.topic_of(msg.subject)
            envelope = parse_event(msg.data)
        except ValueError as error:
            self.rejected += 1
            owner.throttle.warning("rejected", "lattice bus: not a bus event on %s: %s", msg.subject, error)
            return
        key = (envelope.run, envelope.seq)
        if key in self._recent:
            self.duplicates += 1
            return
        try:
            self.deliver(topic, envelope.payload, source=envelope.source, origin_seq=envelope.seq,
                         host=envelope.host, timestamp_ms=envelope.timestamp_ms, size=len(msg.data))  # fmt: skip
        except BusError as error:  # a topic our rules refuse (published by something else)
            self.rejected += 1
            owner.throttle.warning("rejected", "lattice bus: event on %s refused: %s", msg.subject, error)
            return
        self._recent[key] = None
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def deliver(
        self, topic: str, payload: Any, *, source: str, origin_seq: int, host: str, timestamp_ms: int, size: int
    ) -> LatticeEvent:
        """Record and deliver an event received from the lattice (EventBus.publish, keeping
        the publisher's seq and timestamp). BusError for a malformed topic."""
        size += EVENT_OVERHEAD + len(topic)
        with self._lock:
            subs = self._routes.get(topic)
            if subs is None:
                subs = self._route(topic)
            self._seq += 1
            event = LatticeEvent(topic, payload, source, self._seq, timestamp_ms, size, origin_seq, host)
            self._record(event)
            for sub in subs:
                sub._put(event)
                if sub._waiter is not None:
                    sub._wake()
        self.received += 1
        return event
