"""The dashboard app: its connection workers, its screens, the global keys. The data every
view reads and the requests views make are its base, tui.shell.DashApp.

Data flows one way. A polling worker asks the orchestrator for its status every
`poll_interval` seconds and stores it in the reactive `status` (views watch it and update
their cells in place); an event-stream worker feeds every bus event into the bounded
`feed` (the events view pulls from it a few times a second). When the orchestrator goes
away, `connected` turns false (every view's top bar says so) and the workers keep trying;
when it returns they reconnect and reopen the stream by themselves.

`troubled` says whether the desired state has problems (a rejected config.yaml, a broken
manifest, a failed build: tui.health); then every screen's footer offers `!`, the problems
dialog.

Screens: capsules (home), capsule detail, events, one event, KV, plan, problems, help. Used
by `orch dash` and `orch up --dash` through `tui.run_dashboard`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from textual import work
from textual.binding import Binding, BindingType
from textual.screen import Screen

from .capsules import CapsulesScreen
from .dialogs import HelpScreen, PlanScreen, ProblemsScreen
from .events import EventsScreen
from .health import read_health
from .shell import DashApp

logger = logging.getLogger(__name__)

YIELD_EVERY = 256  # events read from the stream between yields to the UI


class Dashboard(DashApp):
    """`Dashboard(connect, **options).run()`: `connect()` opens an API client (see tui.link);
    the options (where, poll_interval, clock, history, stop, ...) are DashApp's."""

    CSS_PATH = "app.tcss"
    TITLE = "orch dash"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]  # noqa: RUF012 (typed by App)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def get_default_screen(self) -> Screen[Any]:
        return CapsulesScreen()

    def on_mount(self) -> None:
        self.install_screen(EventsScreen(), "events")
        self._poll()
        self._stream()
        if self._stop is not None:
            self._exit_when(self._stop)

    async def on_unmount(self) -> None:
        await self.link.close()

    def watch_status(self, status: dict[str, Any] | None) -> None:
        health = read_health(status)
        self.troubled = health is not None and health.troubled

    def watch_troubled(self) -> None:
        self.screen.refresh_bindings()  # `!` appears in the footer, or goes

    # -- workers ---------------------------------------------------------------------------
    @work(group="poll", exclusive=True)
    async def _poll(self) -> None:
        while True:
            status = await self.link.poll()
            if not self.is_running:  # shutting down: the views are being taken apart
                return
            if status is not None:
                self.status = status
            if self.connected and not self.link.connected:
                self._stream()  # a stream on a lost connection may never end by itself: start afresh
            self.connected = self.link.connected
            self.problem = self.link.problem
            await asyncio.sleep(self.poll_interval)

    @work(group="events", exclusive=True)
    async def _stream(self) -> None:
        feed = self.feed
        while True:
            api = await self.link.connected_api()
            try:
                count = 0
                async for item in api.events(">", self.history):
                    feed.add(item)
                    count += 1
                    if count % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a flood never starves the keyboard
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the orchestrator went away; the poller notices too
                logger.debug("event stream ended: %s", error)
            await asyncio.sleep(self.poll_interval)

    @work(group="stop")
    async def _exit_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.exit()

    # -- global actions --------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_events(self) -> None:
        if not isinstance(self.screen, EventsScreen):
            self.push_screen("events")

    def action_plan(self) -> None:
        self.push_screen(PlanScreen())

    def action_problems(self) -> None:
        if not isinstance(self.screen, ProblemsScreen):
            self.push_screen(ProblemsScreen())
