"""Following a git branch, in process: an Orchestrator with a GitFollower on a real bare
repository (a `file://` URL), with commits pushed while it runs.

Each test commits WAT capsules (their `version` tool answers a digit) and a config.yaml,
runs the orchestrator on the branch, and pushes more commits: good ones are applied (the
new revision serves; status says applied = fetched), a broken one is rejected whole (status
and health name it, with its problems; the last good revision keeps serving), the next good
one clears the rejection. Also: the fetch interval, a fetch that fails (deleted branch), the
state dir and workspace being the operator's, capsule folders confined to the revision,
builds off unless allowed, where a restart starts from, and local mode's revision following
HEAD without a reconcile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capsule.bus import Event, Subscription
from orchestrator.control.follow import GitFollower, RevisionRejected, last_applied_revision
from orchestrator.control.gitsource import KEEP_CHECKOUTS, GitRef
from orchestrator.control.runtime import Orchestrator
from orchestrator.control.statedir import read_applied
from orchestrator.errors import SourceError
from tests.awaiting import first_match
from tests.test_gitsource import Repo
from tests.test_orchestrate import MANIFEST, module

DEADLINE = 15.0
CONFIG = "version: 1\ncapsules:\n  ver:\n    path: caps/ver\n"
TWO = CONFIG + "  two:\n    path: caps/two\n"


def capsule(folder: str, value: int, *, name: str = "ver", extra: str = "") -> dict[str, str]:
    """The files of a WAT capsule whose `version` tool outputs `value`."""
    return {
        f"{folder}/v.wat": module(value),
        f"{folder}/Capsule.toml": MANIFEST.format(name=name, description="v", extra=extra),
    }


def commit_files(repo: Repo, files: dict[str, str], *, remove: tuple[str, ...] = ()) -> str:
    for name in remove:
        repo.git("rm", "-q", name)
    return repo.commit(files)


class Following:
    """A running orchestrator following `repo`'s main branch."""

    def __init__(self, orchestrator: Orchestrator, events: Subscription, repo: Repo, root: Path) -> None:
        self.orchestrator = orchestrator
        self.events = events
        self.repo = repo
        self.root = root

    @property
    def follow(self) -> GitFollower:
        assert self.orchestrator.follow is not None
        return self.orchestrator.follow

    def git(self) -> dict[str, Any]:
        info = self.orchestrator.info()["git"]
        assert isinstance(info, dict)
        return info

    async def version(self, name: str = "ver") -> str:
        assert self.orchestrator.reconciler is not None
        return str((await self.orchestrator.reconciler.call_tool(name, "version", {})).output.decode())

    async def wait_for(self, predicate: Callable[[Event], bool], what: str) -> Event:
        return await first_match(aiter(self.events), predicate, f"an event: {what}", deadline=DEADLINE)


async def start(root: Path, repo: Repo, *, interval: float = 3600.0, builds: bool = False) -> Following:
    follower = GitFollower(
        GitRef.parse(f"git+{repo.url}#main:config.yaml"),
        state_dir=root / "state",
        workspace=root / "ws",
        interval=interval,
    )
    orchestrator = Orchestrator(follow=follower, builds=builds)
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    try:
        await orchestrator.start()
    except BaseException:
        await orchestrator.stop(2)
        raise
    return Following(orchestrator, events, repo, root)


@pytest.fixture
async def following(tmp_path: Path) -> AsyncIterator[Following]:
    repo = Repo(tmp_path)
    repo.commit({"config.yaml": TWO, **capsule("caps/ver", 1), **capsule("caps/two", 5, name="two")})
    running = await start(tmp_path, repo)
    try:
        yield running
    finally:
        await running.orchestrator.stop(2)


async def until(condition: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), DEADLINE)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


# -- applying good commits ------------------------------------------------------------------------
async def test_a_good_commit_is_fetched_checked_out_and_applied(following: Following) -> None:
    first = following.repo.git("rev-parse", "HEAD")
    git = following.git()
    assert git["source"].endswith("#main:config.yaml")
    assert git["applied_revision"] == git["fetched_revision"] == first and git["rejected"] is None
    assert following.orchestrator.info()["git_revision"] == first[:12]
    assert await following.version() == "1"
    assert not following.orchestrator.watch  # checkouts never change: the interval and reconcile drive it

    second = following.repo.commit(capsule("caps/ver", 2))
    plan = await following.orchestrator.reconcile()  # what `POST /v1/reconcile` does: fetch first
    assert [(a.capsule, a.action) for a in plan.actions] == [("two", "keep"), ("ver", "reload")]
    assert await following.version() == "2" and await following.version("two") == "5"
    git = following.git()
    assert git["applied_revision"] == git["fetched_revision"] == second and git["error"] is None

    checkouts = following.root / "state" / "git" / "checkouts"
    spec = following.orchestrator.desired.specs["ver"]  # type: ignore[union-attr]
    assert Path(spec.folder) == checkouts / second / "caps" / "ver"  # capsule folders: in the revision
    assert following.orchestrator.config_path == checkouts / second / "config.yaml"
    record = json.loads((following.root / "state" / "applied.json").read_text())
    assert record["git"]["applied_revision"] == second and record["git_revision"] == second[:12]
    assert read_applied(following.root / "state")["ver"].wasm_sha256 == spec.wasm_sha256


async def test_a_commit_with_any_problem_is_rejected_whole_and_the_next_good_one_applies(
    following: Following,
) -> None:
    good = following.repo.git("rev-parse", "HEAD")
    # `two` gets a new module (fine on its own) while `ver`'s manifest breaks: local files
    # would apply `two`; a revision is all or nothing.
    bad = following.repo.commit(
        {**capsule("caps/two", 6, name="two"), "caps/ver/Capsule.toml": "[package]\nname = 'ver'\nversion = 'x'\n"}
    )
    with pytest.raises(RevisionRejected) as caught:
        await following.orchestrator.reconcile()
    assert caught.value.revision == bad
    event = await following.wait_for(lambda e: e.topic == "orch.reconcile.rejected", "rejected")
    assert event.payload["revision"] == bad
    assert await following.version() == "1" and await following.version("two") == "5"  # nothing of it applied

    git = following.git()
    assert git["applied_revision"] == good and git["fetched_revision"] == bad
    rejected = git["rejected"]
    assert rejected["revision"] == bad and rejected["count"] == len(rejected["problems"]) >= 1
    assert any(p.startswith(f"{bad[:12]}:caps/ver/Capsule.toml") and "package" in p for p in rejected["problems"])
    assert all(str(following.root) not in p for p in rejected["problems"])  # paths in the repository
    health = following.orchestrator.info()["desired"]
    assert health["state"] == "rejected" and health["rejected"]["revision"] == bad
    assert health["rejected"]["problems"] == rejected["problems"]

    fixed = following.repo.commit({**capsule("caps/ver", 3)})
    await following.orchestrator.reconcile()
    assert await following.version() == "3" and await following.version("two") == "6"
    git = following.git()
    assert git["applied_revision"] == git["fetched_revision"] == fixed and git["rejected"] is None
    assert following.orchestrator.info()["desired"]["state"] == "accepted"


async def test_a_revision_must_keep_its_capsules_inside_the_repository(following: Following, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    for name, text in capsule("x", 7, name="x").items():
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_text(text)
    bad = following.repo.commit({"config.yaml": TWO + f"  x:\n    path: {outside / 'x'}\n  y:\n    path: ../../y\n"})
    with pytest.raises(RevisionRejected) as caught:
        await following.orchestrator.reconcile()
    problems = [str(p) for p in caught.value.problems]
    assert any("capsules.x.path" in p and "outside the repository" in p for p in problems), problems
    assert any("capsules.y.path" in p for p in problems), problems
    assert following.git()["rejected"]["revision"] == bad
    assert "x" not in following.orchestrator.desired.specs  # type: ignore[union-attr]


async def test_a_link_out_of_the_revision_rejects_it(following: Following, tmp_path: Path) -> None:
    (tmp_path / "secret.toml").write_text("[package]\n")
    link = following.repo.work / "caps" / "ver" / "Capsule.toml"
    link.unlink()
    link.symlink_to("../../../secret.toml")  # leaves the checkout
    following.repo.git("add", "-A")
    following.repo.git("commit", "-q", "-m", "a link out")
    following.repo.git("push", "-q", str(following.repo.bare), "HEAD:main")
    bad = following.repo.git("rev-parse", "HEAD")
    with pytest.raises(RevisionRejected) as caught:
        await following.orchestrator.reconcile()
    assert caught.value.revision == bad and "cannot check out" in str(caught.value)
    assert await following.version() == "1"


async def test_the_state_dir_and_the_workspace_are_the_operators(following: Following) -> None:
    # config.yaml's own state_dir and workspace are not used with a git source
    second = following.repo.commit({"config.yaml": "state_dir: theirs\nworkspace: /\n" + TWO})
    await following.orchestrator.reconcile()
    assert following.git()["applied_revision"] == second
    config = following.orchestrator.desired.config  # type: ignore[union-attr]
    assert config.state_dir == following.root / "state" and config.workspace == following.root / "ws"
    checkout = following.root / "state" / "git" / "checkouts" / second
    assert not (checkout / "theirs").exists()
    # no capsule reaches the clone, the checkouts (capsule folders) or the state dir
    protected = following.orchestrator.protected.current
    workspace = following.root / "ws"
    for path in (checkout / "caps" / "ver" / "v.wat", checkout / "config.yaml", following.root / "state" / "git"):
        assert protected.reason(path, workspace=workspace) is not None, path


async def test_old_checkouts_are_pruned_and_the_applied_one_kept(following: Following) -> None:
    for value in range(2, KEEP_CHECKOUTS + 4):
        following.repo.commit(capsule("caps/ver", value % 10))
        await following.orchestrator.reconcile()
    checkouts = following.root / "state" / "git" / "checkouts"
    kept = {p.name for p in checkouts.iterdir() if not p.name.startswith(".")}
    assert len(kept) == KEEP_CHECKOUTS and following.git()["applied_revision"] in kept


# -- the fetch interval and fetch errors -----------------------------------------------------------
async def test_the_fetch_interval_applies_new_commits_and_validates_a_rejected_one_once(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 1)})
    running = await start(tmp_path, repo, interval=0.05)
    try:
        second = repo.commit(capsule("caps/ver", 2))
        await running.wait_for(lambda e: e.topic == "orch.capsule.ver.reloaded", "reloaded by the interval")
        assert await running.version() == "2"
        await until(lambda: running.git()["applied_revision"] == second, "applied")

        bad = repo.commit({"config.yaml": CONFIG + "bogus: 1\n"})
        await running.wait_for(lambda e: e.topic == "orch.reconcile.rejected", "rejected by the interval")
        assert running.git()["rejected"]["revision"] == bad
        fetched_at = running.git()["fetched_at_ms"]
        await until(lambda: running.git()["fetched_at_ms"] > fetched_at + 150, "more fetches")
        later = [e for e in running.orchestrator.bus.history(">") if e.topic == "orch.reconcile.rejected"]
        assert len(later) == 1  # the same revision is not validated (and reported) again
        assert await running.version() == "2"
    finally:
        await running.orchestrator.stop(2)


async def test_a_fetch_error_is_reported_and_the_running_revision_keeps_serving(
    following: Following, caplog: pytest.LogCaptureFixture
) -> None:
    subprocess.run(["git", "-C", str(following.repo.bare), "branch", "-q", "-m", "main", "gone"], check=True)
    with pytest.raises(SourceError, match=r"cannot fetch .*\(main\)"):
        await following.orchestrator.reconcile()
    git = following.git()
    assert "cannot fetch" in git["error"] and git["error_at_ms"] is not None
    assert git["applied_revision"] is not None and await following.version() == "1"
    with caplog.at_level(logging.WARNING, logger="orchestrator.control.follow"):
        for _ in range(3):  # the interval's fetches: logged once, not every time
            await following.orchestrator._git_tick()
    assert sum("cannot fetch" in r.getMessage() for r in caplog.records) <= 1
    assert "cannot fetch" in following.git()["error"]

    subprocess.run(["git", "-C", str(following.repo.bare), "branch", "-q", "-m", "gone", "main"], check=True)
    await following.orchestrator.reconcile()
    assert following.git()["error"] is None


# -- start-up ---------------------------------------------------------------------------------------
async def test_a_first_revision_that_is_rejected_starts_nothing(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    bad = repo.commit({"config.yaml": "version: 1\ncapsules:\n  ver:\n    path: caps/missing\n"})
    with pytest.raises(RevisionRejected) as caught:
        await start(tmp_path, repo)
    assert caught.value.revision == bad and "caps/missing" in str(caught.value)
    # the state dir was released: another orchestrator may start on it
    repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 1)})
    running = await start(tmp_path, repo)
    await running.orchestrator.stop(2)


async def test_a_restart_on_a_broken_branch_runs_the_revision_applied_last(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    good = repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 4)})
    running = await start(tmp_path, repo)
    await running.orchestrator.stop(2)
    bad = repo.commit({"config.yaml": CONFIG + "bogus: 1\n"})
    running = await start(tmp_path, repo)
    try:
        assert await running.version() == "4"
        git = running.git()
        assert git["applied_revision"] == good and git["rejected"]["revision"] == bad
        assert running.orchestrator.info()["desired"]["rejected"]["revision"] == bad
    finally:
        await running.orchestrator.stop(2)
    subprocess.run(["git", "-C", str(repo.bare), "branch", "-q", "-m", "main", "gone"], check=True)
    running = await start(tmp_path, repo)  # the branch cannot be fetched: the local clone has it
    try:
        assert await running.version() == "4" and "cannot fetch" in running.git()["error"]
    finally:
        await running.orchestrator.stop(2)


async def test_an_unreachable_repository_at_the_first_start_is_an_error(tmp_path: Path) -> None:
    follower = GitFollower(
        GitRef.parse(f"git+file://{tmp_path}/missing.git#main"), state_dir=tmp_path / "state", workspace=tmp_path
    )
    orchestrator = Orchestrator(follow=follower)
    with pytest.raises(SourceError, match="cannot fetch"):
        await orchestrator.prepare()
    await orchestrator.stop(2)


# -- builds -----------------------------------------------------------------------------------------
BUILT = {
    "config.yaml": CONFIG,
    "caps/ver/src.wat": module(8),
    "caps/ver/Capsule.toml": MANIFEST.format(name="ver", description="v", extra="").replace(
        '[[tool]]\nname = "version"\n',
        '[[tool]]\nname = "version"\n\n[build]\ncommand = "cp src.wat v.wat"\nwatch = ["src.wat"]\n',
    ),
}


async def test_builds_are_off_for_a_git_source(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    bad = repo.commit(BUILT)  # sources only: no module
    with pytest.raises(RevisionRejected) as caught:
        await start(tmp_path, repo)
    assert caught.value.revision == bad and "v.wat" in str(caught.value)
    assert not (tmp_path / "state" / "git" / "checkouts" / bad / "caps" / "ver" / "v.wat").exists()  # never ran


async def test_allow_builds_builds_a_module_the_revision_lacks(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit(BUILT)
    running = await start(tmp_path, repo, builds=True)
    try:
        assert await running.version() == "8"
    finally:
        await running.orchestrator.stop(2)


# -- local files: the revision follows HEAD ---------------------------------------------------------
async def test_local_mode_shows_a_new_commit_without_a_reconcile(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    first = repo.commit({"config.yaml": CONFIG + "state_dir: state\n", **capsule("caps/ver", 1)})
    orchestrator = Orchestrator(repo.work / "config.yaml", watch=False)
    await orchestrator.start()
    try:
        assert orchestrator.info()["git_revision"] == first[:12]
        assert orchestrator.info()["git"] is None
        second = repo.commit({"README.md": "notes\n"})  # config.yaml untouched: nothing to apply
        assert orchestrator.info()["git_revision"] == second[:12]
        repo.git("checkout", "-q", "--detach", first)
        assert orchestrator.info()["git_revision"] == first[:12]
        (repo.work / "config.yaml").write_text(CONFIG + "state_dir: state\n# edited\n")
        repo.git("checkout", "-q", "main")  # (keeps the edit): HEAD moved, then `-dirty` is found
        await until(lambda: orchestrator.info()["git_revision"] == f"{second[:12]}-dirty", "dirty")
    finally:
        await orchestrator.stop(2)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"git": "x"}',
        '{"git": {"source": "git+file:///other.git#main:config.yaml", "applied_revision": "' + "a" * 40 + '"}}',
        '{"git": {"source": "SOURCE", "applied_revision": 7}}',
        '{"git": {"source": "SOURCE", "applied_revision": "../../etc"}}',
    ],
)
def test_a_malformed_or_foreign_applied_record_names_no_revision_to_start_from(tmp_path: Path, text: str) -> None:
    source = GitRef.parse("git+file:///srv/deploy.git#main:config.yaml")
    (tmp_path / "applied.json").write_text(text.replace("SOURCE", str(source)))
    assert last_applied_revision(tmp_path, source) is None


def test_an_orchestrator_needs_a_config_or_a_branch() -> None:
    with pytest.raises(TypeError, match="config_path"):
        Orchestrator()
