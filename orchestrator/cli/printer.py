"""Lines to standard output without ever blocking the event loop.

`orch up` prints every bus event (text or JSON lines). When stdout is a pipe whose reader
stopped reading, a plain `write` blocks once the pipe is full, and the whole orchestrator
with it. `LinePrinter.write` only puts the line in a bounded queue; a daemon thread writes
the queue to the file descriptor (unbuffered, so nothing is left in a Python buffer that
could block the interpreter's exit). When the queue is full the line is dropped and
counted, and the loss is announced on stderr once the writer catches up (at most once a
second). Used by orchestrator.cli.up.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time

QUEUE_LINES = 10_000
ANNOUNCE_SECONDS = 1.0


class LinePrinter:
    """A non-blocking writer of text lines to `fd` (standard output by default)."""

    def __init__(self, fd: int | None = None, *, capacity: int = QUEUE_LINES) -> None:
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self.dropped = 0
        self._announced = 0
        self._last_notice = 0.0
        self._broken = False
        self._thread = threading.Thread(target=self._drain, name="stdout-printer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """Queue `line` (a newline is added); drop and count it if the reader is behind."""
        if self._broken:
            return
        try:
            self._queue.put_nowait((line + "\n").encode("utf-8", "replace"))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most `timeout` for a stalled reader), then stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                _write_all(self._fd, data)
            except OSError:  # the reader went away (EPIPE): nothing more can be shown
                self._broken = True
                return
            self._announce()

    def _announce(self) -> None:
        with self._lock:
            lost = self.dropped - self._announced
            now = time.monotonic()
            if not lost or now - self._last_notice < ANNOUNCE_SECONDS:
                return
            self._announced, self._last_notice = self.dropped, now
        with contextlib.suppress(OSError):
            message = f"orch: {lost} output line(s) dropped: the reader of standard output fell behind\n"
            _write_all(sys.stderr.fileno(), message.encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
