"""The file watcher on real files with real watchfiles: ready when `start()` returns, symlinked
folders, recovery with a rescan after the watch fails (EMFILE) or a watched folder is removed
and recreated, and the running orchestrator serving what was written while a watch was down.

Every wait is on a reported batch, with a generous deadline as a backstop.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from orchestrator.control.runtime import Orchestrator
from orchestrator.control.watcher import Changes, Watcher
from tests.awaiting import first_match
from tests.test_orchestrate import CONFIG, Running, write_capsule

DEADLINE = 15.0


class Stream:
    """One reader of a watcher's batches."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self._batches = watcher.changes()

    async def until(self, predicate: Callable[[Changes], bool], what: str) -> Changes:
        return await first_match(self._batches, predicate, f"a batch: {what}", deadline=DEADLINE)

    async def close(self) -> None:
        await self.watcher.close()
        await self._batches.aclose()


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Callable[..., Stream]]:
    made: list[Stream] = []

    def make(**options: float) -> Stream:
        stream = Stream(Watcher(config_path=tmp_path / "config.yaml", **options))  # type: ignore[arg-type]
        made.append(stream)
        return stream

    (tmp_path / "config.yaml").write_text("version: 1\n")
    yield make
    for stream in made:
        await stream.close()


def touched(folder: Path, path: Path) -> Callable[[Changes], bool]:
    return lambda changes: path in changes.folders.get(folder, set())


@pytest.mark.parametrize("polling", [False, True])
async def test_a_change_made_right_after_start_is_reported(
    tmp_path: Path, watch: Callable[..., Stream], monkeypatch: pytest.MonkeyPatch, polling: bool
) -> None:
    monkeypatch.setenv("WATCHFILES_FORCE_POLLING", "true" if polling else "false")
    monkeypatch.setenv("WATCHFILES_POLL_DELAY_MS", "20")
    for attempt in range(5):  # each a fresh watcher: start() must mean "watching"
        folder = tmp_path / f"caps{attempt}"
        folder.mkdir()
        stream = watch()
        await stream.watcher.start([folder])
        assert stream.watcher.watching
        (folder / "new.wasm").write_bytes(b"\0asm")
        await stream.until(touched(folder, folder / "new.wasm"), f"attempt {attempt}")
        await stream.close()


async def test_the_config_file_is_watched_and_other_files_beside_it_are_not(
    tmp_path: Path, watch: Callable[..., Stream]
) -> None:
    stream = watch()
    await stream.watcher.start([])
    (tmp_path / "notes.txt").write_text("not the config")
    (tmp_path / "config.yaml").write_text("version: 1\ncapsules: {}\n")
    changes = await stream.until(bool, "config change")
    assert changes.config and not changes.rescan and changes.folders == {}


async def test_a_symlinked_config_is_seen_when_its_target_changes(tmp_path: Path, watch: Callable[..., Stream]) -> None:
    elsewhere = tmp_path / "repo"
    elsewhere.mkdir()
    (elsewhere / "real.yaml").write_text("version: 1\n")
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "config.yaml").symlink_to(elsewhere / "real.yaml")
    stream = watch()
    await stream.watcher.start([])
    (elsewhere / "real.yaml").write_text("version: 1\ncapsules: {}\n")
    await stream.until(lambda c: c.config, "config target change")


async def test_a_symlinked_folder_reports_changes_for_every_twin(tmp_path: Path, watch: Callable[..., Stream]) -> None:
    real = tmp_path / "releases" / "hello"
    real.mkdir(parents=True)
    link = tmp_path / "hello-link"
    link.symlink_to(real, target_is_directory=True)
    alone = tmp_path / "alone-link"  # a link whose target is not configured itself
    (tmp_path / "releases" / "alone").mkdir()
    alone.symlink_to(tmp_path / "releases" / "alone", target_is_directory=True)
    stream = watch()
    await stream.watcher.start([real, link, alone])
    (real / "hello.wasm").write_bytes(b"\0asm")
    changes = await stream.until(lambda c: real in c.folders and link in c.folders, "both twins")
    assert changes.folders[real] == {real / "hello.wasm"}
    assert changes.folders[link] == {link / "hello.wasm"}
    (tmp_path / "releases" / "alone" / "a.wasm").write_bytes(b"\0asm")
    await stream.until(touched(alone, alone / "a.wasm"), "the lone link")


async def test_a_retargeted_symlink_folder_rescans_and_watches_the_new_target(
    tmp_path: Path, watch: Callable[..., Stream]
) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    current = tmp_path / "current"
    current.symlink_to(v1, target_is_directory=True)
    stream = watch()
    await stream.watcher.start([current])
    swap = tmp_path / "current.new"
    swap.symlink_to(v2, target_is_directory=True)
    os.replace(swap, current)  # how deployments switch releases: an atomic rename
    changes = await stream.until(lambda c: c.rescan, "rescan after the switch")
    assert changes.config and current in changes.folders
    (v2 / "x.wasm").write_bytes(b"\0asm")
    await stream.until(touched(current, current / "x.wasm"), "a change in the new target")


async def test_a_removed_and_recreated_folder_is_watched_again(tmp_path: Path, watch: Callable[..., Stream]) -> None:
    folder, other = tmp_path / "caps" / "a", tmp_path / "caps" / "b"
    folder.mkdir(parents=True)
    other.mkdir()
    stream = watch()
    await stream.watcher.start([folder, other])
    shutil.rmtree(folder)
    await stream.until(lambda c: c.rescan, "rescan after the removal")
    folder.mkdir()
    (folder / "late.wasm").write_bytes(b"\0asm")  # written while nothing watched the new folder
    changes = await stream.until(lambda c: c.rescan, "rescan once the folder is back")
    assert set(changes.folders) == {folder, other}
    assert stream.watcher.restarts >= 2
    (folder / "later.wasm").write_bytes(b"\0asm")
    await stream.until(touched(folder, folder / "later.wasm"), "a change in the recreated folder")
    (other / "o.wasm").write_bytes(b"\0asm")
    await stream.until(touched(other, other / "o.wasm"), "the other folder still watched")


def _lowest_free_fd() -> int:
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    return probe


async def test_a_watch_that_cannot_start_emfile_retries_and_rescans(
    tmp_path: Path, watch: Callable[..., Stream]
) -> None:
    folder = tmp_path / "caps"
    folder.mkdir()
    stream = watch(retry_base=0.01, retry_max=0.05)
    handle = open(folder / "late.wasm", "wb")  # noqa: SIM115 - opened before the fds run out
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))  # no new fd: EMFILE
    try:
        await stream.watcher.start([folder])
        assert not stream.watcher.watching
        handle.write(b"\0asm written while the watch was down")
        handle.close()
    finally:
        handle.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # each watch (config, folders) reports its own rescan when it runs again: wait for both
    changes = await stream.until(lambda c: c.rescan and stream.watcher.watching, "rescan once both run")
    assert changes.config and folder in changes.folders and stream.watcher.restarts >= 1
    (folder / "next.wasm").write_bytes(b"\0asm")
    await stream.until(touched(folder, folder / "next.wasm"), "a change once it runs again")


async def test_a_folder_added_later_is_reported_once_it_is_watched(
    tmp_path: Path, watch: Callable[..., Stream]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    stream = watch()
    await stream.watcher.start([first])
    stream.watcher.set_folders([first, second])
    await stream.watcher.settled()
    joined = await stream.until(lambda c: second in c.folders, "the new folder")
    assert joined.folders[second] == set() and not joined.rescan  # re-read it, it may have changed
    (second / "s.wasm").write_bytes(b"\0asm")
    await stream.until(touched(second, second / "s.wasm"), "a change in the new folder")
    (first / "f.wasm").write_bytes(b"\0asm")
    await stream.until(touched(first, first / "f.wasm"), "the first folder still watched")


async def test_ignored_folders_report_nothing(tmp_path: Path, watch: Callable[..., Stream]) -> None:
    folder = tmp_path / "caps"
    (folder / "node_modules").mkdir(parents=True)
    stream = watch()
    await stream.watcher.start([folder])
    (folder / "node_modules" / "dep.js").write_text("x")
    (folder / "main.ts").write_text("x")
    changes = await stream.until(lambda c: folder in c.folders, "main.ts")
    assert changes.folders[folder] == {folder / "main.ts"}


async def test_the_orchestrator_serves_a_wasm_written_while_its_folder_was_gone(tmp_path: Path) -> None:
    folder = tmp_path / "caps" / "ver"
    write_capsule(folder, 1)
    (tmp_path / "config.yaml").write_text(CONFIG)
    orchestrator = Orchestrator(tmp_path / "config.yaml")
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    await orchestrator.start()
    run = Running(orchestrator, events, tmp_path)
    try:
        shutil.rmtree(folder)
        await run.wait_topic("orch.capsule.ver.degraded")  # its folder is gone: its own row says so
        assert await run.version() == "1"
        write_capsule(folder, 7)  # a new folder: no watch on it until the watcher notices
        await run.wait_topic("orch.capsule.ver.reloaded")
        assert await run.version() == "7"
    finally:
        await orchestrator.stop(2)


async def test_close_ends_the_stream_and_is_prompt_while_retrying(tmp_path: Path, watch: Callable[..., Stream]) -> None:
    stream = watch(retry_base=30.0, retry_max=30.0)
    missing = tmp_path / "not-yet"
    await stream.watcher.start([missing])  # a missing folder is waited for, not an error
    assert stream.watcher.watching
    await asyncio.wait_for(stream.watcher.close(), DEADLINE)
    with pytest.raises(StopAsyncIteration):
        await stream._batches.__anext__()
