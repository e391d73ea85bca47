"""What every screen and widget of the dashboard shares: `DashApp`, the base of tui.app
.Dashboard, and `dash(node)`, the running app seen from a view.

It holds the data the views read (the reactive `status`, `connected`, `problem` and
`troubled`, the bounded event `feed`, the `clock`) and the requests they make (`request`,
which runs an API call in a worker and reports a failure as a notification; `restart`;
`action_reconcile`). It lives apart from the app so that the views, which the app imports,
need not import the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

from textual.app import App
from textual.dom import DOMNode
from textual.reactive import var

from .feed import EventFeed
from .format import Clock, phase_word
from .link import Connect, Link, remote_error

HISTORY = 1000  # events asked for when a stream opens (the bus keeps 10,000)


class DashApp(App[None]):
    """The dashboard's shared state and requests (see the module docstring)."""

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
        self.history = history  # events asked for when the stream opens
        self._stop = stop  # set: the app exits

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


def dash(node: DOMNode) -> DashApp:
    """The dashboard app a widget or screen belongs to."""
    return cast(DashApp, node.app)
