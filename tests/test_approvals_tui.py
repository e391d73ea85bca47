"""The dashboard and the escalation gate: Pilot drives `tui.Dashboard` against a real
orchestrator serving its control API in this process (tests.test_tui's `Live`).

A capsule awaiting approval shows as `◇ awaiting approval` with what its change would grant
(home preview, detail overview); `a` and `x` appear in the footer only then, and open a
dialog naming the change; `y` approves or rejects exactly that change, `n`/escape cancel.
An answer to a change that was replaced meanwhile is refused by the orchestrator and grants
nothing. Screenshots (fixed data, tests.test_tui's FakeApi) show the home view and the dialog.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Static

from tests.test_approvals import READ_WRITE, notes_deployment, set_capabilities
from tests.test_tui import DETAIL, MS, STATUS, Live, dashboard, fixed_app, settled, table_column, text_of, until
from tui import Dashboard
from tui.approvals import AnswerDialog
from tui.capsules import CapsulesScreen
from tui.detail import CapsuleScreen
from tui.feed import INFO, WARNING, severity
from tui.format import is_healthy, phase_text

SIZE = (100, 30)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    running = await Live(notes_deployment(tmp_path)).start()
    try:
        yield running
    finally:
        await running.stop()


async def escalate(live: Live, capabilities: str = READ_WRITE) -> None:
    set_capabilities(live.config.parent / "capsules" / "notes" / "Capsule.toml", capabilities)
    assert live.orchestrator is not None
    await live.orchestrator.reconcile()
    assert live.status("notes")["phase"] == "AwaitingApproval"


def keys(app: Dashboard) -> set[str]:
    return set(app.screen.active_bindings)


async def test_approve_from_the_capsules_view(live: Live) -> None:
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: table_column(app, "phase").get("notes") == "● running", "notes running")
        assert not {"a", "x"} & keys(app)  # nothing to answer: not offered
        await pilot.press("a")
        assert isinstance(app.screen, CapsulesScreen)

        await escalate(live)
        await until(lambda: table_column(app, "phase")["notes"] == "◇ awaiting", "the phase")
        preview = app.screen.query_one("#preview-text", Static)
        await until(lambda: "+ fs_write cwd://notes" in text_of(preview), "the escalation in the preview")
        assert "a approves · x rejects" in text_of(preview)
        await until(lambda: {"a", "x"} <= keys(app), "the answer keys")

        await pilot.press("a", "escape")  # cancelled: nothing happens
        assert isinstance(app.screen, CapsulesScreen)
        await pilot.press("x", "n")
        assert isinstance(app.screen, CapsulesScreen)
        assert live.status("notes")["phase"] == "AwaitingApproval"

        await pilot.press("a")
        dialog = app.screen
        assert isinstance(dialog, AnswerDialog) and dialog.approve
        shown = text_of(dialog.query_one("#answer-text", Static))
        spec_hash = live.status("notes")["awaiting"]["spec_hash"]
        assert "Approve the change to notes?" in shown and spec_hash[:12] in shown
        assert "+ fs_write cwd://notes" in shown
        await pilot.press("y")
        await until(lambda: live.status("notes")["phase"] == "Running", "the approved reload")
        assert live.status("notes")["spec_hash"] == spec_hash
        assert await live.call("notes", "write", {"name": "dash.txt", "text": "yes"}) == {
            "written": "dash.txt",
            "bytes": 3,
        }
        await until(lambda: table_column(app, "phase")["notes"] == "● running", "the row")
        await until(lambda: not {"a", "x"} & keys(app), "the answer keys gone")


async def test_reject_from_the_capsule_detail(live: Live) -> None:
    await escalate(live)
    app = dashboard(live)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: len(app.screen.query_one(DataTable).rows) == 1, "the row")
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, CapsuleScreen)
        overview = screen.query_one("#overview-text", Static)
        await until(lambda: "+ fs_write cwd://notes" in text_of(overview), "the escalation in the overview")
        assert "awaiting" in text_of(overview)
        assert isinstance(screen.focused, Input)  # typing goes to the arguments: `a` and `x` type
        await pilot.press("x")
        assert app.screen is screen and screen.query_one("#args", Input).value == "x"
        await pilot.press("backspace", "escape")  # leave the field: the keys work
        await until(lambda: {"a", "x"} <= keys(app), "the answer keys")
        await pilot.press("x")
        dialog = app.screen
        assert isinstance(dialog, AnswerDialog) and not dialog.approve
        assert "Reject the change to notes?" in text_of(dialog.query_one("#answer-text", Static))
        await pilot.press("y")
        await until(lambda: live.status("notes")["phase"] == "Degraded", "the rejection")
        assert live.status("notes")["rejected"]["escalations"] == ["fs_write cwd://notes"]
        await until(lambda: "rejected" in text_of(overview), "the rejection in the overview")
        await until(lambda: not {"a", "x"} & keys(app), "the answer keys gone")
        assert await live.call("notes", "list") == {"notes": []}  # the old version serves


async def test_an_answer_to_a_replaced_change_grants_nothing(live: Live) -> None:
    await escalate(live)
    app = dashboard(live)
    told: list[str] = []
    notify = app.notify
    app.notify = lambda message, **options: told.append(str(message)) or notify(message, **options)  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: table_column(app, "phase").get("notes") == "◇ awaiting", "the phase")
        await until(lambda: {"a"} <= keys(app), "the approve key")
        await pilot.press("a")
        assert isinstance(app.screen, AnswerDialog)
        looked_at = live.status("notes")["awaiting"]["spec_hash"]
        await escalate(live, READ_WRITE + '\nipc_publish = ["notes.*"]')  # meanwhile, another change
        replaced = live.status("notes")["awaiting"]
        assert replaced["spec_hash"] != looked_at
        await pilot.press("y")
        await until(lambda: any("NotAwaitingApproval" in m and "changed since you looked" in m for m in told), "why")
        assert live.status("notes")["phase"] == "AwaitingApproval"
        assert live.status("notes")["awaiting"] == replaced


def test_the_phase_reads_without_colour_and_needs_attention() -> None:
    assert phase_text("AwaitingApproval").plain == "◇ awaiting approval"
    assert phase_text("AwaitingApproval", short=True).plain == "◇ awaiting"
    assert phase_text("Running", short=True).plain == "● running"
    assert not is_healthy("AwaitingApproval")
    waiting = {"capsule": "notes", "escalations": ["kv"], "granted_by": None, "spec_hash": "0" * 64}
    assert severity("orch.audit.escalation", waiting) == WARNING
    assert severity("orch.audit.escalation", {**waiting, "granted_by": "policy"}) == INFO
    assert severity("orch.audit.rejected", waiting) == WARNING
    assert severity("orch.capsule.notes.awaitingapproval", {}) == WARNING
    assert severity("orch.reconcile.finished", {"failing": [], "awaiting": ["notes"]}) == WARNING
    assert severity("orch.reconcile.finished", {"failing": [], "awaiting": []}) == INFO


# -- screenshots on fixed data -----------------------------------------------------------------


def awaiting_app() -> Dashboard:
    """The fixed dashboard of tests.test_tui, with notes awaiting approval of a change."""
    status = copy.deepcopy(STATUS)
    notes = status["capsules"][2]
    notes["phase"] = "AwaitingApproval"
    notes["awaiting"] = {
        "spec_hash": "9b07de5c" + "1" * 56,
        "escalations": ["fs_write cwd://out", "ipc_publish orders.>"],
        "since_ms": MS - 30_000,
    }
    return fixed_app(status, {**DETAIL, "status": notes})


def test_snapshot_home_with_a_capsule_awaiting_approval(snap_compare: Any) -> None:
    async def select_notes(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("down", "down")
        await until(lambda: "would grant" in text_of(pilot.app.screen.query_one("#preview-text", Static)), "preview")

    assert snap_compare(awaiting_app(), run_before=select_notes, terminal_size=(80, 24))


def test_snapshot_the_approve_dialog(snap_compare: Any) -> None:
    async def approve_notes(pilot: Any) -> None:
        await settled(pilot)
        await pilot.press("down", "down")
        await until(lambda: "a" in pilot.app.screen.active_bindings, "the approve key")
        await pilot.press("a")
        await until(lambda: isinstance(pilot.app.screen, AnswerDialog), "the dialog")

    assert snap_compare(awaiting_app(), run_before=approve_notes, terminal_size=(80, 24))
