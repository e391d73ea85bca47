"""Widgets shared by the dashboard's screens: the top bar (which orchestrator, which
revision, connected or not) and the event log (a virtual list: only the visible lines are
ever rendered, so thousands of events cost nothing until they are looked at).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.dom import DOMNode
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Static

from .feed import ERROR, WARNING, EventRow
from .format import Clock, duration, short_path

if TYPE_CHECKING:
    from .app import Dashboard


# first on every screen, so they stay in the footer of an 80-column terminal
COMMON_KEYS = [Binding("question_mark", "app.help", "Help"), Binding("q", "app.quit", "Quit")]


def dash(node: DOMNode) -> Dashboard:
    """The Dashboard app a widget or screen belongs to."""
    return cast("Dashboard", node.app)


class TopBar(Horizontal):
    """`◆ orch  …/config.yaml @ 3fa1c2 · config 9b07de… · up 5m          ● connected`."""

    def __init__(self) -> None:
        super().__init__()
        self.where = Static(id="where")
        self.link = Static(id="link")

    def compose(self) -> ComposeResult:
        yield self.where
        yield self.link

    def on_mount(self) -> None:
        app = dash(self)
        self.watch(app, "status", self._refresh_bar)
        self.watch(app, "connected", self._refresh_bar)
        self.watch(app, "problem", self._refresh_bar)

    def _refresh_bar(self, _: Any = None) -> None:
        app = dash(self)
        where = Text("◆ orch ", style="bold")
        if not app.connected:  # what is shown below is the last status seen, if any
            where.append(f"{app.problem}; retrying every {app.poll_interval:g} s", style="red")
            self.where.update(where)
            self.link.update(Text("✖ disconnected", style="bold red"))
            self.add_class("-down")
            return
        info = (app.status or {}).get("orchestrator", {})
        path = str(info.get("config_path") or app.where or "")
        width = max(16, self.size.width - 60) if self.size.width else 40
        where.append(short_path(path, width))
        if info.get("git_revision"):
            where.append(f" @ {info['git_revision']}", style="bold")
        if info.get("config_sha256"):
            where.append(f" · config {str(info['config_sha256'])[:12]}", style="dim")
        if "uptime_s" in info:
            where.append(f" · up {duration(float(info['uptime_s']))}", style="dim")
        self.where.update(where)
        self.link.update(Text("● connected", style="green"))
        self.remove_class("-down")


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
    """The newest `capacity` matching events, newest at the bottom; follows the end unless
    scrolled up."""

    def __init__(self, clock: Clock, *, capacity: int = 2000, id: str | None = None) -> None:
        super().__init__(id=id)
        self.clock = clock
        self.rows: deque[EventRow] = deque(maxlen=capacity)
        self.follow = True  # keep the newest line in view

    def append(self, rows: Iterable[EventRow]) -> None:
        new = list(rows)
        if not new:
            return
        overflow = max(0, len(self.rows) + len(new) - (self.rows.maxlen or 0))
        self.rows.extend(new)
        self.virtual_size = Size(self.size.width, len(self.rows))
        if self.follow:
            self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True)
        elif overflow:  # keep the lines being read in place while old ones fall out
            self.scroll_to(y=max(0, self.scroll_offset.y - overflow), animate=False, immediate=True)
        self.refresh()

    def replace(self, rows: Iterable[EventRow]) -> None:
        self.rows.clear()
        self.follow = True
        self.virtual_size = Size(self.size.width, 0)
        self.append(rows)
        self.refresh()

    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, len(self.rows))
        if self.follow:
            self.call_after_refresh(self.scroll_to, y=self.max_scroll_y, animate=False)

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        self.follow = new >= self.max_scroll_y  # scrolled up: stop following; back at the end: follow

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        index = self.scroll_offset.y + y
        style = self.rich_style
        if index >= len(self.rows):
            return Strip.blank(width, style)
        line = event_line(self.rows[index], self.clock, 34 if width >= 110 else 26)
        line.truncate(width, overflow="ellipsis")
        strip = Strip(line.render(self.app.console))
        return strip.crop_extend(0, width, style).apply_style(style)
