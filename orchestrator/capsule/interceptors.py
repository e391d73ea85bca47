"""Bus events delivered to a capsule's interceptors, each event once, in priority order.

A task reads the capsule's bus subscriptions and, for each event, calls every matching
interceptor's action (lower priority first) with the event as JSON `{topic, payload,
source, seq, timestamp_ms}`. It remembers the last event it finished with, so a newer
version of the capsule picks up exactly where this one stopped (`start(after_seq=...)`,
`stop()` returns it after finishing the event being handled): no event is lost or handled
twice across a reload.

Subscriptions: one per distinct interceptor pattern (a pattern another one covers shares
its subscription), each with a queue of `queue_size` events (`INTERCEPTOR_QUEUE` by
default), so unrelated events never take their space. Their events are merged back into
bus-sequence order: each round reads `bus.last_seq`, then drains every subscription; a
drain takes the bus lock, so every event up to that seq is in the queues by then, and only
those are handled in the round (later ones wait for the next). An event two patterns match
is handled once.

Losses are counted and announced, never silent: a subscription whose queue is full loses
its oldest event (the bus counts it). `lost` is the total; each new loss is published as
`orch.capsule.<name>.events_lost` `{capsule, lost, total}` (`lost` since the last
announcement, `total` so far) and logged, at most once per `report_interval` (the first at
once, later ones summed). The count is exact when no two patterns partly overlap (`a.*` and
`*.b`); when they do, an event both queues lost counts twice.

Failures (a trap, out of fuel, a timeout, a denied capability) are published as
`orch.capsule.<name>.interceptor_failed` `{capsule, action, event, error, failures, total,
retry_in_s}` and logged, rate-limited the same way (`failures` since the last report). A
failing capsule backs off: after a failure, the next event waits `backoff_base` seconds,
doubling with each failure in a row up to `backoff_max`; a success resets it. Events that
arrive meanwhile wait in the queue, or are lost (and announced) when it overflows. A
capsule's own failure events (its `interceptor_failed` and `events_lost`) are never
delivered back to it, so an interceptor on `orch.capsule.>` cannot feed on its own failures.

Used by orchestrator.capsule.capsule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..desired.manifest import Interceptor
from ..errors import OrchestratorError
from ..topics import pattern_covers, topic_matches
from .bus import Event, EventBus, Subscription, SubscriptionClosed

logger = logging.getLogger(__name__)

RunExport = Callable[[str, bytes], Awaitable[Any]]

INTERCEPTOR_QUEUE = 8192
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 30.0
REPORT_INTERVAL_S = 1.0
HANDOVER_MAX = 100_000
"""At most this many events of the bus history are queued for a newer version at handover."""


def subscription_patterns(patterns: Sequence[str]) -> list[str]:
    """The distinct patterns, without those another one covers (its subscription has them)."""
    distinct = sorted(set(patterns))
    return [p for p in distinct if not any(q != p and pattern_covers(q, p) for q in distinct)]


class _Throttle:
    """Announces counted things at most once per `interval`: the first at once, those that
    come meanwhile summed into one announcement when the interval ends."""

    def __init__(
        self, *, interval: float, clock: Callable[[], float], announce: Callable[[int, dict[str, Any]], None]
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._announce = announce
        self._pending = 0
        self._detail: dict[str, Any] = {}
        self._last = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def add(self, count: int, detail: dict[str, Any]) -> None:
        self._pending += count
        self._detail = detail
        wait = self._last + self._interval - self._clock()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            count, self._pending = self._pending, 0
            self._last = self._clock()
            self._announce(count, self._detail)


class InterceptorRunner:
    """Delivers the events matching `interceptors` to `run(action, event_json)`.

    Counters for status: `calls` (actions run), `failures`, `lost` (events that never
    reached the interceptors because a queue overflowed).
    """

    def __init__(
        self,
        *,
        name: str,
        interceptors: Sequence[Interceptor],
        bus: EventBus,
        run: RunExport,
        queue_size: int = INTERCEPTOR_QUEUE,
        backoff_base: float = BACKOFF_BASE_S,
        backoff_max: float = BACKOFF_MAX_S,
        report_interval: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self._interceptors = sorted(interceptors, key=lambda i: i.priority)
        self._patterns = subscription_patterns([i.event for i in self._interceptors])
        self._own = frozenset(f"orch.capsule.{name}.{what}" for what in ("interceptor_failed", "events_lost"))
        self._bus = bus
        self._run = run
        self._queue_size = queue_size
        self._backoff_base, self._backoff_max = backoff_base, backoff_max
        self._clock = clock
        self._sleep = sleep
        self.calls = 0
        self.failures = 0
        self.lost = 0
        self._streak = 0  # failures in a row
        self._retry_at = 0.0
        self._subscriptions: list[Subscription] = []
        self._pending: dict[int, Event] = {}  # drained, not yet handled, by seq
        self._dropped_seen = 0
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # inside an event's actions: stop() lets it finish
        self._stopping = False
        self._nudge = asyncio.Event()
        self._progress = asyncio.Event()
        self._handled_seq = 0  # the last bus event the interceptors finished with
        self._lost_report = _Throttle(interval=report_interval, clock=clock, announce=self._announce_lost)
        self._failure_report = _Throttle(interval=report_interval, clock=clock, announce=self._announce_failures)

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def patterns(self) -> list[str]:
        """The patterns subscribed to (one subscription each)."""
        return list(self._patterns)

    def start(self, after_seq: int | None = None) -> None:
        """Start delivering. With `after_seq`, begin with the events after that sequence
        number still in the bus history (a newer version picks up where the old stopped)."""
        if not self._interceptors or self._task is not None:
            return
        history = 0
        if after_seq is not None:
            history = max(0, self._bus.last_seq - after_seq)
            self._handled_seq = after_seq
            self._check_history(after_seq, history)
        size = max(self._queue_size, min(history, HANDOVER_MAX))
        self._subscriptions = [self._bus.subscribe(p, queue_size=size, history=history) for p in self._patterns]
        self._pending, self._dropped_seen, self._stopping = {}, 0, False
        self._task = asyncio.get_running_loop().create_task(self._deliver(), name=f"interceptors-{self.name}")

    def _check_history(self, after_seq: int, history: int) -> None:
        """Warn when events after `after_seq` already left the bus history (a long handover)."""
        recorded = self._bus.history() if history else []
        oldest = recorded[0].seq if recorded else after_seq + 1
        if oldest > after_seq + 1:
            logger.warning(
                "capsule %s: events %d to %d left the bus history before this version started; "
                "those its interceptors match are lost",
                self.name,
                after_seq + 1,
                oldest - 1,
            )

    async def stop(self) -> int:
        """Stop delivering (after the event being handled); return the last event handled."""
        self._stopping = True
        for subscription in self._subscriptions:
            subscription.close()
        task, self._task = self._task, None
        if task is not None:
            if not self._busy:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._account_losses()
        self._lost_report.flush()
        self._failure_report.flush()
        self._progress.set()
        return self._handled_seq

    def matching(self, topic: str) -> list[Interceptor]:
        return [i for i in self._interceptors if topic_matches(i.event, topic)]

    async def caught_up(self, seq: int) -> None:
        """Return once every event up to bus sequence `seq` is handled (at once when not
        running)."""
        self._nudge.set()  # an idle runner takes a round: events up to `seq` may match nothing
        while self._task is not None and not self._task.done() and self._handled_seq < seq:
            await self._progress.wait()

    # -- the delivery loop ---------------------------------------------------------------
    async def _deliver(self) -> None:
        try:
            await self._rounds()
        finally:
            self._progress.set()  # wake caught_up() waiters: nothing more will be handled

    async def _rounds(self) -> None:
        while True:
            mark = self._bus.last_seq  # every event up to it is queued once a drain has the lock
            for subscription in self._subscriptions:
                for event in subscription.drain():
                    self._pending.setdefault(event.seq, event)
            self._account_losses()
            for seq in sorted(s for s in self._pending if s <= mark):
                event = self._pending.pop(seq)
                if seq > self._handled_seq:
                    await self._handle(event)
                if self._stopping:
                    return
            self._advance(mark)
            if not self._pending and not await self._wait():
                return

    async def _wait(self) -> bool:
        """Wait for an event on any subscription (or a nudge); False once they are closed."""
        getters = [asyncio.ensure_future(s.get()) for s in self._subscriptions]
        nudged = asyncio.ensure_future(self._nudge.wait())
        try:
            await asyncio.wait([*getters, nudged], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (*getters, nudged):
                waiting.cancel()
            results = await asyncio.gather(*getters, nudged, return_exceptions=True)
            self._nudge.clear()
        closed = False
        for result in results:
            if isinstance(result, Event):
                self._pending.setdefault(result.seq, result)
            elif isinstance(result, SubscriptionClosed):
                closed = True
        return not closed

    async def _handle(self, event: Event) -> None:
        matching = [] if event.topic in self._own else self.matching(event.topic)
        if not matching:
            self._advance(event.seq)
            return
        try:
            data = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as error:  # a payload no guest could read
            logger.warning("capsule %s: event %d is not JSON-encodable: %s", self.name, event.seq, error)
            self._advance(event.seq)
            return
        wait = self._retry_at - self._clock()
        if wait > 0:
            await self._sleep(wait)  # backing off after a failure; events wait in the queue
        self._busy = True
        try:
            for interceptor in matching:
                self.calls += 1
                try:
                    await self._run(interceptor.action, data)
                except OrchestratorError as error:
                    self._failed(interceptor, event, error)
                else:
                    self._streak, self._retry_at = 0, 0.0
            self._advance(event.seq)
        finally:
            self._busy = False

    def _advance(self, seq: int) -> None:
        if seq > self._handled_seq:
            self._handled_seq = seq
            progress, self._progress = self._progress, asyncio.Event()
            progress.set()

    # -- failures and losses ---------------------------------------------------------------
    def _failed(self, interceptor: Interceptor, event: Event, error: OrchestratorError) -> None:
        self.failures += 1
        self._streak += 1
        delay = min(self._backoff_base * 2 ** (self._streak - 1), self._backoff_max)
        self._retry_at = self._clock() + delay
        detail = {"action": interceptor.action, "event": event.seq, "error": str(error), "retry_in_s": delay}
        self._failure_report.add(1, detail)

    def _announce_failures(self, count: int, detail: dict[str, Any]) -> None:
        logger.warning(
            "capsule %s: interceptor %s failed on event %d: %s (%d failure(s) since the last report, "
            "%d in all; next call in %.3g s)",
            self.name,
            detail["action"],
            detail["event"],
            detail["error"],
            count,
            self.failures,
            detail["retry_in_s"],
        )
        payload = {"capsule": self.name, **detail, "failures": count, "total": self.failures}
        self._bus.publish(f"orch.capsule.{self.name}.interceptor_failed", payload)

    def _account_losses(self) -> None:
        dropped = sum(s.dropped for s in self._subscriptions)
        if dropped > self._dropped_seen:
            self.lost += dropped - self._dropped_seen
            self._lost_report.add(dropped - self._dropped_seen, {})
            self._dropped_seen = dropped

    def _announce_lost(self, count: int, detail: dict[str, Any]) -> None:
        logger.warning(
            "capsule %s: %d event(s) lost before its interceptors saw them (%d in all): its queue of "
            "%d events was full; the interceptors are slower than the events they match",
            self.name,
            count,
            self.lost,
            self._queue_size,
        )
        payload = {"capsule": self.name, "lost": count, "total": self.lost}
        self._bus.publish(f"orch.capsule.{self.name}.events_lost", payload)
