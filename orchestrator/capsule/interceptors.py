"""Bus events delivered to a capsule's interceptors, each event once, in priority order.

A task takes the capsule's bus subscription and, for each event, calls every matching
interceptor's action (lower priority first) with the event as JSON `{topic, payload,
source, seq, timestamp_ms}`. It remembers the last event it finished with, so a newer
version of the capsule picks up exactly where this one stopped (`start(after_seq=...)`): no
event is lost or handled twice across a reload.

Used by orchestrator.capsule.capsule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..desired.manifest import Interceptor
from ..errors import OrchestratorError
from ..topics import topic_matches
from .bus import Event, EventBus, Subscription

logger = logging.getLogger(__name__)

RunExport = Callable[[str, bytes], Awaitable[Any]]


class InterceptorRunner:
    """Delivers the events matching `interceptors` to `run(action, event_json)`."""

    def __init__(self, *, name: str, interceptors: Sequence[Interceptor], bus: EventBus, run: RunExport) -> None:
        self.name = name
        self._interceptors = sorted(interceptors, key=lambda i: i.priority)
        self._bus = bus
        self._run = run
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._handled_seq = 0  # the last bus event the interceptors finished with
        self._handled = asyncio.Condition()

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, after_seq: int | None = None) -> None:
        """Start delivering. With `after_seq`, begin with the events after that sequence
        number still in the bus history (a newer version picks up where the old stopped)."""
        if not self._interceptors or self._task is not None:
            return
        if after_seq is None:
            self._subscription = self._bus.subscribe(">")
        else:
            self._subscription = self._bus.subscribe(">", history=self._bus.last_seq - after_seq)
            self._handled_seq = after_seq
        self._task = asyncio.get_running_loop().create_task(self._deliver(), name=f"interceptors-{self.name}")

    async def stop(self) -> int:
        """Stop delivering (after the event being handled); return the last event handled."""
        if self._subscription is not None:
            self._subscription.close()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with self._handled:
                self._handled.notify_all()
        return self._handled_seq

    def matching(self, topic: str) -> list[Interceptor]:
        return [i for i in self._interceptors if topic_matches(i.event, topic)]

    async def caught_up(self, seq: int) -> None:
        """Return once every event up to bus sequence `seq` is handled (at once when not
        running)."""
        if self._task is None:
            return
        async with self._handled:
            await self._handled.wait_for(lambda: self._handled_seq >= seq or self._task is None)

    async def _deliver(self) -> None:
        assert self._subscription is not None
        async for event in self._subscription:
            if event.seq <= self._handled_seq:
                continue  # handled by the previous version
            await self._intercept(event)
            async with self._handled:
                self._handled_seq = event.seq
                self._handled.notify_all()

    async def _intercept(self, event: Event) -> None:
        matching = self.matching(event.topic)
        if not matching:
            return
        try:
            data = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as error:  # a payload no guest could read
            logger.warning("capsule %s: event %d is not JSON-encodable: %s", self.name, event.seq, error)
            return
        for interceptor in matching:
            try:
                await self._run(interceptor.action, data)
            except OrchestratorError as error:
                logger.warning("capsule %s: interceptor %s failed: %s", self.name, interceptor.action, error)
                failure = {"capsule": self.name, "action": interceptor.action, "event": event.seq, "error": str(error)}
                self._bus.publish(f"orch.capsule.{self.name}.interceptor_failed", failure)
