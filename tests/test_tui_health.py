"""The desired state's health on the dashboard: the top bar says whether config.yaml was
accepted (quietly) or rejected, and which builds failed and manifests are broken (in red);
`!` (shown only then) lists every problem; the capsules' last error names its tool and time.

Read from `orchestrator.desired` and the capsule fields `last_error_tool`,
`last_error_at_ms`, `events_lost`, `conflicts` of `GET /v1/status`, all of which an older
orchestrator does not send. Screenshots and key tests on tests.test_tui's fixed data
(FakeApi) with the desired section varied; one test against a real orchestrator.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from textual.widgets import DataTable, Static
from textual.widgets._footer import FooterKey

from tests.test_cli import example_deployment
from tests.test_tui import DETAIL, MS, NOW, STATUS, FakeApi, Live, dashboard, text_of, until
from tui import Clock, Dashboard
from tui.capsules import CapsulesScreen
from tui.detail import CapsuleScreen
from tui.dialogs import ProblemsScreen
from tui.health import MAX_OUTPUT_LINES, header, read_health, report, short_problem
from tui.widgets import TopBar

CLOCK = Clock(now=lambda: NOW, utc=True)
PROBLEMS = [
    "/srv/deploy/config.yaml:12: capsules.notes: unknown key 'pth' (did you mean 'path'?)",
    "/srv/deploy/config.yaml:15: capsules.milestones.depends_on: 'countr' is not a deployment (did you mean"
    " 'counter'?)",
    "/srv/deploy/config.yaml:3: defaults.limits.fuel: must be a positive integer, not -1",
]
BUILD_OUTPUT = "\n".join(
    [
        "> notes@0.1.0 build",
        "> asc assembly/index.ts --outFile notes.wasm --optimize",
        "ERROR TS2304: Cannot find name 'wirte'.",
        "   :",
        " 41 │   wirte(name, text);",
        "    │   ~~~~~",
        "   └─ in assembly/index.ts(41,3)",
        "FAILURE 1 compile error(s)",
    ]
)


def desired(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "state": "accepted",
        "accepted_at_ms": MS - 3_700_000,
        "rejected": None,
        "broken": {},
        "builds_failed": {},
    }
    return {**base, **changes}


def status_with(section: Any, **capsule_changes: dict[str, Any]) -> dict[str, Any]:
    status = copy.deepcopy(STATUS)
    if section is None:
        del status["orchestrator"]["desired"]
    else:
        status["orchestrator"]["desired"] = section
    for capsule in status["capsules"]:
        capsule.update(capsule_changes.get(capsule["name"], {}))
    return status


REJECTED = status_with(
    desired(state="rejected", rejected={"at_ms": MS - 20_000, "count": 3, "problems": PROBLEMS}),
)
BUILD_FAILED = status_with(
    desired(builds_failed={"notes": {"at_ms": MS - 30_000, "exit_code": 1, "output": BUILD_OUTPUT}}),
    notes={
        "phase": "Degraded",
        "last_error": "build failed (exit code 1): ERROR TS2304: Cannot find name 'wirte'. The previous version "
        "keeps serving",
        "last_error_tool": None,
        "last_error_at_ms": MS - 30_000,
    },
)
EVERYTHING = status_with(
    desired(
        state="rejected",
        rejected={"at_ms": MS - 20_000, "count": 3, "problems": PROBLEMS},
        broken={
            "milestones": {
                "at_ms": MS - 50_000,
                "problems": ["capsules/milestones/Capsule.toml:4: [package] name: must be lowercase"],
            }
        },
        builds_failed={"notes": {"at_ms": MS - 30_000, "exit_code": 1, "output": BUILD_OUTPUT}},
    )
)


class Switchable(FakeApi):
    """FakeApi whose status the test changes as it goes."""

    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__()
        self.holder = holder

    async def status(self) -> Any:
        return self.holder["status"]


def app_on(status: Any) -> Dashboard:
    return Dashboard(lambda: FakeApi(status), where="/srv/deploy/.orch/orch.sock", clock=CLOCK)


async def loaded(pilot: Any) -> None:
    app = pilot.app
    await until(lambda: app.connected and [len(t.rows) for t in app.screen.query(DataTable)] == [4], "the capsules")


def bar_text(app: Dashboard) -> str:
    return text_of(app.screen.query_one(TopBar).query_one("#desired", Static))


def footer_keys(app: Dashboard) -> set[str]:
    return {key.key for key in app.screen.query(FooterKey)}


# -- the pure parts ------------------------------------------------------------------------------


def test_the_header_for_each_state() -> None:
    accepted = header(read_health(STATUS), CLOCK)
    assert accepted.plain == "config accepted 06:58:20" and accepted.style == "dim"
    rejected = header(read_health(REJECTED), CLOCK)
    assert rejected.plain.startswith("✖ config rejected: 3 problems (config.yaml:12: capsules.notes: unknown key")
    assert header(read_health(BUILD_FAILED), CLOCK).plain == "✖ build failed: notes"
    assert header(read_health(EVERYTHING), CLOCK).plain.endswith(
        " · ✖ build failed: notes · ✖ manifest invalid: milestones"
    )
    health = read_health(BUILD_FAILED)
    assert health is not None and health.troubled and not read_health(STATUS).troubled  # type: ignore[union-attr]
    assert short_problem("config.yaml:12: x") == "config.yaml:12: x"
    assert short_problem("a b/c: x") == "a b/c: x"  # not a path: left alone


def test_an_older_or_malformed_desired_section_says_nothing_wrong() -> None:
    assert read_health(status_with(None)) is None
    assert header(None, CLOCK).plain == ""
    assert read_health(None) is None and read_health("nonsense") is None
    assert read_health({"orchestrator": "x"}) is None
    weird = read_health(
        status_with(
            {
                "state": "rejected",
                "accepted_at_ms": "yesterday",
                "rejected": {"at_ms": True, "count": "3", "problems": "not a list"},
                "broken": ["not", "a", "map"],
                "builds_failed": {"notes": "not a map", "milestones": {"exit_code": None}},
            }
        )
    )
    assert weird is not None and weird.accepted_at_ms is None
    assert weird.rejected is not None and weird.rejected.count == 0 and weird.rejected.problems == ()
    assert weird.broken == () and [b.capsule for b in weird.builds_failed] == ["milestones"]
    assert header(weird, CLOCK).plain == "✖ config rejected: 0 problems · ✖ build failed: milestones"
    assert "an unknown time" in text_of(Static(report(weird, CLOCK)))
    stale = read_health(status_with(desired(rejected={"at_ms": MS, "count": 1, "problems": ["old"]})))
    assert stale is not None and stale.rejected is None and not stale.troubled  # accepted since


def test_problems_are_text_never_markup() -> None:
    hostile = status_with(
        desired(state="rejected", rejected={"at_ms": MS, "count": 1, "problems": ["[bold red]x[/] [link=http://e]y"]})
    )
    health = read_health(hostile)
    assert "[bold red]x[/] [link=http://e]y" in header(health, CLOCK).plain
    assert "[bold red]x[/] [link=http://e]y" in text_of(Static(report(health, CLOCK)))


def test_the_report_lists_everything_and_the_end_of_a_long_build_output() -> None:
    shown = text_of(Static(report(read_health(EVERYTHING), CLOCK)))
    for problem in PROBLEMS:
        assert problem in shown
    assert "the config accepted at 06:58:20" in shown and "keeps running" in shown
    assert "milestones: manifest invalid" in shown and "must be lowercase" in shown
    assert "notes: build failed at 07:59:30 (30s ago) (exit code 1)" in shown and "Cannot find name 'wirte'" in shown
    long = status_with(
        desired(builds_failed={"n": {"at_ms": MS, "exit_code": 2, "output": "\n".join(map(str, range(500)))}})
    )
    shown = text_of(Static(report(read_health(long), CLOCK)))
    assert f"… {500 - MAX_OUTPUT_LINES} earlier line(s)" in shown and "\n499" in shown and "\n439\n" not in shown


# -- on screen ----------------------------------------------------------------------------------


async def test_the_header_and_the_problems_key_follow_the_status() -> None:
    holder: dict[str, Any] = {"status": STATUS}
    app = Dashboard(lambda: Switchable(holder), where="test", clock=CLOCK, poll_interval=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await until(lambda: bar_text(app).startswith("config accepted"), "the quiet header")
        assert not app.troubled and "exclamation_mark" not in footer_keys(app)
        holder["status"] = REJECTED
        await until(lambda: "config rejected: 3 problems" in bar_text(app), "the rejection")
        assert app.troubled and app.screen.query_one("#desired").has_class("-problem")
        await until(lambda: "exclamation_mark" in footer_keys(app), "`!` in the footer")

        await pilot.press("exclamation_mark")
        dialog = app.screen
        assert isinstance(dialog, ProblemsScreen)
        body = dialog.query_one("#problems", Static)
        assert all(problem in text_of(body) for problem in PROBLEMS)
        holder["status"] = EVERYTHING  # the dialog keeps up
        await until(lambda: "Cannot find name 'wirte'" in text_of(body), "the failed build in the dialog")
        await pilot.press("escape")
        assert isinstance(app.screen, CapsulesScreen)

        await pilot.click("#desired")  # a click on the red part opens the dialog too
        await until(lambda: isinstance(app.screen, ProblemsScreen), "the dialog, by mouse")
        await pilot.press("escape")
        holder["status"] = STATUS
        await until(lambda: not app.troubled and "exclamation_mark" not in footer_keys(app), "all good again")
        assert bar_text(app).startswith("config accepted")


async def test_an_older_orchestrator_shows_no_desired_state() -> None:
    app = app_on(status_with(None))
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        bar = app.screen.query_one("#desired", Static)
        assert not bar.display and not app.troubled
        await pilot.press("exclamation_mark")  # still answers, and says why it has nothing
        assert isinstance(app.screen, ProblemsScreen)
        assert "does not report" in text_of(app.screen.query_one("#problems", Static))


async def test_the_last_error_names_its_tool_and_time() -> None:
    notes = {**DETAIL, "status": STATUS["capsules"][2]}
    app = Dashboard(lambda: FakeApi(STATUS, notes), where="test", clock=CLOCK)
    async with app.run_test(size=(130, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("down", "down")  # notes
        preview = app.screen.query_one("#preview-text", Static)
        await until(lambda: "last error (peek, 07:59:18, 42s ago): capability denied" in text_of(preview), "the error")
        assert "2 conflicts" in text_of(preview)
        await pilot.press("up")  # milestones: an older server's fields, no tool or time
        await until(lambda: "last error: capsules/milestones" in text_of(preview), "the plain error")
        await pilot.press("down", "enter")
        screen = app.screen
        assert isinstance(screen, CapsuleScreen)
        overview = screen.query_one("#overview-text", Static)
        await until(lambda: "(peek, 07:59:18, 42s ago) capability denied" in text_of(overview), "the detail")


async def test_against_a_real_orchestrator(tmp_path: Path) -> None:
    """Whatever this server reports about its desired state (an older one: nothing), a
    healthy deployment shows no problem."""
    live = await Live(example_deployment(tmp_path)).start()
    try:
        app = dashboard(live)
        async with app.run_test(size=(100, 30)):
            await until(lambda: app.connected and app.status is not None, "the status")
            await until(lambda: len(app.screen.query_one(DataTable).rows) == 3, "three rows")
            assert not app.troubled
            bar = app.screen.query_one("#desired", Static)
            assert not bar.display or text_of(bar).startswith("config accepted")
            assert "exclamation_mark" not in footer_keys(app)
    finally:
        await live.stop()


def test_snapshot_config_rejected(snap_compare: Any) -> None:
    assert snap_compare(app_on(REJECTED), run_before=loaded, terminal_size=(80, 24))


def test_snapshot_build_failed(snap_compare: Any) -> None:
    async def select_notes(pilot: Any) -> None:
        await loaded(pilot)
        await pilot.press("down", "down")

    assert snap_compare(app_on(BUILD_FAILED), run_before=select_notes, terminal_size=(130, 30))


def test_snapshot_problems_dialog(snap_compare: Any) -> None:
    async def open_problems(pilot: Any) -> None:
        await loaded(pilot)
        await pilot.press("exclamation_mark")
        await until(lambda: isinstance(pilot.app.screen, ProblemsScreen), "the dialog")

    assert snap_compare(app_on(EVERYTHING), run_before=open_problems, terminal_size=(100, 30))
