"""The dashboard: behaviour against a real orchestrator, screenshots against fixed data.

Behaviour tests start an in-process Orchestrator and its ControlServer on a copy of the
example deployment (counter, milestones, notes) and drive `tui.Dashboard` with Pilot as a
client of that socket, on the same event loop. Waits poll a condition with a deadline.
Snapshot tests (`snap_compare`, pytest-textual-snapshot) use `FakeApi`, an object with the
client's methods and fixed data, and a fixed clock, so the SVGs are stable.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual import events
from textual.widgets import DataTable, Input, OptionList, Static

from orchestrator.api.client import Client, RemoteError
from orchestrator.api.server import ControlServer
from orchestrator.cli.up import run_up
from orchestrator.control.runtime import Orchestrator
from tests.conftest import REPO
from tests.test_cli import example_deployment
from tui import Clock, Dashboard, connect_to
from tui.arguments import check_arguments
from tui.capsules import CapsulesScreen
from tui.detail import CapsuleScreen
from tui.dialogs import HelpScreen, PlanScreen
from tui.eventlog import EventLog
from tui.events import EventsScreen
from tui.feed import ERROR, EventFeed, EventFilter, TopicPatternError, parse_pattern, topic_matches
from tui.format import compact, hexdump, phase_text
from tui.kv import KVScreen
from tui.widgets import TopBar

DEADLINE = 30.0  # a backstop for a busy machine: waits end as soon as their condition holds
SIZE = (100, 30)


async def until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Wait for `predicate()` to be true, checking every 20 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def press(app: Dashboard, key: str) -> None:
    """A key press as the terminal driver delivers one, without Pilot's wait for an idle
    process (which a flood never gives): the caller awaits the key's effect instead."""
    event = events.Key(key, key if len(key) == 1 else " " if key == "space" else None)
    event.set_sender(app)
    app.post_message(event)


async def eventually(predicate: Callable[[], object], seconds: float) -> bool:
    """Whether `predicate()` becomes true within `seconds` (checking every 20 ms)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class Live:
    """A real orchestrator (no file watching) serving its control API, in this process."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.orchestrator: Orchestrator | None = None
        self.server: ControlServer | None = None

    async def start(self) -> Live:
        self.orchestrator = Orchestrator(self.config, watch=False)
        await self.orchestrator.start()
        assert self.orchestrator.desired is not None
        self.server = ControlServer(self.orchestrator, state_dir=self.orchestrator.desired.config.state_dir)
        await self.server.start()
        return self

    async def stop(self) -> None:
        """The orchestrator first: its bus closing ends the event streams, so the server
        stops at once instead of waiting a second for them."""
        if self.orchestrator is not None:
            await self.orchestrator.stop(5)
        if self.server is not None:
            await self.server.stop()
        self.server = self.orchestrator = None

    @property
    def socket(self) -> Path:
        return self.config.parent / ".orch" / "orch.sock"

    async def call(self, name: str, tool: str, arguments: Any = None) -> Any:
        async with Client(self.socket) as client:
            output, _ = await client.call(name, tool, json.dumps(arguments or {}).encode())
            return json.loads(output)

    def status(self, name: str) -> dict[str, Any]:
        assert self.orchestrator is not None and self.orchestrator.reconciler is not None
        return next(s for s in self.orchestrator.reconciler.status() if s["name"] == name)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    running = await Live(example_deployment(tmp_path)).start()
    try:
        yield running
    finally:
        await running.stop()


def dashboard(live: Live, **options: Any) -> Dashboard:
    options.setdefault("poll_interval", 0.1)
    options.setdefault("frame_interval", 0.05)
    return Dashboard(connect_to(live.socket), where=str(live.socket), **options)


async def events_view(app: Dashboard, pilot: Any) -> EventsScreen:
    """Once the dashboard is connected, open the events view (the `e` key) and return it."""
    await until(lambda: app.connected, "connected")
    await pilot.press("e")
    screen = app.screen
    assert isinstance(screen, EventsScreen)
    return screen


def table_column(app: Dashboard, column: str) -> dict[str, str]:
    table = app.screen.query_one(DataTable)
    return {
        str(row.key.value): str(getattr(c := table.get_cell(row.key, column), "plain", c)) for row in table.ordered_rows
    }


def text_of(widget: Static) -> str:
    """What a Static shows, as plain text (its content rendered 200 columns wide)."""
    console = Console(width=200, file=io.StringIO(), color_system=None)
    with console.capture() as captured:
        console.print(widget.content)
    return captured.get()


# -- behaviour against a real orchestrator ----------------------------------------------------


async def test_home_lists_capsules_and_updates_cells_in_place(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: len(app.screen.query_one(DataTable).rows) == 3, "three rows")
        table = app.screen.query_one(DataTable)
        assert list(table_column(app, "name")) == ["counter", "milestones", "notes"]
        assert set(table_column(app, "phase").values()) == {"● running"}
        summary = text_of(app.screen.query_one("#summary", Static))
        assert "3 running" in summary
        assert "config.yaml" in text_of(app.screen.query_one("#where", Static))
        spied: list[str] = []
        for method in ("add_row", "remove_row", "clear"):
            original = getattr(table, method)
            setattr(table, method, lambda *a, _m=method, _o=original, **k: (spied.append(_m), _o(*a, **k))[1])
        updates: list[tuple[str, str]] = []
        update_cell = table.update_cell
        table.update_cell = lambda row, column, *a, **k: (  # type: ignore[method-assign]
            updates.append((str(getattr(row, "value", row)), str(getattr(column, "value", column)))),
            update_cell(row, column, *a, **k),
        )[1]

        await live.call("counter", "increment", {"by": 3})
        await until(lambda: table_column(app, "calls")["counter"] == "1", "the calls cell to update")
        assert spied == []  # in place: no row added, removed or cleared
        assert ("counter", "calls") in updates and ("counter", "fuel") in updates
        # milestones intercepts counter.changed, and interceptor runs count as its calls
        assert not any(name not in ("counter", "milestones") for name, _ in updates)

        await pilot.press("slash", "n", "o", "t")
        assert list(table_column(app, "name")) == ["notes"]
        assert "filter “not” · 2 hidden" in text_of(app.screen.query_one("#summary", Static))
        await pilot.press("escape")
        assert list(table_column(app, "name")) == ["counter", "milestones", "notes"]
        await pilot.press("u")
        assert table_column(app, "name") == {}  # all healthy
        await pilot.press("u", "s", "s", "s", "s")  # sort by phase, version, instances, calls
        assert "sort calls" in text_of(app.screen.query_one("#summary", Static))
        await pilot.press("S")
        # most calls first: milestones ran its two interceptors on counter's one change
        assert list(table_column(app, "name"))[:2] == ["milestones", "counter"]
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, CapsulesScreen)


async def test_a_capsule_in_detail_and_its_tools(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: len(app.screen.query_one(DataTable).rows) == 3, "three rows")
        await pilot.press("enter")  # the cursor starts on counter
        assert isinstance(app.screen, CapsuleScreen) and app.screen.capsule == "counter"
        screen = app.screen
        await until(lambda: screen.query_one(OptionList).option_count == 3, "the tools")
        overview = text_of(screen.query_one("#overview-text", Static))
        for shown in ("A count kept in KV", "publish counter.*", "step = 1", "fuel 100M", "running"):
            assert shown in overview, shown

        field = screen.query_one("#args", Input)
        assert screen.focused is field  # the arguments field has the focus from the start
        await until(lambda: screen.tool is not None and screen.tool["name"] == "increment", "the first tool chosen")
        field.value = '{"by": "x'
        await pilot.press(*'"}')
        problem = screen.query_one("#args-problem", Static)
        await until(lambda: "at /by: 'x' is not of type 'integer'" in text_of(problem), "the schema problem")
        assert field.has_class("-invalid")
        await pilot.press("enter")
        await until(lambda: "not sent" in text_of(screen.query_one("#tool-output", Static)), "the refusal")
        assert live.status("counter")["calls"] == 0  # an invalid input never leaves the dashboard

        field.value = '{"by": 5'
        await until(lambda: "not JSON" in text_of(problem), "the JSON problem")
        field.value = '{"by": 5}'
        await until(lambda: "valid" in text_of(problem) and not field.has_class("-invalid"), "valid arguments")
        await pilot.press("enter")
        output = screen.query_one("#tool-output", Static)
        await until(lambda: "fuel" in text_of(output), "the tool's output")
        assert '"count": 5' in text_of(output) and "✔ increment" in text_of(output)
        assert live.status("counter")["calls"] == 1

        await pilot.press("escape", "escape")  # leave the field, then the screen
        assert isinstance(app.screen, CapsulesScreen)
        await pilot.press("down", "down", "enter")
        assert isinstance(app.screen, CapsuleScreen) and app.screen.capsule == "notes"
        screen = app.screen
        await until(lambda: screen.query_one(OptionList).option_count == 4, "the notes tools")
        await pilot.press("down", "down", "down")  # in the field, down chooses the next tool
        await until(lambda: screen.tool is not None and screen.tool["name"] == "peek", "peek: reads any path")
        screen.query_one("#args", Input).value = '{"path": "/etc/passwd"}'
        await pilot.press("enter")
        output = screen.query_one("#tool-output", Static)
        await until(lambda: "failed" in text_of(output), "the tool's error")
        assert "403 CapabilityDenied" in text_of(output) and "fs_read" in text_of(output)


async def test_events_filter_search_problems_and_pause(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        screen = await events_view(app, pilot)

        def topics() -> list[str]:
            return [row.topic for row in screen.visible_rows()]

        await until(lambda: "orch.capsule.counter.running" in topics(), "history on the events view")
        await live.call("counter", "increment")
        await until(lambda: "counter.changed" in topics(), "a live event")

        await pilot.press("t", "c")
        topic = screen.query_one("#topic", Input)
        topic.value = "counter.>"
        topic.cursor_position = len(topic.value)
        await until(lambda: set(topics()) == {"counter.changed"}, "the topic filter")
        await pilot.press(".", "x")  # counter.>.x is not a pattern: said inline, filter kept
        assert topic.has_class("-invalid")
        assert "'>' may only be the whole last token" in text_of(screen.query_one("#event-stats", Static))
        assert set(topics()) == {"counter.changed"}
        topic.value = "orch.capsule.*.running"
        running = {f"orch.capsule.{n}.running" for n in ("counter", "milestones", "notes")}
        await until(lambda: set(topics()) == running, "a pattern with a wildcard")
        topic.value = ""
        await pilot.press("enter", "slash", "m")
        screen.query_one("#search", Input).value = "milestones"
        await until(lambda: screen.filter.search == "milestones", "the search")
        assert "orch.capsule.milestones.running" in topics() and "counter.changed" not in topics()
        assert all("milestones" in row.topic + row.text for row in screen.visible_rows())
        screen.query_one("#search", Input).value = ""
        await pilot.press("enter", "w")
        assert topics() == []  # no warning or error yet
        with pytest.raises(RemoteError):
            await live.call("notes", "peek", {"path": "/etc/passwd"})
        await until(lambda: "orch.audit.denied" in topics(), "the denial, an error")
        assert all(row.level == ERROR for row in screen.visible_rows())
        await pilot.press("w")

        await pilot.press("space")
        assert screen.paused
        shown = len(screen.visible_rows())
        for _ in range(3):
            await live.call("counter", "increment")
        await until(lambda: app.feed.received - screen.cursor >= 3, "events buffered while paused")
        screen._frame()  # what the frame timer does: while paused it shows nothing new
        assert len(screen.visible_rows()) == shown
        assert "PAUSED: " in text_of(screen.query_one("#event-stats", Static))
        await pilot.press("space")
        assert not screen.paused
        assert len(screen.visible_rows()) >= shown + 3
        assert [r.payload for r in screen.visible_rows() if r.topic == "counter.changed"][-1] == {"count": 4}
        await pilot.press("escape")
        assert isinstance(app.screen, CapsulesScreen)


async def test_reconnects_when_the_orchestrator_returns(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.connected and app.feed.received > 0, "connected, with events")
        await pilot.press("e")
        await live.stop()
        bar = app.screen.query_one(TopBar)
        await until(lambda: not app.connected, "the disconnection to show")
        await until(lambda: bar.has_class("-down"), "the top bar to say so")
        assert "disconnected" in text_of(bar.query_one("#link", Static))

        await live.start()
        await until(lambda: app.connected, "reconnected")
        assert not bar.has_class("-down") and "● connected" in text_of(bar.query_one("#link", Static))
        assert isinstance(app.screen, EventsScreen)
        screen = app.screen
        await until(lambda: any(r.topic == "(restarted)" for r in screen.visible_rows()), "the restart marker")
        await live.call("counter", "increment")  # the event stream was reopened by itself
        await until(lambda: any(r.topic == "counter.changed" for r in screen.visible_rows()), "a new live event")


async def test_kv_plan_reconcile_and_restart(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        await live.call("counter", "increment", {"by": 41})
        await until(lambda: len(app.screen.query_one(DataTable).rows) == 3, "three rows")
        await pilot.press("k")
        screen = app.screen
        assert isinstance(screen, KVScreen) and screen.capsule == "counter"
        await until(lambda: screen.values, "the keys")
        assert screen.values == {"count": b"41"}
        value = screen.query_one("#value", Static)
        assert "41" in text_of(value) and "text" in text_of(value)
        await pilot.press("x")
        assert "hex" in text_of(value) and "34 31" in text_of(value)
        await pilot.press("slash", *"zz", "enter")
        await until(lambda: not screen.values, "no key starts with zz")
        await pilot.press("escape")

        await pilot.press("p")
        plan = app.screen
        assert isinstance(plan, PlanScreen)
        await until(lambda: "no changes" in text_of(plan.query_one("#plan", Static)), "an empty plan")
        live.config.write_text(live.config.read_text().replace("step: 1", "step: 2"))
        await pilot.press("r")
        await until(lambda: "config.step" in text_of(plan.query_one("#plan", Static)), "the reload's reason")
        assert "~ counter" in text_of(plan.query_one("#plan", Static))
        await pilot.press("a")  # apply: reconcile now
        await until(lambda: live.status("counter")["reload_count"] == 1, "the reconcile")
        assert isinstance(app.screen, CapsulesScreen)
        assert (await live.call("counter", "increment")) == {"count": 43}

        await pilot.press("down", "down", "R")  # restart notes
        await until(lambda: live.status("notes")["reload_count"] == 1, "the restart")
        await until(lambda: table_column(app, "reloaded")["notes"] != "-", "the reload to show")


async def test_up_dash_runs_the_dashboard_on_its_own_socket_and_quitting_stops(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    seen: dict[str, Any] = {}

    async def dashboard_in_test(socket: Path, *, stop: asyncio.Event, log_file: Path) -> None:
        seen["socket"], seen["log_file"] = socket, log_file
        app = Dashboard(connect_to(socket), where=str(socket), stop=stop, poll_interval=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: app.connected and len(app.screen.query_one(DataTable).rows) == 3, "the capsules")
            await pilot.press("q")

    assert await run_up(config, watch=False, dashboard=dashboard_in_test) == 0
    assert seen["socket"] == tmp_path / ".orch" / "orch.sock"
    assert seen["log_file"] == tmp_path / ".orch" / "orch.log"
    assert not seen["socket"].exists()  # shut down as Ctrl+C does


async def test_a_flood_of_events_leaves_the_keyboard_working_and_loses_nothing_silently(live: Live) -> None:
    """A flood onto the bus while the events view is open: every key press takes effect
    during it, the view keeps within its bounds and catches up, and every event published is
    either received or counted lost. How fast, and how quickly keys are handled: bench/tui.py."""
    app = dashboard(live, frame_interval=0.25, poll_interval=0.5, feed_capacity=4000)
    assert live.orchestrator is not None
    bus = live.orchestrator.bus
    async with app.run_test(size=SIZE) as pilot:
        screen = await events_view(app, pilot)
        log = screen.query_one(EventLog)
        arrived: Counter[str] = Counter()  # by topic (the feed itself keeps only the newest 10,000)
        add = app.feed.add

        def counting(item: dict[str, Any]) -> None:
            arrived[str(item.get("topic", "(notice)"))] += 1
            add(item)

        app.feed.add = counting  # type: ignore[method-assign]
        bus.publish("flood.start", {}, source="test")
        await until(lambda: arrived["flood.start"] == 1, "the stream to be live")
        lost_before = app.feed.lost
        published = 0
        flooding = True

        async def flood() -> None:  # 100 events at a time, until told to stop
            nonlocal published
            while flooding:
                for _ in range(100):
                    bus.publish("flood.tick", {"n": published, "pad": "x" * 40}, source="test")
                    published += 1
                await asyncio.sleep(0.005)

        task = asyncio.get_running_loop().create_task(flood())
        try:
            await until(lambda: arrived["flood.tick"] >= 2_000, "the flood to reach the dashboard")
            for _ in range(2):
                press(app, "space")
                await until(lambda: screen.paused, "pause, during the flood")
                held = log.rows[-1]
                received = app.feed.received
                await until(lambda r=received: app.feed.received >= r + 500, "events arriving while paused")
                screen._frame()  # what the frame timer does
                assert log.rows[-1] is held
                press(app, "space")
                await until(lambda: not screen.paused, "resume, during the flood")
                await until(lambda h=held: log.rows[-1] is not h, "the view to move on")
                press(app, "w")  # warnings and errors only: no tick is one
                await until(lambda: screen.filter.problems_only, "the filter, during the flood")
                await until(lambda: all(r.topic != "flood.tick" for r in log.rows), "the ticks filtered out")
                press(app, "w")
                await until(lambda: not screen.filter.problems_only, "the filter off")
                await until(lambda: log.rows and log.rows[-1].topic == "flood.tick", "the ticks back")
            assert not task.done()  # all of it happened while the flood went on
            await until(lambda: published >= 10_000, "more events than the feed and the view hold")
        finally:
            flooding = False
            await task

        # an end marker published after the flood: events lost before it are announced before
        # it arrives (another one while it may itself have been dropped from a full queue)
        ends = 0
        while ends < 60:
            bus.publish("flood.end", {}, source="test")
            ends += 1
            if await eventually(lambda: arrived["flood.end"] > 0, 1.0):
                break
        await until(
            lambda: arrived["flood.tick"] + arrived["flood.end"] + app.feed.lost - lost_before == published + ends,
            "every event received or counted lost",
        )
        await until(lambda: screen.cursor == app.feed.received, "the view to catch up")
        assert log.follow and log.rows[-1].topic == "flood.end"
        assert len(log.rows) == log.rows.maxlen and len(app.feed.rows) == app.feed.capacity  # full, and bounded
        await until(lambda: f"lost {app.feed.lost:,}" in text_of(screen.query_one("#event-stats", Static)), "stats")


def test_dash_without_a_config_says_so() -> None:
    command = [sys.executable, "-m", "orchestrator", "dash", "nowhere.yaml"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2 and "nowhere.yaml" in result.stderr, result.stderr


# -- import hygiene ---------------------------------------------------------------------------


def test_the_headless_orchestrator_never_loads_textual() -> None:
    code = (
        "import sys\n"
        "import orchestrator.cli.main, orchestrator.control.runtime, orchestrator.api.server, orchestrator.cli.up\n"
        "orchestrator.cli.main._parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'tui', 'rich')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_dashboard_imports_only_the_client_errors_topics_and_schema_of_the_orchestrator() -> None:
    imported = set()
    for path in (REPO / "tui").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    allowed = {"orchestrator.api.client", "orchestrator.errors", "orchestrator.topics", "orchestrator.desired.schema"}
    assert {m for m in imported if m.split(".")[0] == "orchestrator"} <= allowed
    assert "orchestrator.api.client" in imported


# -- the pure parts ---------------------------------------------------------------------------


def test_topic_patterns() -> None:
    assert topic_matches(parse_pattern("orch.capsule.>"), "orch.capsule.a.running")
    assert not topic_matches(parse_pattern("orch.capsule.>"), "orch.capsule")
    assert topic_matches(parse_pattern("orch.*.a.*"), "orch.capsule.a.failed")
    assert not topic_matches(parse_pattern("orch.*"), "orch.capsule.a")
    assert topic_matches(parse_pattern(">"), "x")
    for bad in ("", "a..b", "a.>.b", "a*.b"):
        with pytest.raises(TopicPatternError):
            parse_pattern(bad)


def test_the_feed_is_bounded_skips_repeats_and_marks_restarts() -> None:
    feed = EventFeed(capacity=5)
    for seq in range(1, 9):
        feed.add({"topic": "t.x", "payload": seq, "source": "s", "seq": seq, "timestamp_ms": 1000 + seq})
    rows, missed = feed.since(0)
    assert [r.seq for r in rows] == [4, 5, 6, 7, 8] and missed == 3
    feed.add({"topic": "t.x", "payload": 7, "source": "s", "seq": 7, "timestamp_ms": 1007})  # a reopened stream
    assert feed.received == 8
    rows, missed = feed.since(6)
    assert [r.seq for r in rows] == [7, 8] and missed == 0
    feed.add({"lost": {"dropped": 12, "total": 12}})
    assert feed.lost == 12 and feed.rows[-1].topic == "(lost)"
    # another orchestrator: its numbers start again, on newer events
    feed.add({"topic": "orch.capsule.a.reloaded", "payload": {}, "source": "orch", "seq": 1, "timestamp_ms": 2000})
    feed.add({"topic": "t.x", "payload": 2, "source": "s", "seq": 2, "timestamp_ms": 2001})
    assert [r.topic for r in list(feed.rows)[-3:]] == ["(restarted)", "orch.capsule.a.reloaded", "t.x"]
    assert feed.last_reload_ms == {"a": 2000} and feed.last_seq == 2


def test_event_filters_and_severity() -> None:
    feed = EventFeed()
    for seq, (topic, payload) in enumerate(
        [
            ("orch.capsule.a.failed", {"last_error": "boom"}),
            ("orch.capsule.a.degraded", {}),
            ("counter.changed", {"count": 1}),
            ("orch.reconcile.finished", {"failing": ["a"]}),
        ],
        start=1,
    ):
        feed.add({"topic": topic, "payload": payload, "source": "orch", "seq": seq, "timestamp_ms": 0})
    rows = list(feed.rows)
    assert [r.level for r in rows] == [2, 1, 0, 1]
    assert [r.topic for r in EventFilter(problems_only=True).select(rows)] == [
        "orch.capsule.a.failed",
        "orch.capsule.a.degraded",
        "orch.reconcile.finished",
    ]
    assert [r.seq for r in EventFilter(search="BOOM").select(rows)] == [1]
    assert [r.seq for r in EventFilter(pattern=parse_pattern("orch.capsule.*.*")).select(rows)] == [1, 2]


def test_arguments_are_checked_against_the_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

    def check(text: str, against: Any = schema) -> tuple[Any, list[str]]:
        return check_arguments(text, against, capsule="c", tool="t")

    assert check('{"n": 2}') == ({"n": 2}, [])
    assert check("", {"type": "object"}) == ({}, [])
    assert check("")[1] == ["at /: 'n' is a required property"]
    assert check('{"n": "2"}')[1] == ["at /n: '2' is not of type 'integer'"]
    assert check("{")[1][0].startswith("not JSON: ")
    assert check("[" * 100_000)[1][0].startswith("not JSON")  # nested too deeply for the parser
    assert check("NaN", {})[1] == ["at /: nan is not a JSON number"]  # Python's json reads NaN; JSON has none
    assert check('"' + "a" * 40 + '!"', {"pattern": "^(a+)+$"})[1] == [f"at /: '{'a' * 40}!' does not match '^(a+)+$'"]
    problem = check("{}", {"type": "object", "properties": {"a": {"pattern": "(a)\\1"}}})[1][0]
    assert problem.startswith("the tool's input schema is unusable (at #/properties/a/pattern")


def test_formats() -> None:
    assert [compact(n) for n in (950, 12_345, 4_560_000, 1.2e9)] == ["950", "12.3k", "4.56M", "1.2G"]
    assert phase_text("Failed").plain == "✖ failed" and phase_text("Running").plain == "● running"
    assert hexdump(b"AB\x00") == "00000000  41 42 00" + " " * 39 + "  |AB.|"
    clock = Clock(now=lambda: 100.0, utc=True)
    assert (clock.ago(90_000), clock.until(104_000), clock.until(99_000)) == ("10s ago", "in 4s", "now")
    assert clock.hms(3_723_004) == "01:02:03.004"


# -- screenshots --------------------------------------------------------------------------------

NOW = 1_800_000_000.0
MS = int(NOW * 1000)


def capsule_status(name: str, phase: str, version: str | None, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "phase": phase,
        "version": version,
        "spec_hash": "0" * 64,
        "instances": 1,
        "calls": 0,
        "errors": 0,
        "fuel_last": 0,
        "fuel_mean": 0,
        "last_error": None,
        "since_ms": MS - 95_000,
        "next_retry_ms": None,
        "reload_count": 0,
        **more,
    }


STATUS = {
    "orchestrator": {
        "config_path": "/srv/deploy/config.yaml",
        "config_sha256": "b27c10057088b9695708f8bba26eb2bae7d3cbdd7af37da641fba7a3811bee19",
        "git_revision": "29b36ae1f2c3",
        "uptime_s": 3720.0,
        "state_dir": "/srv/deploy/.orch",
        "desired": {
            "state": "accepted",
            "accepted_at_ms": MS - 3_700_000,
            "rejected": None,
            "broken": {},
            "builds_failed": {},
        },
    },
    "capsules": [
        capsule_status(
            "counter", "Running", "1f1fc0008875", calls=42, fuel_mean=60473, fuel_last=64941, reload_count=2
        ),
        capsule_status(
            "milestones",
            "Degraded",
            "0b61c79fda30",
            calls=7,
            errors=1,
            fuel_mean=30211,
            reload_count=1,
            last_error="capsules/milestones/milestones.wasm: not a WebAssembly module (magic header not detected); "
            "the previous version keeps serving",
        ),
        capsule_status(
            "notes",
            "Running",
            "12d59a2f788d",
            calls=3,
            errors=1,
            fuel_mean=120_000,
            last_error="capability denied: fs_read /etc/passwd (notes may read cwd://data)",
            last_error_tool="peek",
            last_error_at_ms=MS - 42_000,
            conflicts=2,
            events_lost=0,
        ),
        capsule_status(
            "tally",
            "Failed",
            None,
            last_error="capsules/tally/Capsule.toml: tool 'count' has no export 'count' (and no astrid_tool_call)",
            next_retry_ms=MS + 4000,
        ),
    ],
}
DETAIL = {
    "status": STATUS["capsules"][0],
    "history": [
        {"event": "starting", "at_ms": MS - 3_700_000, "version": None},
        {"event": "running", "at_ms": MS - 3_699_000, "version": "1f1fc0008875"},
        {"event": "reloaded", "at_ms": MS - 95_000, "version": "1f1fc0008875"},
    ],
    "package": {"name": "counter", "version": "0.1.0", "description": "A count kept in KV, announced on the bus"},
    "tools": [
        {
            "name": "increment",
            "description": "Adds `by` to the count",
            "input_schema": {"type": "object", "properties": {"by": {"type": "integer"}}, "required": []},
        },
        {"name": "get", "description": "Returns the count", "input_schema": {"type": "object"}},
    ],
    "interceptors": [],
    "capabilities": {"kv": True, "fs_read": [], "fs_write": [], "ipc_publish": ["counter.*"], "net": []},
    "env": {"step": {"type": "number"}, "token": {"type": "secret"}},
    "limits": {"fuel": 100_000_000, "memory_mib": 64, "timeout_ms": 2000},
    "instances": 1,
    "depends_on": [],
    "enabled": True,
    "config": {"step": "1", "token": "***"},
    "wasm_sha256": "1f1fc0008875db8cf20c13212f18cb1abf13d6c27c7521d60d19d770fcfce927",
    "folder": "/srv/deploy/capsules/counter",
}
EVENTS = [
    ("orch.reconcile.started", {"actions": [{"capsule": "counter", "action": "start"}]}, "orch"),
    ("orch.capsule.counter.running", {"phase": "Running", "version": "1f1fc0008875"}, "orch"),
    ("orch.capsule.tally.failed", {"phase": "Failed", "last_error": "tool 'count' has no export"}, "orch"),
    *[("counter.changed", {"count": n}, "counter") for n in range(1, 12)],
    ("orch.audit.denied", {"capsule": "notes", "capability": "fs_read", "target": "/etc/passwd"}, "orch"),
    ("orch.capsule.milestones.degraded", {"phase": "Degraded", "last_error": "magic header not detected"}, "orch"),
    ("milestones.reached", {"count": 10}, "milestones"),
]


class FakeApi:
    """The client's methods over fixed data (for screenshots that never change)."""

    def __init__(self, status: Any = STATUS, detail: Any = DETAIL) -> None:
        self._status, self._detail = status, detail

    async def __aenter__(self) -> FakeApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def status(self) -> Any:
        return self._status

    async def capsule(self, name: str) -> Any:
        return self._detail

    async def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
        return b'{"count":45}', {"X-Fuel-Used": "60473", "X-Seconds": "0.002100"}

    async def restart(self, name: str) -> Any:
        return STATUS["capsules"][0]

    async def reconcile(self) -> Any:
        return await self.plan()

    async def plan(self) -> Any:
        return {
            "actions": [
                {"capsule": "counter", "action": "keep", "reasons": [], "escalations": []},
                {
                    "capsule": "notes",
                    "action": "reload",
                    "reasons": ["wasm 12d59a→9b07de", "capabilities +fs_write cwd://out"],
                    "escalations": ["fs_write cwd://out"],
                },
                {"capsule": "tally", "action": "start", "reasons": ["new"], "escalations": []},
            ]
        }

    async def kv_list(self, name: str, prefix: str = "") -> Any:
        return {"keys": ["count"]}

    async def kv_get(self, name: str, key: str) -> bytes:
        return b"45"

    async def events(self, topic: str = ">", history: int = 0) -> AsyncIterator[dict[str, Any]]:
        for seq, (topic_, payload, source) in enumerate(EVENTS, start=1):
            yield {"topic": topic_, "payload": payload, "source": source, "seq": seq, "timestamp_ms": MS - 60_000 + seq}
        await asyncio.Event().wait()  # a quiet bus


def fixed_app(status: Any = STATUS, detail: Any = DETAIL) -> Dashboard:
    return Dashboard(
        lambda: FakeApi(status, detail), where="/srv/deploy/.orch/orch.sock", clock=Clock(now=lambda: NOW, utc=True)
    )


async def settled(pilot: Any) -> None:
    app = pilot.app
    await until(lambda: app.connected and [len(t.rows) for t in app.screen.query(DataTable)] == [4], "the capsules")
    await until(lambda: app.feed.received == len(EVENTS), "the fixed events")


def test_snapshot_home(snap_compare: Any) -> None:
    assert snap_compare(fixed_app(), run_before=settled, terminal_size=(80, 24))


def test_snapshot_home_wide(snap_compare: Any) -> None:
    async def select_failed(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("down", "down", "down")

    assert snap_compare(fixed_app(), run_before=select_failed, terminal_size=(130, 30))


def test_snapshot_detail_after_running_a_tool(snap_compare: Any) -> None:
    async def run_tool(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("enter")
        await until(lambda: pilot.app.screen.query_one(OptionList).option_count == 2, "the tools")
        await until(lambda: pilot.app.screen.tool is not None, "the first tool chosen")
        await pilot.press(*'{"by": 3}', "enter")  # the arguments field has the focus
        await until(lambda: "valid" in text_of(pilot.app.screen.query_one("#args-problem", Static)), "the check")
        await until(lambda: "fuel" in text_of(pilot.app.screen.query_one("#tool-output", Static)), "the output")

    assert snap_compare(fixed_app(), run_before=run_tool, terminal_size=(130, 34))


def test_snapshot_events(snap_compare: Any) -> None:
    async def open_events(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("e")
        await until(lambda: len(pilot.app.screen.visible_rows()) == len(EVENTS), "the events")

    assert snap_compare(fixed_app(), run_before=open_events, terminal_size=(100, 24))


def test_snapshot_plan(snap_compare: Any) -> None:
    async def open_plan(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("p")
        await until(lambda: "escalation" in text_of(pilot.app.screen.query_one("#plan", Static)), "the plan")

    assert snap_compare(fixed_app(), run_before=open_plan, terminal_size=(80, 24))
