"""The dashboard app: its connection workers, the data every view reads, the global keys.

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
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.dom import DOMNode
from textual.reactive import var
from textual.screen import Screen

from .capsules import CapsulesScreen
from .dialogs import HelpScreen, PlanScreen, ProblemsScreen
from .events import EventsScreen
from .feed import EventFeed
from .format import Clock, phase_word
from .health import read_health
from .link import Connect, Link, remote_error

logger = logging.getLogger(__name__)

HISTORY = 1000  # events asked for when a stream opens (the bus keeps 10,000)
YIELD_EVERY = 256  # events read from the stream between yields to the UI


class Dashboard(App[None]):
    """`Dashboard(connect).run()`: `connect()` opens an API client (see tui.link)."""

    CSS_PATH = "app.tcss"
    TITLE = "orch dash"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]  # noqa: RUF012 (typed by App)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    status: var[dict[str, Any] | None] = var(None)
    connected: var[bool] = var(False)
    problem: var[str] = var("connecting…")
    troubled: var[bool] = var(False)

    def __init__(
        self,
        connect: Connect,
        *,
        where: str = "",
        poll_interval: float = 1.0,
        frame_interval: float = 0.25,
        clock: Clock | None = None,
        feed_capacity: int = 10_000,
        history: int = HISTORY,
        stop: asyncio.Event | None = None,
    ) -> None:
        super().__init__()
        self.link = Link(connect, where=where)
        self.where = where
        self.poll_interval = poll_interval
        self.frame_interval = frame_interval
        self.clock = clock or Clock()
        self.feed = EventFeed(feed_capacity)
        self.history = history
        self._stop = stop

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

    # -- requests the views make -----------------------------------------------------------
    def request(
        self,
        label: str,
        call: Callable[[Any], Awaitable[Any]],
        done: Callable[[Any], None] | None = None,
        *,
        owner: DOMNode | None = None,
    ) -> None:
        """Run `call(api)` in a worker; `done(result)` on success (unless `owner`, the screen
        that asked, has been closed meanwhile), a notification on failure."""

        async def run() -> None:
            api = self.link.api
            if api is None or not self.link.connected:
                self.notify(f"{label}: not connected ({self.link.problem})", severity="error")
                return
            try:
                result = await call(api)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                answer = remote_error(error)
                shown = f"{answer.kind}: {answer}" if answer is not None else " ".join(str(error).split())
                self.notify(f"{label}: {shown}", severity="error", timeout=8)
                return
            if done is not None and self.is_running and (owner is None or owner.is_attached):
                done(result)

        self.run_worker(run(), group="requests")

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

    def action_reconcile(self) -> None:
        def done(plan: Any) -> None:
            changes = [a for a in plan.get("actions", []) if a.get("action") != "keep"]
            summary = ", ".join(f"{a['action']} {a['capsule']}" for a in changes) or "no changes"
            self.notify(f"reconciled: {summary}")

        self.request("reconcile", lambda api: api.reconcile(), done)

    def restart(self, name: str) -> None:
        def done(status: Any) -> None:
            self.notify(f"{name}: {phase_word(str(status.get('phase', '?')))} version {status.get('version')}")

        self.request(f"restart {name}", lambda api: api.restart(name), done)
