"""The dashboard of an orchestrator that follows a git branch: the top bar shows the source
and the revision applied, the revision fetched when it is not the one applied, a rejected
revision (with its problems in the `!` dialog) and a failing fetch; a local orchestrator's
bar is unchanged. The pure parts on fixed data, the top bar on FakeApi data, and once
against a real orchestrator following a real repository."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.widgets import Static

from orchestrator.api.server import ControlServer
from orchestrator.control.runtime import Orchestrator
from tests.test_gitops_follow import CONFIG, Repo, capsule, start
from tests.test_tui import MS, STATUS, FakeApi, text_of, until
from tests.test_tui_health import CLOCK, desired, loaded
from tui import Dashboard
from tui.health import header, read_git, read_health, report
from tui.link import connect_to
from tui.widgets import TopBar

SOURCE = "git+https://git.example.com/ops/deploy.git#main:prod/config.yaml"
APPLIED = "4f2a9c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a"
BAD = "9b07de12aa34bb56cc78dd90ee12ff34aa56bb78"
PROBLEM = f"{BAD[:12]}:prod/config.yaml:7: capsules.notes: unknown key 'pth' (did you mean 'path'?)"


def following(**git: Any) -> dict[str, Any]:
    status = copy.deepcopy(STATUS)
    section = {
        "source": SOURCE,
        "applied_revision": APPLIED,
        "fetched_revision": APPLIED,
        "rejected": None,
        "error": None,
        "error_at_ms": None,
        **git,
    }
    status["orchestrator"]["git"] = section
    status["orchestrator"]["git_revision"] = APPLIED[:12]
    rejected = section["rejected"]
    if rejected:
        status["orchestrator"]["desired"] = desired(state="rejected", rejected={**rejected, "revision": BAD})
    return status


REJECTED = following(
    fetched_revision=BAD, rejected={"revision": BAD, "problems": [PROBLEM], "count": 1, "at_ms": MS - 5_000}
)
FETCH_FAILS = following(error="cannot fetch https://git.example.com/ops/deploy.git (main): fatal: ...", error_at_ms=MS)


def plain(renderable: Any) -> str:
    console = Console(width=200, color_system=None)
    with console.capture() as captured:
        console.print(renderable)
    return captured.get()


def test_the_git_section_is_read_and_a_malformed_one_ignored() -> None:
    git = read_git(REJECTED)
    assert git is not None and git.source == SOURCE and git.applied == APPLIED and git.fetched == BAD
    assert read_git(STATUS) is None  # a local orchestrator
    for junk in (None, "x", [], {"source": 3}, {"applied_revision": APPLIED}):
        status = copy.deepcopy(STATUS)
        status["orchestrator"]["git"] = junk
        assert read_git(status) is None, junk
    odd = following(applied_revision=7, fetched_revision=["x"], error={"no": 1})
    git = read_git(odd)
    assert git is not None and git.applied is None and git.fetched is None and git.error is None


def test_the_header_names_the_rejected_revision_and_a_failing_fetch() -> None:
    health = read_health(REJECTED)
    assert health is not None and health.rejected is not None and health.rejected.revision == BAD
    assert str(header(health, CLOCK)).startswith(f"✖ revision {BAD[:12]} rejected: 1 problem (")
    failing = read_health(FETCH_FAILS)
    assert failing is not None and failing.troubled
    assert str(header(failing, CLOCK)) == "✖ fetch failed"
    quiet = read_health(following())
    assert quiet is not None and not quiet.troubled and "accepted" in str(header(quiet, CLOCK))


def test_the_report_says_which_revision_keeps_running_and_how_to_fix_it() -> None:
    text = plain(report(read_health(REJECTED), CLOCK))
    assert f"revision {BAD} of {SOURCE} rejected" in text and PROBLEM in text
    assert f"revision {APPLIED[:12]} keeps running" in text and "Push a fixed commit" in text
    text = plain(report(read_health(FETCH_FAILS), CLOCK))
    assert f"fetching {SOURCE} fails" in text and "cannot fetch" in text and "keeps serving" in text


def where_text(app: Dashboard) -> str:
    return text_of(app.screen.query_one(TopBar).query_one("#where", Static))


async def test_the_top_bar_shows_source_applied_and_fetched() -> None:
    app = Dashboard(lambda: FakeApi(REJECTED), where="/srv/.orch/orch.sock", clock=CLOCK)
    async with app.run_test(size=(160, 30)) as pilot:
        await loaded(pilot)
        await until(lambda: "@" in where_text(app), "the top bar")
        shown = where_text(app)
        assert f"deploy.git#main:prod/config.yaml @ {APPLIED[:12]} · fetched {BAD[:12]}" in shown
        desired_bar = text_of(app.screen.query_one(TopBar).query_one("#desired", Static))
        assert f"revision {BAD[:12]} rejected" in desired_bar
    app = Dashboard(lambda: FakeApi(STATUS), where="/srv/.orch/orch.sock", clock=CLOCK)
    async with app.run_test(size=(160, 30)) as pilot:  # local: the config path, as before
        await loaded(pilot)
        await until(lambda: "@" in where_text(app), "the top bar")
        assert "/srv/deploy/config.yaml @ 29b36ae1f2c3" in where_text(app) and "fetched" not in where_text(app)


async def test_against_a_real_orchestrator_following_a_branch(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 1)})
    running = await start(tmp_path, repo)
    orchestrator: Orchestrator = running.orchestrator
    try:
        assert orchestrator.state is not None
        server = ControlServer(orchestrator, state_dir=orchestrator.state.path)
        await server.start()
        try:
            bad = repo.commit({"config.yaml": CONFIG + "bogus: 1\n"})
            app = Dashboard(connect_to(server.path), where=str(server.path), poll_interval=0.1, frame_interval=0.05)
            async with app.run_test(size=(160, 30)):
                app.action_reconcile()  # `r`: fetches the branch now
                bar = app.screen.query_one(TopBar)
                await until(lambda: f"revision {bad[:12]} rejected" in text_of(bar.desired), "rejected in the bar")
                assert f"fetched {bad[:12]}" in text_of(bar.where)
        finally:
            await server.stop()
    finally:
        await orchestrator.stop(2)
