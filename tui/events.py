"""The events view: the live bus, newest at the bottom.

A topic-pattern filter (NATS syntax: `orch.capsule.>`), a text search, a warnings-and-errors
toggle, pause/resume (events keep arriving while paused: they are buffered and counted, and
shown on resume) and the loss counter; a cursor on one event, and `enter` shows it in full
(tui.eventview). Rendering is coalesced: a timer pulls what is new
from the app's bounded feed a few times a second and appends it to a virtual log, so a
flood of 10,000 events a second keeps the keyboard responsive.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Footer, Input, Label, Static

from .eventlog import EventLog
from .eventview import EventScreen
from .feed import EventFilter, EventRow, TopicPatternError, parse_pattern
from .shell import dash
from .widgets import COMMON_KEYS, DashScreen, TopBar

SHOWN = 2000  # events kept on screen (the feed keeps more)


class EventsScreen(DashScreen):
    """Installed once by the app, so its filters survive leaving and coming back."""

    BINDINGS: ClassVar[list[BindingType]] = [
        *COMMON_KEYS,
        Binding("escape", "back", "Back"),
        Binding("space", "pause", "Pause/resume"),
        Binding("t", "topic", "Topic"),
        Binding("slash", "search", "Search"),
        Binding("w", "problems", "Warn+errors"),
        Binding("c", "clear", "Clear"),
        Binding("end", "follow", "Follow", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter = EventFilter()
        self.paused = False
        self.cursor = 0  # the feed's `received` when we last pulled
        self.missed = 0  # events that fell out of the feed before we could show them
        self.pattern_problem = ""

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Static(id="event-stats")
        with Horizontal(id="event-filters"):
            yield Label("topic")
            yield Input(placeholder=">", id="topic")
            yield Label("search")
            yield Input(placeholder="text in topic, source or payload", id="search")
        yield EventLog(dash(self).clock, capacity=SHOWN, id="event-log")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._frames = self.set_interval(dash(self).frame_interval, self._frame, pause=True)
        self.query_one(EventLog).focus()

    def on_screen_resume(self) -> None:
        self._frame()
        self._frames.resume()

    def on_screen_suspend(self) -> None:
        self._frames.pause()  # nobody looks: the feed keeps buffering, bounded

    # -- frames ----------------------------------------------------------------------------
    def _frame(self) -> None:
        """Pull what arrived since the last frame (unless paused) and show it."""
        if not self.paused:
            feed = dash(self).feed
            rows, missed = feed.since(self.cursor)
            self.cursor = feed.received
            self.missed += missed
            if rows:
                self.query_one(EventLog).append(self.filter.select(rows)[-SHOWN:])
        self._show_stats()

    def _rebuild(self) -> None:
        """The filter changed: show the matching events the feed still holds."""
        feed = dash(self).feed
        pending = feed.received - self.cursor
        rows = list(feed.rows)
        if pending > 0:  # paused: what came after the pause stays buffered
            rows = rows[: max(0, len(rows) - pending)]
        self.query_one(EventLog).replace(self.filter.select(rows)[-SHOWN:])
        self._show_stats()

    def _show_stats(self) -> None:
        feed = dash(self).feed
        log = self.query_one(EventLog)
        line = Text()
        if self.paused:
            line.append(f"⏸ PAUSED: {feed.received - self.cursor:,} buffered", style="bold yellow")
        else:
            line.append("▶ live", style="green")
        line.append(f"  ·  {feed.received:,} received  ·  {len(log.rows):,} shown")
        line.append(f"  ·  lost {feed.lost:,}", style="bold red" if feed.lost else "dim")
        if self.missed:
            line.append(f"  ·  {self.missed:,} not shown (buffer full)", style="yellow")
        if self.filter.problems_only:
            line.append("  ·  warnings+errors only", style="yellow")
        if self.pattern_problem:
            line.append(f"  ·  topic: {self.pattern_problem}", style="red")
        if not log.follow and log.rows:
            below = len(log.rows) - 1 - max(0, log.cursor)
            line.append(f"  ·  {below:,} newer below (end: follow)" if below else "  ·  end: follow", style="cyan")
        self.query_one("#event-stats", Static).update(line)

    # -- filters ---------------------------------------------------------------------------
    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "topic":
            try:
                pattern = parse_pattern(event.value) if event.value.strip() else (">",)
            except TopicPatternError as error:
                self.pattern_problem = str(error)
                event.input.add_class("-invalid")
                self._show_stats()
                return
            self.pattern_problem = ""
            event.input.remove_class("-invalid")
            self._set_filter(EventFilter(pattern, self.filter.search, self.filter.problems_only))
        elif event.input.id == "search":
            self._set_filter(EventFilter(self.filter.pattern, event.value.strip(), self.filter.problems_only))

    def _set_filter(self, new: EventFilter) -> None:
        if new != self.filter:
            self.filter = new
            self._rebuild()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(EventLog).focus()

    def action_topic(self) -> None:
        self.query_one("#topic", Input).focus()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_problems(self) -> None:
        f = self.filter
        self._set_filter(EventFilter(f.pattern, f.search, not f.problems_only))

    # -- the stream ------------------------------------------------------------------------
    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self._frame()
        self._show_stats()

    def action_clear(self) -> None:
        self.cursor = dash(self).feed.received
        self.missed = 0
        self.query_one(EventLog).replace([])
        self._show_stats()

    def action_follow(self) -> None:
        self.query_one(EventLog).action_follow()
        self._show_stats()

    def on_event_log_expand(self, message: EventLog.Expand) -> None:
        self.app.push_screen(EventScreen(message.row))

    def action_back(self) -> None:
        focused = self.focused
        if isinstance(focused, Input):
            self.query_one(EventLog).focus()
        else:
            self.app.pop_screen()

    def visible_rows(self) -> list[EventRow]:
        """The events the log holds now, oldest first."""
        return list(self.query_one(EventLog).rows)
