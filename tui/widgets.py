"""What every screen of the dashboard shares: the screen base class (`DashScreen`: while a
text field has the focus, the footer offers no key that would only type into it), the keys
on every screen, and the top bar (which orchestrator, which revision, whether its config
was accepted, connected or not).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import ActiveBinding, Binding
from textual.containers import Horizontal
from textual.keys import key_to_character
from textual.screen import Screen
from textual.widgets import Input, Static

from .format import duration, lattice_of, lattice_text, short_path
from .health import header, read_health
from .shell import dash

# first on every screen, so they stay in the footer of an 80-column terminal; `!` shows only
# while the desired state has problems (see DashScreen.active_bindings)
COMMON_KEYS = [
    Binding("exclamation_mark", "app.problems", "Problems"),
    Binding("question_mark", "app.help", "Help"),
    Binding("q", "app.quit", "Quit"),
]
# key names whose character textual.keys.key_to_character does not give back
_NAMED = {"plus": "+", "minus": "-", "slash": "/", "at": "@", "backslash": "\\", "underscore": "_"}


def typed_character(key: str) -> str | None:
    """The character `key` types into a text field; None for enter, escape, tab, arrows and
    anything with ctrl or alt."""
    character = _NAMED.get(key) or key_to_character(key)
    return character if character is not None and character.isprintable() else None


class DashScreen(Screen[None]):
    """A dashboard screen. While a text field has the focus, every printable key types into
    it (Textual's Input consumes them before any binding is looked up), so the footer drops
    the bindings of printable keys then, and calls escape what it does: leave the field."""

    @property
    def active_bindings(self) -> dict[str, ActiveBinding]:
        bindings = super().active_bindings
        if not dash(self).troubled:
            bindings = {k: b for k, b in bindings.items() if b.binding.action != "app.problems"}
        if not isinstance(self.focused, Input):
            return bindings
        shown = {key: b for key, b in bindings.items() if typed_character(key) is None}
        if "escape" in shown:
            escape = shown["escape"]
            shown["escape"] = escape._replace(binding=dataclasses.replace(escape.binding, description="Leave field"))
        return shown


class TopBar(Horizontal):
    """`◆ orch  …/config.yaml @ 3fa1c2 · config 9b07de… · up 5m   config accepted 12:04:31   ● connected`
    (on a lattice, first: `lattice prod r12 · 2/3 hosts · scheduler host-a · `)."""

    def __init__(self) -> None:
        super().__init__()
        self.where = Static(id="where")
        self.desired = Static(id="desired")
        self.link = Static(id="link")

    def compose(self) -> ComposeResult:
        yield self.where
        yield self.desired
        yield self.link

    def on_mount(self) -> None:
        app = dash(self)
        self.watch(app, "status", self._refresh_bar)
        self.watch(app, "connected", self._refresh_bar)
        self.watch(app, "problem", self._refresh_bar)

    async def on_click(self, event: events.Click) -> None:
        if event.widget is self.desired and dash(self).troubled:
            await self.run_action("app.problems")  # what the `!` key runs

    def _refresh_bar(self, _: Any = None) -> None:
        app = dash(self)
        health = read_health(app.status)
        shown = header(health, app.clock)
        self.desired.update(shown)
        self.desired.display = bool(shown)
        self.desired.set_class(health is not None and health.troubled, "-problem")
        where = Text("◆ orch ", style="bold")
        if not app.connected:  # what is shown below is the last status seen, if any
            where.append(f"{app.problem}; retrying every {app.poll_interval:g} s", style="red")
            self.where.update(where)
            self.link.update(Text("✖ disconnected", style="bold red"))
            self.add_class("-down")
            return
        info = (app.status or {}).get("orchestrator", {})
        git = health.git if health is not None else None
        path = git.source if git is not None else str(info.get("config_path") or app.where or "")
        width = max(16, self.size.width - 60) if self.size.width else 40
        lattice = lattice_of(app.status)
        if lattice is not None:  # first: which lattice, how many hosts; then where its config came from
            where.append_text(lattice_text(lattice))
            where.append(" · ", style="dim")
            self.where.tooltip = "\n".join(map(str, lattice.get("problems") or [])) or None  # hover: the problems
        where.append(short_path(path, width))
        if info.get("git_revision"):
            where.append(f" @ {info['git_revision']}", style="bold")
        if git is not None and git.fetched and git.fetched != git.applied:
            where.append(f" · fetched {git.fetched[:12]}", style="yellow")
        if info.get("config_sha256"):
            where.append(f" · config {str(info['config_sha256'])[:12]}", style="dim")
        if "uptime_s" in info:
            where.append(f" · up {duration(float(info['uptime_s']))}", style="dim")
        self.where.update(where)
        self.link.update(Text("● connected", style="green"))
        self.remove_class("-down")
