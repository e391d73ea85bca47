"""The lattice's event stream: recent history in a bounded JetStream stream, then live.

Every bus subject of the lattice (`names.bus(">")`) is captured by the stream
`orch_<lattice>_events` (file storage, at most HISTORY_EVENTS events and HISTORY_BYTES,
oldest dropped first), which the first host's LatticeBus creates. Publishers never wait
for it: they publish on core NATS, and the server stores what it captures.

`events(lattice, pattern, history)` is what `orch events --lattice` reads: the last
`history` events matching `pattern` from the stream (nothing when there is no stream yet),
then `{"live": True}`, then live events from a plain NATS subscription made before the
history was read (an event seen in both is given once; an event published in the
milliseconds before the call may be in neither: the server stores events asynchronously).
Each event is the control API's SSE event `{topic, payload, source, seq, timestamp_ms}` plus
`host`, the publishing host (`seq` counts per publishing host). A reader slower than the events loses the oldest of
them, counted and announced as `{"lost": {"dropped", "total"}}` before the events after
the gap, as over the control API. Messages on bus subjects that are not bus events
(published by something else) are skipped.

Used by orchestrator.lattice.bus (the envelope, the stream) and the CLI (`events`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig

from ..errors import GateError
from ..topics import split_pattern
from .connection import Lattice, barrier

logger = logging.getLogger(__name__)

HISTORY_EVENTS = 10_000
HISTORY_BYTES = 64 << 20
LIVE_QUEUE = 10_000
"""Live events a reader may fall behind by before the oldest are dropped (and announced)."""

FETCH_BATCH = 256
HISTORY_SECONDS = 10.0  # a backstop for reading the history


def stream_name(lattice: Lattice) -> str:
    return lattice.names.bucket("events")


@dataclass(frozen=True)
class Envelope:
    source: str
    host: str
    run: str
    seq: int
    timestamp_ms: int
    payload: Any


def parse_event(data: bytes) -> Envelope:
    """The bus event in a message body; ValueError when it is not one."""
    try:
        fields = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    source, host, run = fields.get("source"), fields.get("host"), fields.get("run")
    seq, timestamp = fields.get("seq"), fields.get("timestamp_ms")
    if not (isinstance(source, str) and isinstance(host, str) and isinstance(run, str)):
        raise ValueError("'source', 'host' and 'run' must be strings")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (seq, timestamp)):
        raise ValueError("'seq' and 'timestamp_ms' must be integers >= 0")
    assert isinstance(seq, int) and isinstance(timestamp, int)
    return Envelope(source, host, run, seq, timestamp, fields.get("payload"))


def event_dict(topic: str, envelope: Envelope) -> dict[str, Any]:
    """An event as `events()` yields it: the SSE event plus `host`."""
    return {
        "topic": topic,
        "payload": envelope.payload,
        "source": envelope.source,
        "seq": envelope.seq,
        "timestamp_ms": envelope.timestamp_ms,
        "host": envelope.host,
    }


async def ensure_history(lattice: Lattice, *, replicas: int = 1) -> bool:
    """Create the history stream unless it exists; False (and a warning) when JetStream
    refuses (the lattice then works without history)."""
    config = StreamConfig(
        name=stream_name(lattice),
        subjects=[lattice.names.bus(">")],
        description="recent bus events, for `orch events --lattice --history N`",
        max_msgs=HISTORY_EVENTS,
        max_bytes=HISTORY_BYTES,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        allow_direct=True,
    )
    try:
        await lattice.js.add_stream(config)
        return True
    except nats.js.errors.BadRequestError:  # it exists with another configuration: keep it
        return True
    except nats.errors.Error as error:
        logger.warning("lattice %s: no event history (%r)", lattice.names.name, error)
        return False


async def events(
    lattice: Lattice, pattern: str = ">", history: int = 0, *, queue_size: int = LIVE_QUEUE
) -> AsyncIterator[dict[str, Any]]:
    """The last `history` events matching `pattern`, `{"live": True}`, then live events
    (see the module docstring); `queue_size` live events at most wait for the reader.
    GateError for a malformed pattern or history."""
    split_pattern(pattern)
    if isinstance(history, bool) or not isinstance(history, int) or not 0 <= history <= HISTORY_EVENTS:
        raise GateError(f"history must be an integer from 0 to {HISTORY_EVENTS}, not {history!r}")
    names = lattice.names
    queue: deque[dict[str, Any]] = deque()
    arrived = asyncio.Event()
    dropped = 0

    async def on_message(msg: Msg) -> None:
        nonlocal dropped
        item = _item(lattice, msg)
        if item is None:
            return
        queue.append(item)
        if len(queue) > queue_size:
            queue.popleft()
            dropped += 1
        arrived.set()

    subscription = await lattice.nc.subscribe(names.bus(pattern), cb=on_message)
    try:
        await barrier(lattice.nc)
        seen: set[tuple[str, int]] = set()
        if history:
            for item in await recent(lattice, pattern, history):
                seen.add((item["host"], item["seq"]))
                yield item
        yield {"live": True}
        announced = 0
        while True:
            if not queue:
                arrived.clear()
                await arrived.wait()
                continue
            if dropped > announced:
                # counted before the yield: drops while the reader holds this notice go in the next
                notice = {"lost": {"dropped": dropped - announced, "total": dropped}}
                announced = dropped
                yield notice
            item = queue.popleft()
            if seen:
                key = (item["host"], item["seq"])
                if key in seen:
                    seen.discard(key)
                    continue
            yield item
    finally:
        try:
            await subscription.unsubscribe()
        except nats.errors.Error as error:
            logger.debug("events: unsubscribing: %r", error)


def _item(lattice: Lattice, msg: Msg) -> dict[str, Any] | None:
    try:
        return event_dict(lattice.names.topic_of(msg.subject), parse_event(msg.data))
    except ValueError as error:
        logger.debug("events: not a bus event on %s: %s", msg.subject, error)
        return None


async def recent(lattice: Lattice, pattern: str, count: int) -> list[dict[str, Any]]:
    """The last `count` events in the history stream that match `pattern`, oldest first."""
    js = lattice.js
    stream = stream_name(lattice)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return []
    except nats.errors.Error as error:
        logger.warning("events: the history of lattice %s cannot be read: %r", lattice.names.name, error)
        return []
    first, last = info.state.first_seq, info.state.last_seq
    if not info.state.messages or count <= 0:
        return []
    # Most readers want the latest few: start near the end, and from the start only if
    # the pattern is too sparse there.
    start = max(first, last - (count if pattern == ">" else 8 * count) + 1)
    try:
        async with asyncio.timeout(HISTORY_SECONDS):
            items = await _read(lattice, stream, pattern, start=start, last=last, count=count)
            if len(items) < count and start > first:
                items = await _read(lattice, stream, pattern, start=first, last=last, count=count)
    except (TimeoutError, nats.errors.Error) as error:
        logger.warning("events: reading the history of lattice %s failed: %r", lattice.names.name, error)
        return []
    return items


async def _read(
    lattice: Lattice, stream: str, pattern: str, *, start: int, last: int, count: int
) -> list[dict[str, Any]]:
    js = lattice.js
    subject = lattice.names.bus(pattern)
    name = "events_" + secrets.token_hex(8)
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=AckPolicy.NONE,
        filter_subject=subject,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    await js.add_consumer(stream, config=config)
    try:
        pull = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            if not (await pull.consumer_info()).num_pending:
                return []
            kept: deque[dict[str, Any]] = deque(maxlen=count)
            while True:
                batch = await pull.fetch(batch=FETCH_BATCH, timeout=2.0)
                for msg in batch:
                    meta = msg.metadata
                    if meta.sequence.stream > last:
                        return list(kept)
                    item = _item(lattice, msg)
                    if item is not None:
                        kept.append(item)
                    if meta.num_pending == 0 or meta.sequence.stream == last:
                        return list(kept)
        finally:
            await pull.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except nats.errors.Error as error:
            logger.debug("events: deleting consumer %s: %r", name, error)
