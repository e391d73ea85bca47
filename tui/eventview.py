"""One event in full (the events view's `enter`): topic, sequence number, source, time and
any other field the orchestrator sent, and the payload, pretty-printed JSON, scrollable.
`y` copies the JSON; escape returns to the events view, where it was.

A payload can be up to 1 MiB: the text shown is cut at MAX_CHARS (and says so), so that
drawing it never stalls the dashboard.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from rich.highlighter import JSONHighlighter
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Footer, Static

from .eventlog import LEVEL_MARK
from .feed import EventRow
from .format import Clock
from .shell import dash
from .widgets import COMMON_KEYS, DashScreen, TopBar

MAX_CHARS = 200_000
_FIELDS = ("topic", "seq", "source", "timestamp_ms", "payload")


def event_document(row: EventRow, clock: Clock) -> dict[str, Any]:
    """The event as one JSON object: its fields in a fixed order, the time spelled out."""
    document: dict[str, Any] = {"topic": row.topic, "seq": row.seq, "source": row.source}
    if row.timestamp_ms:
        document["time"] = clock.stamp(row.timestamp_ms)
        document["timestamp_ms"] = row.timestamp_ms
    for key, value in (row.raw or {}).items():
        if key not in _FIELDS:
            document.setdefault(str(key), value)
    document["payload"] = row.payload
    return document


def event_json(row: EventRow, clock: Clock) -> str:
    return json.dumps(event_document(row, clock), indent=2, ensure_ascii=False, default=str)


def event_text(row: EventRow, clock: Clock, limit: int = MAX_CHARS) -> Text:
    """The pretty-printed JSON, highlighted; at most `limit` characters of it."""
    document = event_json(row, clock)
    cut = len(document) - limit
    text = Text(document[:limit] if cut > 0 else document)
    JSONHighlighter().highlight(text)
    if cut > 0:
        text.append(f"\n… {cut:,} more characters not shown (`orch events` prints them all)", style="bold yellow")
    return text


class EventScreen(DashScreen):
    """Pushed over the events view by its `enter`."""

    BINDINGS: ClassVar[list[BindingType]] = [
        *COMMON_KEYS,
        Binding("escape", "back", "Back"),
        Binding("y", "copy", "Copy JSON"),
    ]

    def __init__(self, row: EventRow) -> None:
        super().__init__()
        self.row = row

    def compose(self) -> ComposeResult:
        clock = dash(self).clock
        row = self.row
        mark, style = LEVEL_MARK.get(row.level, ("", ""))
        title = Text()
        if mark:
            title.append(f"{mark} ", style=style)
        title.append(row.topic, style=f"bold {style}".strip())
        title.append(f"  #{row.seq}  from {row.source or '?'}", style="dim")
        if row.timestamp_ms:
            title.append(f"  {clock.hms(row.timestamp_ms)}  {clock.ago(row.timestamp_ms)}", style="dim")
        yield TopBar()
        yield Static(title, id="title")
        with VerticalScroll(id="event-body"):
            yield Static(event_text(row, clock), id="event-json")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#event-body", VerticalScroll).focus()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(event_json(self.row, dash(self).clock))
        self.notify("copied the event's JSON")
