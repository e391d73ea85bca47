"""Rate-limited warnings: one place for "say it, but not a thousand times a second".

A failing capsule, a flood of malformed requests or a client that keeps getting refused
would otherwise fill the log. `Throttle.warning(kind, ...)` logs a kind of warning at most
once per interval; the next one that gets through says how many were held back. Thread-safe
enough for its use (a lost count under a race only under-reports what was held back).

Used by the control API and the capsule layer. Imports nothing of ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Throttle:
    """Warnings of each kind at most once per `interval` seconds; the next one that gets
    through says how many were held back."""

    def __init__(self, log: logging.Logger, *, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._interval, self._clock = log, interval, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            message += " (and %d more like it since the last such warning)"
            args = (*args, held)
        self._log.warning(message, *args)
