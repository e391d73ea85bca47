"""The capsules' event bus across the lattice: topics map 1:1 onto NATS subjects.

`LatticeBus(lattice, local, host_id)` is built once per host; `for_deployment(name)` is the
bus a capsule of deployment `name` on this host is given (`Capsule.launch(bus=...)`).

Publishing: a capsule's publish goes to the host's local EventBus first (so the host's own
control API and `orch events` show it, and so it gets the host's sequence number), then,
in publish order, to NATS on `names.bus(topic)`: `publish` never blocks and never waits
(any thread; a sender task writes to NATS). The message body is the envelope
`{"source", "host", "run", "seq", "timestamp_ms", "payload"}` (JSON): `seq` is the publishing
host's local bus sequence (per host, not lattice-wide), `host` its id, `run` a random id per
LatticeBus (a restarted host counts seq from 1 again). If NATS cannot take an event (too
large for the server's max_payload, or disconnected past nats-py's buffer), it still went to
the local bus, and `unsent` counts it (logged, rate-limited).

Delivery to interceptors: once per deployment across the lattice, at most once (core NATS
queue groups, no acknowledgements). The deployment's bus subscribes on NATS, in the queue
group of the deployment, to the patterns of the interceptors subscribed to it, so NATS
hands each event to one host running the deployment. Patterns another one covers share
its subscription; when two patterns partly overlap (`a.*` and `*.b`), one subscription to
`>` takes their place, so no event ever reaches a deployment through two queue groups.
Received events go into the deployment bus itself (an EventBus with its own sequence), from
which the capsule's InterceptorRunner reads exactly as on one host; what the guest is given
is `{topic, payload, source, seq, timestamp_ms}` with the *publisher's* seq and timestamp.

Why not a JetStream consumer (at-least-once): interceptors keep the local semantics (at
most once, a loss counted and announced, never a duplicate that guest code must detect)
and publishing stays a buffer append. What that costs: events NATS already gave to a host
that is then SIGKILLed, and that its interceptors had not handled, are lost; NATS sends the
later ones to the remaining hosts at once. Nothing else loses events:
- a version swap on a host hands over exactly as locally: the NATS subscriptions belong to
  the deployment, not the version (a pattern nobody uses is kept LINGER_S longer, so the
  next version takes it over), and the runner's `after_seq` and `history` are sequence
  numbers of the deployment bus, whose ring holds INBOX_HISTORY events: nothing lost,
  nothing twice on that host;
- a graceful drain: `await stop_receiving()` leaves the queue groups (NATS drain: what was
  already routed here still arrives), then the host awaits `capsule.caught_up(last_seq)`.
A copy of an event that reaches one host twice (two hosts' subscriptions briefly differing
while a new version changes its patterns) is recognised by (run, seq) and dropped.

History: every bus subject is also kept in a bounded JetStream stream (orchestrator.lattice
.history) for `orch events --lattice --history N`; `events()` is re-exported here.

Used by the host runtime (`orch host`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from ..capsule.bus import EVENT_OVERHEAD, BusError, Event, EventBus, Replay, Subscription
from ..capsule.interceptors import INTERCEPTOR_QUEUE, subscription_patterns
from ..throttle import Throttle
from .connection import Lattice
from .history import ensure_history, events, parse_event
from .naming import encode_token

logger = logging.getLogger(__name__)

LINGER_S = 5.0
"""How long a NATS subscription nobody uses is kept (a reload's handover takes it over)."""

INBOX_HISTORY = 16_384
INBOX_HISTORY_BYTES = 64 << 20
OUTGOING_EVENTS = 16_384
OUTGOING_BYTES = 64 << 20
RECENT = 16_384
"""(run, seq) keys remembered per deployment to drop a second copy of an event."""

HEADROOM = 4096  # subject and protocol line beside the envelope


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

    def __init__(self, owner: LatticeBus, name: str) -> None:
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
            await subscription.drain()  # type: ignore[no-untyped-call]  # what was routed here arrives
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
        await self._owner.lattice.nc.flush()

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


class LatticeBus:
    """The lattice's bus for one host: `for_deployment(name)` per deployment; `start`, `close`."""

    def __init__(
        self, lattice: Lattice, local: EventBus, host_id: str, *, history: bool = True, history_replicas: int = 1
    ) -> None:
        self.lattice = lattice
        self.local = local
        self.host_id = host_id
        self.run = secrets.token_hex(8)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self.throttle = Throttle(logger, interval=10.0)
        self._history = history
        self._history_replicas = history_replicas
        self._deployments: dict[str, DeploymentBus] = {}
        self._lock = threading.Lock()
        self._outgoing: deque[Event] = deque()
        self._outgoing_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.unsent = 0  # events that reached the local bus but not NATS

    async def start(self) -> None:
        """Keep history (unless `history=False`: a bounded stream; a warning if JetStream
        refuses) and start sending."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        if self._history:
            await ensure_history(self.lattice, replicas=self._history_replicas)
        self._sender = self.loop.create_task(self._send_loop(), name="lattice-bus-sender")
        for bus in self._deployments.values():
            bus._changed()
        if self._outgoing:
            self._wake.set()

    def loop_or_running(self) -> asyncio.AbstractEventLoop:
        return self.loop or asyncio.get_running_loop()

    def spawn(self, coroutine: Any) -> None:
        task = self.loop_or_running().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def for_deployment(self, name: str) -> DeploymentBus:
        """The bus for a capsule of deployment `name` on this host (one per name)."""
        found = self._deployments.get(name)
        if found is None or found._closed:
            encode_token(name)  # GateError now for a name NATS cannot carry
            found = self._deployments[name] = DeploymentBus(self, name)
        return found

    # -- publishing ------------------------------------------------------------------------------
    def publish(self, topic: str, payload: Any = None, *, source: str = "orch", size: int | None = None) -> Event:
        """Publish on the local bus, then (in order, by the sender task) on the lattice."""
        event = self.local.publish(topic, payload, source=source, size=size)
        with self._lock:
            self._outgoing.append(event)
            self._outgoing_bytes += event.size
            while len(self._outgoing) > OUTGOING_EVENTS or self._outgoing_bytes > OUTGOING_BYTES:
                self._outgoing_bytes -= self._outgoing.popleft().size
                self.unsent += 1
                self.throttle.warning("backlog", "lattice bus: the backlog for NATS is full; oldest events dropped")
        loop = self.loop
        if loop is not None:
            if threading.get_ident() == self.loop_thread:
                self._idle.clear()
                self._wake.set()
            else:
                try:
                    loop.call_soon_threadsafe(self._kick)
                except RuntimeError:  # the loop is closed: the event stays local
                    self.unsent += 1
        return event

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def _send_loop(self) -> None:
        nc = self.lattice.nc
        names = self.lattice.names
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._outgoing:
                        break
                    event = self._outgoing.popleft()
                    self._outgoing_bytes -= event.size
                data = self.envelope(event)
                if len(data) + HEADROOM > nc.max_payload:
                    self.unsent += 1
                    self.throttle.warning(
                        "too-large",
                        "lattice bus: an event on %s of %d bytes is over the NATS server's max_payload (%d): it "
                        "stays on this host (raise max_payload to 8MB)",
                        event.topic,
                        len(data),
                        nc.max_payload,
                    )
                    continue
                try:
                    await nc.publish(names.bus(event.topic), data)
                    self.sent += 1
                except nats.errors.Error as error:
                    self.unsent += 1
                    self.throttle.warning("send", "lattice bus: an event on %s was not sent: %r", event.topic, error)
            if not self._wake.is_set():
                self._idle.set()

    def envelope(self, event: Event) -> bytes:
        fields = {
            "source": event.source,
            "host": self.host_id,
            "run": self.run,
            "seq": event.seq,
            "timestamp_ms": event.timestamp_ms,
            "payload": event.payload,
        }
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in a system event: escape it
            return json.dumps(fields, separators=(",", ":"), default=str).encode("ascii")

    async def flush(self) -> None:
        """Return once every event published so far is with the NATS server."""
        if self._sender is not None and not self._sender.done():
            await self._idle.wait()
        await self.lattice.nc.flush()

    async def close(self, *, timeout: float = 5.0) -> None:
        """Stop receiving for every deployment, send what is queued (up to `timeout`), stop."""
        await asyncio.gather(*(bus.stop_receiving() for bus in self._deployments.values()))
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except (TimeoutError, nats.errors.Error) as error:
            logger.warning("lattice bus: %d event(s) not sent at close: %r", len(self._outgoing), error)
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["DeploymentBus", "LatticeBus", "LatticeEvent", "events", "nats_patterns", "patterns_overlap"]
