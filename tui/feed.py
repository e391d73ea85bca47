"""The live bus on the dashboard's side: a bounded buffer between the event-stream worker
and the events view, and the filters the view applies.

The worker calls `EventFeed.add` for every event as it arrives (cheap: no formatting); the
view pulls what is new a few times a second (`EventFeed.since`), so a flood of 10,000
events a second costs one list slice per frame, not one repaint per event. The buffer is
bounded: the oldest events fall out, and a view that fell further behind than the buffer
holds is told how many it missed. Pure Python: no Textual, no I/O.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.topics import TopicError, split_pattern, tokens_match

INFO, WARNING, ERROR = 0, 1, 2

_ERROR_ENDINGS = (".failed", ".build_failed", ".interceptor_failed")
_ERROR_TOPICS = frozenset({"orch.reconcile.rejected", "orch.audit.denied"})
LOST_TOPIC = "(lost)"
RESTART_TOPIC = "(restarted)"


def severity(topic: str, payload: Any) -> int:
    """ERROR for failures, denials and rejected configs; WARNING for degraded capsules, a
    reconcile that left capsules failing, changes waiting for approval or rejected by the
    operator, and loss notices; INFO otherwise."""
    if topic in _ERROR_TOPICS or (topic.startswith("orch.") and topic.endswith(_ERROR_ENDINGS)):
        return ERROR
    if topic.startswith("orch."):
        if topic.endswith((".degraded", ".awaitingapproval")) or topic == "orch.audit.rejected":
            return WARNING
        if topic == "orch.audit.escalation" and isinstance(payload, dict) and payload.get("granted_by") is None:
            return WARNING  # a change waits for the operator
        finished = topic == "orch.reconcile.finished" and isinstance(payload, dict)
        if finished and (payload.get("failing") or payload.get("awaiting")):
            return WARNING
    if topic in (LOST_TOPIC, RESTART_TOPIC):
        return WARNING
    return INFO


class EventRow:
    """One event as the view shows it; the payload's JSON text is made on first use."""

    __slots__ = ("_text", "level", "payload", "raw", "seq", "source", "timestamp_ms", "topic")

    def __init__(
        self, topic: str, payload: Any, source: str, seq: int, timestamp_ms: int, *, raw: dict[str, Any] | None = None
    ) -> None:
        self.topic, self.payload, self.source = topic, payload, source
        self.seq, self.timestamp_ms = seq, timestamp_ms
        self.raw = raw  # the event as received (its other fields show when it is expanded)
        self.level = severity(topic, payload)
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            if isinstance(self.payload, str) and self.topic.startswith("("):
                self._text = self.payload
            else:
                self._text = json.dumps(self.payload, ensure_ascii=False, separators=(", ", ": "), default=str)
        return self._text


TopicPatternError = TopicError  # a topic filter that is not a NATS pattern (the message says why)


def parse_pattern(pattern: str) -> tuple[str, ...]:
    """`orch.capsule.*.failed` -> its tokens, checked by the orchestrator's own topic rules
    (`*` a whole token, `>` the whole last token); TopicPatternError naming the broken rule."""
    return split_pattern(pattern.strip())


def topic_matches(tokens: tuple[str, ...], topic: str) -> bool:
    """Whether `topic` matches the parsed pattern `tokens` (NATS subject rules)."""
    return tokens_match(tokens, topic.split("."))


@dataclass(frozen=True)
class EventFilter:
    """What the events view shows: a topic pattern, a text search, warnings and errors only."""

    pattern: tuple[str, ...] = (">",)
    search: str = ""
    problems_only: bool = False

    def accepts(self, row: EventRow) -> bool:
        if self.problems_only and row.level == INFO:
            return False
        if self.pattern != (">",) and not row.topic.startswith("(") and not topic_matches(self.pattern, row.topic):
            return False
        if self.search:
            needle = self.search.casefold()
            return needle in row.topic.casefold() or needle in row.source.casefold() or needle in row.text.casefold()
        return True

    def select(self, rows: Iterable[EventRow]) -> list[EventRow]:
        if self == EventFilter():
            return list(rows)
        return [row for row in rows if self.accepts(row)]


class EventFeed:
    """Every event received, newest last, at most `capacity` of them."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.rows: deque[EventRow] = deque(maxlen=capacity)
        self.received = 0  # rows ever added: a view's cursor into the feed
        self.lost = 0  # events the orchestrator dropped for this dashboard (too slow)
        self.last_seq = 0
        self.last_ms = 0  # the timestamp of the newest event
        self.last_reload_ms: dict[str, int] = {}

    def add(self, item: dict[str, Any]) -> None:
        """One item from `Client.events`: an event, or a loss notice `{"lost": {...}}`."""
        lost = item.get("lost")
        if lost is not None:
            dropped = int(lost.get("dropped", 0))
            self.lost += dropped
            text = f"{dropped} event(s) lost: the dashboard fell behind ({self.lost} in all)"
            self._append(EventRow(LOST_TOPIC, text, "dashboard", 0, 0))
            return
        seq, timestamp_ms = int(item.get("seq", 0)), int(item.get("timestamp_ms", 0))
        if seq <= self.last_seq:
            if timestamp_ms <= self.last_ms:  # a reopened stream starts with history we have seen
                return
            # an old number on a newer event: another orchestrator, whose numbers start again
            self.last_reload_ms.clear()
            self._append(EventRow(RESTART_TOPIC, "the orchestrator restarted", "dashboard", 0, 0))
        self.last_seq, self.last_ms = seq, max(self.last_ms, timestamp_ms)
        topic = str(item.get("topic", ""))
        row = EventRow(topic, item.get("payload"), str(item.get("source", "")), seq, timestamp_ms, raw=item)
        if topic.startswith("orch.capsule.") and topic.endswith(".reloaded"):
            self.last_reload_ms[topic[13:-9]] = row.timestamp_ms
        self._append(row)

    def _append(self, row: EventRow) -> None:
        self.rows.append(row)
        self.received += 1

    def since(self, cursor: int) -> tuple[list[EventRow], int]:
        """The rows added after `cursor` (a past `received`) and how many of them already fell
        out of the buffer."""
        new = self.received - cursor
        if new <= 0:
            return [], 0
        kept = min(new, len(self.rows))
        start = len(self.rows) - kept
        if kept < 64:
            return [self.rows[i] for i in range(start, len(self.rows))], new - kept
        return list(self.rows)[start:], new - kept
