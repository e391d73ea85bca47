"""GET /v1/events: server-sent events, the history then live, written with backpressure.

A stream is made with `EventBus.follow`: a subscription for the live events (its queue
capped by count and by bytes, ServerLimits.stream_queue_*) and a Replay of the requested
history, which hands the backlog out of the bus's history ring chunk by chunk. Each chunk
(about `stream_chunk_bytes`, or one larger event) is serialised on its own and written, and
the stream waits for the socket to drain before the next: a slow client never makes the
server serialise its whole backlog, and what the server holds for one stream is its live
queue plus about one chunk. Events lost on the way (history that left the ring meanwhile,
live events dropped from a full queue) are counted and announced with an `event: lost`
message `{"dropped", "total"}` before the events that follow the gap; `event: live` marks
the end of the history. An idle stream sends a comment every HEARTBEAT_SECONDS (and so
notices a departed client); a client that reads nothing for `stream_stall_timeout` while
the buffers are full is dropped; at most `max_event_streams` streams are open (503 beyond).

Used by orchestrator.api.server.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from ..capsule.bus import Event, EventBus, Replay, Subscription, SubscriptionClosed
from .responses import ApiError
from .settings import ServerLimits

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
CHUNK_EVENTS = 1000  # events per chunk at most, whatever their size
LIVE = b"event: live\ndata: {}\n\n"
KEEP_ALIVE = b": keep-alive\n\n"
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: Event) -> bytes:
    """One event as an SSE message: `id: <seq>` and `data: <the event as compact JSON>`."""
    fields = event.to_dict()
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a system event's odd file name): escape it
        data = json.dumps(fields, separators=(",", ":"), default=str).encode("ascii")
    return b"id: %d\ndata: %s\n\n" % (event.seq, data)


class EventStream:
    """One open stream: what it has sent and what it holds (for status and tests)."""

    def __init__(self, pattern: str, replay: Replay, subscription: Subscription, limits: ServerLimits) -> None:
        self.pattern, self.replay, self.subscription, self.limits = pattern, replay, subscription, limits
        self.sent_events = 0
        self.sent_bytes = 0
        self.largest_write = 0
        self.writing = 0  # bytes of the write in progress (it waits for the client to read)
        self.live = False
        self._history_lost = 0
        self._announced = 0

    @property
    def lost(self) -> int:
        """Events this stream's client will never get (history left the ring, or live events
        dropped from the queue)."""
        return self._history_lost + self.subscription.dropped

    async def run(self, response: web.StreamResponse) -> None:
        chunk = self.limits.stream_chunk_bytes
        while self.replay.remaining:
            events, lost = self.replay.take(max_events=CHUNK_EVENTS, max_bytes=chunk)
            self._history_lost += lost
            await self._send(response, events)
        self.live = True
        await self._write(response, LIVE)
        subscription = self.subscription
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    first = await subscription.get()
            except TimeoutError:  # a comment line: a client that went away is noticed now
                await self._write(response, KEEP_ALIVE)
                continue
            events, total = [first], first.size
            while total < chunk and len(events) < CHUNK_EVENTS:
                following = subscription.get_nowait()
                if following is None:
                    break
                events.append(following)
                total += following.size
            await self._send(response, events)

    async def _send(self, response: web.StreamResponse, events: list[Event]) -> None:
        parts = []
        lost = self._history_lost + (self.subscription.dropped if self.live else 0)
        if lost > self._announced:
            notice = {"dropped": lost - self._announced, "total": lost}
            parts.append(b"event: lost\ndata: %s\n\n" % json.dumps(notice).encode())
            self._announced = lost
        parts.extend(sse(event) for event in events)
        if parts:
            await self._write(response, b"".join(parts))
            self.sent_events += len(events)

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """Write, waiting (at most stream_stall_timeout) for the socket to drain when aiohttp's
        buffer is full: that wait is the backpressure."""
        self.writing = len(data)
        try:
            async with asyncio.timeout(self.limits.stream_stall_timeout):
                await response.write(data)
        finally:
            self.writing = 0
        self.sent_bytes += len(data)
        self.largest_write = max(self.largest_write, len(data))


class EventStreams:
    """Serves GET /v1/events over one bus; `active` are the open streams."""

    def __init__(self, *, bus: EventBus, limits: ServerLimits) -> None:
        self._bus, self.limits = bus, limits
        self.active: set[EventStream] = set()

    async def serve(self, request: web.Request, pattern: str, history: int) -> web.StreamResponse:
        if len(self.active) >= self.limits.max_event_streams:
            raise ApiError(
                503,
                "Busy",
                f"{len(self.active)} event streams are open, the most this orchestrator serves; "
                "close one (or retry shortly)",
            )
        # Subscribe before answering, so no event published after the 200 can be missed.
        replay, subscription = self._bus.follow(
            pattern,
            history=history,
            queue_size=self.limits.stream_queue_events,
            queue_bytes=self.limits.stream_queue_bytes,
        )
        stream = EventStream(pattern, replay, subscription, self.limits)
        self.active.add(stream)
        response = web.StreamResponse(headers=HEADERS)
        try:
            await response.prepare(request)
            await stream.run(response)
        except SubscriptionClosed:  # the bus closed: the orchestrator is stopping
            logger.debug("event stream %r ended: the bus closed", pattern)
        except TimeoutError:
            logger.info(
                "ended an event stream (%r) whose client read nothing for %g s",
                pattern,
                self.limits.stream_stall_timeout,
            )
            if request.transport is not None:  # not even the end of the response would get through
                request.transport.abort()
        except (ConnectionError, OSError):  # the client went away
            logger.debug("event stream %r: the client went away", pattern)
        finally:
            subscription.close()
            self.active.discard(stream)
        return response
