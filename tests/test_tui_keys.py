"""The capsule screen's arguments field: what is typed there stays there.

Opening a capsule focuses its arguments field (the first tool chosen), with a visible cue;
while it has the focus no printable key reaches a screen shortcut (`e` events, `R` restart,
`k` KV, `q` quit, `?` help, `/`), and the footer offers none of them; escape leaves the field
and the shortcuts work again; enter runs the tool. Checking the arguments runs on a worker
thread with the orchestrator's linear-time validator, so a hostile `pattern` in a tool's
schema cannot freeze the dashboard.

The key tests drive `tui.Dashboard` with Pilot against a real orchestrator (tests.test_tui's
`Live`); the validator tests use tests.test_tui's FakeApi with a hostile schema.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, OptionList, Static
from textual.widgets._footer import FooterKey

import tui.detail
from tests.test_cli import example_deployment
from tests.test_tui import DETAIL, STATUS, FakeApi, Live, dashboard, settled, text_of, until
from tui import Clock, Dashboard
from tui.capsules import CapsulesScreen
from tui.detail import CapsuleScreen
from tui.events import EventsScreen
from tui.widgets import typed_character

NOW = 1_800_000_000.0
SHORTCUTS = {"e", "R", "k", "q", "question_mark", "slash", "exclamation_mark"}


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    running = await Live(example_deployment(tmp_path)).start()
    try:
        yield running
    finally:
        await running.stop()


def reloads(live: Live) -> dict[str, int]:
    return {name: live.status(name)["reload_count"] for name in ("counter", "milestones", "notes")}


def footer_keys(app: Dashboard) -> set[str]:
    return {key.key for key in app.screen.query(FooterKey)}


async def test_typing_into_the_arguments_field_fires_no_shortcut_and_enter_runs(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(lambda: len(app.screen.query_one(DataTable).rows) == 3, "three rows")
        before = reloads(live)
        await pilot.press("down", "down", "enter")  # notes; its first tool is `write`
        screen = app.screen
        assert isinstance(screen, CapsuleScreen) and screen.capsule == "notes"
        field = screen.query_one("#args", Input)
        assert screen.focused is field
        assert field.styles.border_top[0] == "heavy"  # the focus cue: a heavy, bright frame

        # typed at once, before the capsule's details have even arrived
        text = '{"name": "keys.txt", "text": "eRkq?/! pR e k q"}'
        await pilot.press(*text)
        assert field.value == text
        assert app.screen is screen and len(app.screen_stack) == 2  # no events, KV or help screen
        assert app.is_running  # `q` did not quit
        await until(lambda: screen.tool is not None and screen.tool["name"] == "write", "the first tool chosen")
        assert screen.query_one(OptionList).highlighted == 0
        assert not SHORTCUTS & set(screen.active_bindings)  # the footer offers no key that only types
        assert screen.active_bindings["escape"].binding.description == "Leave field"
        await until(lambda: "enter" in footer_keys(app) and not SHORTCUTS & footer_keys(app), "the typing footer")

        await pilot.press("enter")
        output = screen.query_one("#tool-output", Static)
        await until(lambda: "✔ write" in text_of(output), "the tool's output")
        assert (live.config.parent / "notes" / "keys.txt").read_text() == "eRkq?/! pR e k q"
        assert reloads(live) == before  # nothing was restarted
        assert app.screen is screen

        await pilot.press("escape")  # leave the field: the shortcuts work again
        assert screen.focused is screen.query_one(OptionList)
        assert field.styles.border_top[0] == "round"  # and the field no longer looks focused
        assert {"e", "R", "k"} <= set(screen.active_bindings)
        await pilot.press("e")
        await until(lambda: isinstance(app.screen, EventsScreen), "the events view")
        await pilot.press("escape")
        await until(lambda: app.screen is screen, "back on the capsule")
        await pilot.press("R")
        await until(lambda: reloads(live)["notes"] == before["notes"] + 1, "the restart")

        await pilot.press("enter")  # enter in the tool list: back into the field
        assert screen.focused is field
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, CapsulesScreen)


def hostile_app(pattern_schema: dict[str, Any], calls: list[bytes]) -> Dashboard:
    detail = {**DETAIL, "tools": [{"name": "match", "description": "A hostile schema", "input_schema": pattern_schema}]}

    class Recording(FakeApi):
        async def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
            calls.append(arguments)
            return await super().call(name, tool, arguments)

    return Dashboard(lambda: Recording(STATUS, detail), where="test", clock=Clock(now=lambda: NOW, utc=True))


async def open_capsule(pilot: Any) -> CapsuleScreen:
    await settled(pilot)
    await pilot.press("enter")
    screen = pilot.app.screen
    assert isinstance(screen, CapsuleScreen)
    await until(lambda: screen.tool is not None, "the tool")
    return screen


async def test_a_hostile_pattern_in_a_tool_schema_does_not_freeze_the_dashboard() -> None:
    """`^(a+)+$` against 40 a's and a `!` backtracks 2^40 times in Python's re (stock
    jsonschema): hours. The orchestrator's validator runs it on RE2 in linear time."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}, "required": ["s"]}
    calls: list[bytes] = []
    app = hostile_app(schema, calls)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_capsule(pilot)
        field = screen.query_one("#args", Input)
        field.value = '{"s": "' + "a" * 40 + '!"}'
        problem = screen.query_one("#args-problem", Static)
        await until(lambda: "does not match '^(a+)+$'" in text_of(problem), "the pattern's verdict")
        await pilot.press("enter")
        await until(lambda: "not sent" in text_of(screen.query_one("#tool-output", Static)), "the refusal")
        assert calls == []
        field.value = '{"s": "' + "a" * 40 + '"}'
        await pilot.press("enter")
        await until(lambda: calls, "the call")
        assert calls == [b'{"s": "' + b"a" * 40 + b'"}']


async def test_the_check_runs_on_a_worker_thread_and_enter_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a check is slow the keyboard still works; enter sends only what the check
    passed, once it has."""
    release = threading.Event()
    threads: list[threading.Thread] = []
    texts: list[str] = []
    real = tui.detail.check_arguments

    def slow(text: str, schema: Any, *, capsule: str, tool: str) -> tuple[Any, list[str]]:
        threads.append(threading.current_thread())
        texts.append(text)
        if "slow" in text:
            release.wait(30)
        return real(text, schema, capsule=capsule, tool=tool)

    monkeypatch.setattr(tui.detail, "check_arguments", slow)
    calls: list[bytes] = []
    app = hostile_app({"type": "object"}, calls)
    try:
        await run_slow_check(app, calls, texts, threads, release)
    finally:
        release.set()


async def run_slow_check(
    app: Dashboard, calls: list[bytes], texts: list[str], threads: list[threading.Thread], release: threading.Event
) -> None:
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_capsule(pilot)
        screen.query_one("#args", Input).value = '{"slow": 1}'
        await until(lambda: '{"slow": 1}' in texts, "a slow check")
        assert screen.checking
        await pilot.press("enter")  # waits for the check
        assert "checking" in text_of(screen.query_one("#tool-output", Static))
        await pilot.press("escape")  # the keyboard is not blocked by the check
        assert screen.focused is screen.query_one(OptionList)
        assert calls == []
        release.set()
        await until(lambda: calls, "the call, once checked")
        assert calls == [b'{"slow": 1}']
        assert threads and all(t is not threading.main_thread() for t in threads)


def checked(screen: CapsuleScreen, text: str) -> bool:
    """Whether the check of `text` (what the field holds) has finished and is shown."""
    field = screen.query_one("#args", Input)
    return field.value == text and not screen.checking and screen.checked is not None and screen.checked.text == text


def test_printable_keys_are_told_from_the_others() -> None:
    for key in ("e", "R", "k", "q", "question_mark", "slash", "exclamation_mark", "space", "plus", "at", "4"):
        assert typed_character(key) is not None, key
    for key in ("enter", "escape", "tab", "up", "ctrl+q", "f1", "end", "shift+tab"):
        assert typed_character(key) is None, key


def test_snapshot_detail_while_typing_at_80_columns(snap_compare: Any) -> None:
    async def typing(pilot: Any) -> None:
        screen = await open_capsule(pilot)
        await pilot.press(*'{"by": 3')
        await until(lambda: checked(screen, '{"by": 3'), "the check of what was typed")

    app = Dashboard(FakeApi, where="test", clock=Clock(now=lambda: NOW, utc=True))
    assert snap_compare(app, run_before=typing, terminal_size=(80, 24))
