"""A plugin's WASI stdout and stderr, logged one complete line at a time.

Guests write in pieces: a Go panic arrives as a few dozen `fd_write` calls ("panic: ", the
message, "\\n", "goroutine 1 [running]:", ...), and logging each piece made one panic
twenty log records. A `LineLog` (one per instance and stream) buffers a partial line,
logs each complete line once, cuts a line longer than LINE_LIMIT bytes (logging its start,
marked as cut, and dropping the rest up to the next newline, so the buffer never holds
more than LINE_LIMIT bytes), and `flush()` logs what is left when a call ends.

Used by orchestrator.engine.plugin (which makes them) and .instance (which flushes them).
"""

from __future__ import annotations

import logging

LINE_LIMIT = 4096


class LineLog:
    """Collects one output stream into lines and logs each as `"<stream>: <line>"`."""

    __slots__ = ("_buffer", "_cut", "_level", "_log", "_stream")

    def __init__(self, log: logging.Logger, level: int, stream: str) -> None:
        self._log = log
        self._level = level
        self._stream = stream
        self._buffer = bytearray()
        self._cut = False  # the current line passed LINE_LIMIT: drop the rest of it

    def write(self, data: bytes) -> None:
        """What the guest wrote (any piece of any number of lines)."""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._take(data[start:] if start else data)
                return
            self._take(data[start:end])
            self._emit()
            start = end + 1

    def flush(self) -> None:
        """Log the partial line left, if any (the call ended without a final newline)."""
        if self._buffer or self._cut:
            self._emit()

    def _take(self, piece: bytes) -> None:
        if self._cut or not piece:
            return
        room = LINE_LIMIT - len(self._buffer)
        if len(piece) > room:
            self._buffer += piece[:room]
            self._cut = True
        else:
            self._buffer += piece

    def _emit(self) -> None:
        line = bytes(self._buffer).rstrip(b"\r")
        cut = self._cut
        self._buffer.clear()
        self._cut = False
        if not line.strip() or not self._log.isEnabledFor(self._level):
            return
        text = line.decode("utf-8", "replace")
        if cut:
            self._log.log(self._level, "%s: %s [line cut at %d bytes]", self._stream, text, LINE_LIMIT)
        else:
            self._log.log(self._level, "%s: %s", self._stream, text)
