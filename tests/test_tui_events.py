"""The events view's cursor and the expanded event (k9s-style): select a line, `enter` shows
the whole event pretty-printed (topic, seq, source, time, payload), scrollable; escape
returns to the live view where it was.

Behaviour against a real orchestrator (tests.test_tui's `Live`, driven with Pilot); the
screenshot on tests.test_tui's fixed data.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.containers import VerticalScroll
from textual.widgets import Static

from tests.test_cli import example_deployment
from tests.test_tui import EVENTS, Live, dashboard, events_view, fixed_app, settled, text_of, until
from tui import Clock
from tui.dialogs import HelpScreen
from tui.eventlog import EventLog
from tui.events import EventsScreen
from tui.eventview import EventScreen, event_document, event_text
from tui.feed import EventFeed

SIZE = (100, 30)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    running = await Live(example_deployment(tmp_path)).start()
    try:
        yield running
    finally:
        await running.stop()


async def test_expanding_an_event_and_coming_back_where_it_was(live: Live) -> None:
    app = dashboard(live)
    assert live.orchestrator is not None
    bus = live.orchestrator.bus
    async with app.run_test(size=SIZE) as pilot:
        screen = await events_view(app, pilot)
        log = screen.query_one(EventLog)
        await until(lambda: any(r.topic == "orch.capsule.notes.running" for r in log.rows), "the history")
        await live.call("counter", "increment", {"by": 7})
        bus.publish("after.increment", {}, source="test")
        await until(lambda: log.rows and log.rows[-1].topic == "after.increment", "live events")
        assert log.follow and log.selected is log.rows[-1]  # following: the cursor is on the newest

        await pilot.press("question_mark")  # the help lists the log's own keys too
        assert isinstance(app.screen, HelpScreen)
        assert "Expand" in "".join(text_of(w) for w in app.screen.query(Static))
        await pilot.press("escape")
        await until(lambda: app.screen is screen, "the help closed")

        target = next(r for r in log.rows if r.topic == "counter.changed")
        await pilot.press(*["up"] * (len(log.rows) - 1 - list(log.rows).index(target)))
        assert log.selected is target and not log.follow
        await until(lambda: "end: follow" in text_of(screen.query_one("#event-stats", Static)), "the stats")

        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, EventScreen), "the expanded event")
        expanded = app.screen
        assert isinstance(expanded, EventScreen) and expanded.row is target
        shown = text_of(expanded.query_one("#event-json", Static))
        document = json.loads(shown)  # all of it, and valid JSON
        assert document["topic"] == "counter.changed" and document["source"] == "counter"
        assert document["seq"] == target.seq and document["payload"] == {"count": 7}
        assert document["timestamp_ms"] == target.timestamp_ms and document["time"] == app.clock.stamp(
            target.timestamp_ms
        )
        assert '"payload": {\n    "count": 7\n  }' in shown  # pretty-printed
        await pilot.press("y")
        assert json.loads(app.clipboard) == document

        # the stream goes on meanwhile
        for n in range(5):
            bus.publish("while.away", {"n": n}, source="test")
        await until(lambda: app.feed.rows[-1].topic == "while.away", "events while away")
        await pilot.press("escape")
        await until(lambda: app.screen is screen, "back on the events view")
        await until(lambda: log.rows[-1].topic == "while.away", "the new events drawn")
        assert log.selected is target and not log.follow  # where it was
        await pilot.press("end")
        assert log.follow and log.selected is log.rows[-1]
        bus.publish("after.follow", {}, source="test")
        await until(lambda: log.rows[-1].topic == "after.follow", "the next event")
        assert log.selected is log.rows[-1]  # following again


async def test_a_long_event_scrolls(live: Live) -> None:
    app = dashboard(live)
    assert live.orchestrator is not None
    async with app.run_test(size=(80, 24)) as pilot:
        await until(lambda: app.connected, "connected")
        await pilot.press("e")
        log = app.screen.query_one(EventLog)
        live.orchestrator.bus.publish("big.event", {"items": [f"item {n}" for n in range(200)]}, source="test")
        await until(lambda: log.rows and log.rows[-1].topic == "big.event", "the long event")
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, EventScreen), "the expanded event")
        body = app.screen.query_one("#event-body", VerticalScroll)
        assert app.screen.focused is body
        await until(lambda: body.max_scroll_y > 150, "the layout")
        await pilot.press("pagedown", "pagedown")
        await until(lambda: body.scroll_y > 0, "scrolled")
        await pilot.press("end")
        await until(lambda: body.scroll_y == body.max_scroll_y, "at the end")
        await pilot.press("escape")
        await until(lambda: isinstance(app.screen, EventsScreen), "back")


def row_of(item: dict[str, Any]) -> Any:
    feed = EventFeed()
    feed.add(item)
    return feed.rows[-1]


def test_the_expanded_event_holds_every_field_and_shows_markup_as_text() -> None:
    clock = Clock(now=lambda: 0.0, utc=True)
    row = row_of(
        {
            "topic": "x.y",
            "payload": {"text": "[bold red]not markup[/] \x1b[31m"},
            "source": "[link=http://evil]s[/link]",
            "seq": 3,
            "timestamp_ms": 1_800_000_000_123,
            "bytes": 44,
        }
    )
    document = event_document(row, clock)
    assert list(document) == ["topic", "seq", "source", "time", "timestamp_ms", "bytes", "payload"]
    assert document["time"] == "2027-01-15 08:00:00.123 UTC"
    text = event_text(row, clock)
    assert "[bold red]not markup[/]" in text.plain and "[link=http://evil]s[/link]" in text.plain
    assert "\x1b" not in text.plain  # JSON escapes control characters: \u001b
    assert json.loads(text.plain)["payload"]["text"].endswith("\x1b[31m")


def test_a_huge_payload_is_cut_and_says_so() -> None:
    clock = Clock(now=lambda: 0.0, utc=True)
    row = row_of({"topic": "x", "payload": "z" * 50_000, "source": "s", "seq": 1, "timestamp_ms": 1})
    text = event_text(row, clock, limit=1000)
    assert len(text.plain) < 1200
    assert "more characters not shown" in text.plain.splitlines()[-1]
    assert event_text(row, clock).plain.count("z") == 50_000  # under the real limit: all of it


def test_snapshot_expanded_event(snap_compare: Any) -> None:
    async def expand(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("e")
        await until(lambda: len(pilot.app.screen.visible_rows()) == len(EVENTS), "the events")
        await pilot.press("home", "down", "down", "enter")  # orch.capsule.tally.failed
        await until(lambda: isinstance(pilot.app.screen, EventScreen), "the expanded event")

    assert snap_compare(fixed_app(), run_before=expand, terminal_size=(80, 24))
