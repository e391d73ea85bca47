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
Received events go into the deployment bus itself (orchestrator.lattice.inbox: an EventBus
with its own sequence), from which the capsule's InterceptorRunner reads exactly as on one
host; the guest is given `{topic, payload, source, seq, timestamp_ms}` with the
*publisher's* seq and timestamp.

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
- a graceful drain, or a deployment leaving this host: `await bus.stop_receiving()` leaves
  the queue groups (NATS drain: what was already routed here still arrives), then the host
  awaits `capsule.caught_up(bus.last_seq)` and only then stops the capsule. (A capsule
  stopped without this keeps its share of events coming here for LINGER_S, unhandled.)
A copy of an event that reaches one host twice (two hosts' subscriptions briefly differing
while a new version changes its patterns) is recognised by (run, seq) and dropped.

History: every bus subject is also kept in a bounded JetStream stream (orchestrator.lattice
.history) for `orch events --lattice --history N`; `events()` is re-exported here.

Used by the host runtime (`orch host`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any

import nats.errors

from ..capsule.bus import Event, EventBus
from ..throttle import Throttle
from .connection import Lattice, barrier
from .history import ensure_history, events
from .inbox import LINGER_S, DeploymentBus, LatticeEvent, nats_patterns, patterns_overlap
from .naming import encode_token

logger = logging.getLogger(__name__)

OUTGOING_EVENTS = 16_384
OUTGOING_BYTES = 64 << 20
HEADROOM = 4096  # subject and protocol line beside the envelope


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

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
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
        await barrier(self.lattice.nc)

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


__all__ = ["LINGER_S", "DeploymentBus", "LatticeBus", "LatticeEvent", "events", "nats_patterns", "patterns_overlap"]
