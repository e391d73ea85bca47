"""The events view's log: a virtual list of event lines (only the visible lines are ever
rendered, so thousands of events cost nothing until they are looked at), newest at the
bottom, with a cursor. It follows the newest event while the cursor is on the last line;
moving the cursor up (or scrolling up) stops following, `end` (or moving back down to the
last line) follows again. `enter` (or a double click) asks to expand the event under the
cursor (`EventLog.Expand`, handled by the events view).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from .feed import ERROR, WARNING, EventRow
from .format import Clock

LEVEL_MARK = {ERROR: ("✖", "red"), WARNING: ("▲", "yellow")}


def event_line(row: EventRow, clock: Clock, topic_width: int = 30) -> Text:
    """`14:03:27.120 ✖ orch.capsule.notes.failed    orch        {"phase": …}`: columns line up
    (a longer topic pushes its payload right), the mark and the topic carry the level."""
    mark, style = LEVEL_MARK.get(row.level, (" ", ""))
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(clock.hms(row.timestamp_ms) if row.timestamp_ms else " " * 12, style="dim")
    line.append(f" {mark} ", style=style)
    line.append(row.topic, style=f"bold {style}" if style else "bold")
    line.append(" " * max(1, topic_width - len(row.topic) + 1))
    line.append(f"{row.source:<10} ", style="dim")
    line.append(row.text[:2000])
    return line


class EventLog(ScrollView, can_focus=True):
    """The newest `capacity` matching events, newest at the bottom, and a cursor on one."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"event-log--cursor"}
    DEFAULT_CSS = """
    EventLog > .event-log--cursor {
        background: $block-cursor-blurred-background;
        color: $block-cursor-blurred-foreground;
    }
    EventLog:focus > .event-log--cursor {
        background: $block-cursor-background;
        color: $block-cursor-foreground;
        text-style: $block-cursor-text-style;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "expand", "Expand"),
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "first", "Oldest", show=False),
        Binding("end", "follow", "Follow", show=False),
    ]

    class Expand(Message):
        """Show this event in full."""

        def __init__(self, row: EventRow) -> None:
            super().__init__()
            self.row = row

    def __init__(self, clock: Clock, *, capacity: int = 2000, id: str | None = None) -> None:
        super().__init__(id=id)
        self.clock = clock
        self.rows: deque[EventRow] = deque(maxlen=capacity)
        self.follow = True  # the cursor stays on the newest line, and the newest line in view
        self.cursor = -1  # an index into rows; -1: none yet

    # -- content ---------------------------------------------------------------------------
    def append(self, rows: Iterable[EventRow]) -> None:
        new = list(rows)
        if not new:
            return
        overflow = max(0, len(self.rows) + len(new) - (self.rows.maxlen or 0))
        self.rows.extend(new)
        self.virtual_size = Size(self.size.width, len(self.rows))
        if self.follow:
            self.cursor = len(self.rows) - 1
            self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True)
        elif overflow:  # keep the lines being read in place while old ones fall out
            self.cursor = max(0, self.cursor - overflow)
            self.scroll_to(y=max(0, self.scroll_offset.y - overflow), animate=False, immediate=True)
        self.refresh()

    def replace(self, rows: Iterable[EventRow]) -> None:
        self.rows.clear()
        self.follow = True
        self.cursor = -1
        self.virtual_size = Size(self.size.width, 0)
        self.append(rows)
        self.refresh()

    @property
    def selected(self) -> EventRow | None:
        """The event under the cursor."""
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    # -- the cursor --------------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        if not self.rows:
            return
        start = self.cursor if 0 <= self.cursor < len(self.rows) else len(self.rows) - 1
        self._put_cursor(min(len(self.rows) - 1, max(0, start + delta)))

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(1, self.size.height - 1))

    def action_first(self) -> None:
        self.action_move(-len(self.rows))

    def action_follow(self) -> None:
        self.follow = True
        self.cursor = len(self.rows) - 1
        self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True)
        self.refresh()

    def action_expand(self) -> None:
        row = self.selected
        if row is not None:
            self.follow = False  # come back to this line, not to wherever the stream got to
            self.post_message(self.Expand(row))

    def _put_cursor(self, index: int) -> None:
        self.cursor = index
        self.follow = index == len(self.rows) - 1
        top, height = self.scroll_offset.y, self.size.height
        if index < top:
            self.scroll_to(y=index, animate=False, immediate=True)
        elif height and index >= top + height:
            self.scroll_to(y=index - height + 1, animate=False, immediate=True)
        self.refresh()

    def on_click(self, event: events.Click) -> None:
        index = self.scroll_offset.y + event.y
        if 0 <= index < len(self.rows):
            self._put_cursor(index)
            if event.chain >= 2:
                self.action_expand()

    # -- drawing ---------------------------------------------------------------------------
    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, len(self.rows))
        if self.follow:
            self.call_after_refresh(self.scroll_to, y=self.max_scroll_y, animate=False)

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        if new < self.max_scroll_y:
            self.follow = False  # scrolled up: keep the view where it is
        elif self.rows and self.cursor >= len(self.rows) - 1:
            self.follow = True  # back at the end with the cursor on the newest line

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        index = self.scroll_offset.y + y
        style = self.rich_style
        if index >= len(self.rows):
            return Strip.blank(width, style)
        line = event_line(self.rows[index], self.clock, 34 if width >= 110 else 26)
        line.truncate(width, overflow="ellipsis")
        if index == self.cursor:
            cursor = self.get_component_rich_style("event-log--cursor")
            line.stylize(cursor)  # over the line's own colours
            style = style + cursor  # and the rest of the row
        strip = Strip(line.render(self.app.console))
        return strip.crop_extend(0, width, style).apply_style(style)
