"""Builds with real subprocesses and real files: one glob meaning for `[build] watch`, builds
only when enabled, every process of a build's group ended on close, on timeout and after the
shell exits, bounded output, rescans.

A build reports its pids through a named pipe the test reads (an awaited event, not a poll);
a process's end is awaited through a pidfd.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from orchestrator.capsule.bus import EventBus, Subscription
from orchestrator.control import builds, watcher
from orchestrator.control.builds import OUTPUT_TAIL, Builder, glob_match, matches, sources
from orchestrator.desired.manifest import Build

DEADLINE = 15.0

GLOBS = [
    # pattern, path, matches
    ("*.ts", "a.ts", True),
    ("*.ts", "lib/a.ts", False),  # * stays within a folder
    ("*.ts", ".hidden.ts", True),
    ("src/*.txt", "src/v.txt", True),
    ("src/*.txt", "src/deep/v.txt", False),
    ("src/**/*.ts", "src/a.ts", True),  # ** matches zero folders
    ("src/**/*.ts", "src/x/y/a.ts", True),
    ("src/**/*.ts", "other/a.ts", False),
    ("src/**", "src/x/y/z", True),
    ("src/**", "src", False),
    ("**", "a/b/c.rs", True),
    ("**/*.rs", "main.rs", True),
    ("**/build/*.rs", "x/build/a.rs", True),
    ("**/build/*.rs", "x/build/y/a.rs", False),
    ("a**b.ts", "axyb.ts", True),  # ** inside a segment is two *
    ("a**b.ts", "ax/yb.ts", False),
    ("?.c", "a.c", True),
    ("?.c", "ab.c", False),
    ("[ab].c", "b.c", True),
    ("[!ab].c", "b.c", False),
    ("./src//*.ts", "src/a.ts", True),
    ("Src/*.ts", "src/a.ts", False),  # case-sensitive
    ("../*.ts", "a.ts", False),  # never outside the folder
    ("src/../*.ts", "a.ts", False),
    ("/etc/*", "etc/passwd", False),
    ("", "a", False),
    ("x" * 5000, "x" * 5000, False),  # absurdly long: matches nothing
    ("*/" * 200 + "*", "a/" * 200 + "b", True),  # deep but polynomial
    ("**/" * 300 + "z", "a/" * 50 + "y", False),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), GLOBS)
def test_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert glob_match(pattern, path) is expected


TREE = [
    "a.ts",
    ".hidden.ts",
    "lib/b.ts",
    "lib/deep/c.ts",
    "src/v.txt",
    "src/deep/w.txt",
    "node_modules/dep/index.ts",
    "README.md",
]


@pytest.mark.parametrize(
    "patterns", [["*.ts"], ["**/*.ts"], ["lib/**"], ["src/*.txt", "lib/*.ts"], ["**"], ["../*", "*.md"]]
)
def test_sources_and_matches_agree(tmp_path: Path, patterns: list[str]) -> None:
    for name in TREE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / "linked").symlink_to(tmp_path / "lib", target_is_directory=True)  # not followed
    build = Build(command="true", watch=patterns)
    every = sorted(p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink())
    assert sources(tmp_path, build) == [p for p in every if matches(build, tmp_path, p)]
    assert all("node_modules" not in p.parts for p in sources(tmp_path, build))


def test_the_builder_skips_the_folders_the_watcher_ignores() -> None:
    assert builds.IGNORED_DIRS == watcher.IGNORED_DIRS


# -- running builds ---------------------------------------------------------------------------


@pytest.fixture
async def bus() -> AsyncIterator[EventBus]:
    bus = EventBus()
    yield bus
    bus.close()


@pytest.fixture
async def make_builder(bus: EventBus) -> AsyncIterator[Callable[..., Builder]]:
    """Builders that are closed after the test, whatever happens (no build outlives it)."""
    made: list[Builder] = []

    def make(**options: object) -> Builder:
        builder = Builder(bus=bus, **options)  # type: ignore[arg-type]
        made.append(builder)
        return builder

    yield make
    for builder in made:
        await builder.close()


async def next_event(events: Subscription, topic: str) -> dict[str, object]:
    async def scan() -> dict[str, object]:
        async for event in events:
            if event.topic == topic:
                return dict(event.payload)
        raise AssertionError("bus closed")

    return await asyncio.wait_for(scan(), DEADLINE)


async def read_pids(fifo: Path) -> list[int]:
    """The pids a build wrote to the named pipe (blocks until it has written them)."""
    text = await asyncio.wait_for(asyncio.to_thread(fifo.read_text), DEADLINE)
    return [int(word) for word in text.split()]


async def read_pids_text(fifo: Path) -> str:
    return await asyncio.wait_for(asyncio.to_thread(fifo.read_text), DEADLINE)


async def exited(pid: int) -> None:
    """Return once process `pid` (any process, not only a child) has ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
    try:
        await asyncio.wait_for(ended, DEADLINE)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are alive (zombies are dead: their parent may be an
    init that does not reap)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def capsule(tmp_path: Path) -> Path:
    folder = tmp_path / "cap"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.ts").write_text("v1")
    os.mkfifo(tmp_path / "pids")
    return folder


SLEEPER = 'sleep 1000 & echo $$ $! > "{fifo}"; wait'


async def test_close_ends_every_process_of_a_running_build(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = capsule(tmp_path)
    builder = make_builder()
    build = Build(command=SLEEPER.format(fifo=tmp_path / "pids"), watch=["src/*.ts"])
    assert builder.changed(folder, build, [folder / "src" / "main.ts"], ["cap"])
    shell, sleeper = await read_pids(tmp_path / "pids")
    assert os.getpgid(sleeper) == shell  # the build's own group, led by its shell
    assert os.getpgid(shell) != os.getpgid(0)
    await builder.close()
    await exited(shell)
    await exited(sleeper)
    assert live_members(shell) == []
    assert not builder.changed(folder, build, [folder / "src" / "main.ts"], ["cap"])  # closed: no new builds


async def test_a_build_past_its_timeout_is_killed_with_its_group(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = capsule(tmp_path)
    events = bus.subscribe("orch.capsule.cap.>")
    builder = make_builder(timeout=0.5)
    build = Build(command=SLEEPER.format(fifo=tmp_path / "pids"), watch=["src/*.ts"])
    builder.changed(folder, build, [folder / "src" / "main.ts"], ["cap"])
    shell, sleeper = await read_pids(tmp_path / "pids")
    failed = await next_event(events, "orch.capsule.cap.build_failed")
    assert "build killed after 0.5 s" in str(failed["output"])
    await exited(sleeper)
    assert live_members(shell) == []
    await builder.close()


async def test_what_a_finished_build_left_running_is_ended(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = capsule(tmp_path)
    events = bus.subscribe("orch.capsule.cap.>")
    builder = make_builder()
    command = 'sleep 1000 & echo $$ $! > "{fifo}"; exit 0'.format(fifo=tmp_path / "pids")
    builder.changed(folder, Build(command=command, watch=["src/*.ts"]), [folder / "src" / "main.ts"], ["cap"])
    shell, sleeper = await read_pids(tmp_path / "pids")
    await next_event(events, "orch.capsule.cap.build_succeeded")  # the leftover held stdout open
    await exited(sleeper)
    assert live_members(shell) == []
    await builder.close()


async def test_a_disabled_builder_never_runs_and_says_so_once_per_folder(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder], caplog: pytest.LogCaptureFixture
) -> None:
    folders = [tmp_path / "one", tmp_path / "two"]
    builder = make_builder(enabled=False)
    events = bus.subscribe(">")
    caplog.set_level(logging.INFO, logger="orchestrator.control.builds")
    for round_ in range(3):
        for folder in folders:
            folder.mkdir(exist_ok=True)
            (folder / "main.ts").write_text(f"edit {round_}")
            build = Build(command="touch built", watch=["*.ts"])
            assert not builder.changed(folder, build, [folder / "main.ts"], [folder.name])
            assert not builder.rescan(folder, build, [folder.name])
    await builder.idle()
    assert events.drain() == []
    assert not any((folder / "built").exists() for folder in folders)
    told = [r.getMessage() for r in caplog.records if "builds are off" in r.getMessage()]
    assert len(told) == 2 and all(any(str(f) in m for m in told) for f in folders)


async def test_output_is_bounded_and_undecodable_bytes_are_replaced(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = capsule(tmp_path)
    events = bus.subscribe("orch.capsule.cap.>")
    builder = make_builder()
    command = "head -c 20000000 /dev/zero | tr '\\0' x; printf '\\377 the end' >&2; exit 3"
    builder.changed(folder, Build(command=command, watch=["src/*.ts"]), [folder / "src" / "main.ts"], ["cap"])
    failed = await next_event(events, "orch.capsule.cap.build_failed")
    output = str(failed["output"])
    assert failed["exit_code"] == 3 and len(output) == OUTPUT_TAIL
    assert output.endswith("x\ufffd the end")
    await builder.close()


async def test_a_command_that_cannot_start_is_a_failed_build(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = capsule(tmp_path)
    events = bus.subscribe("orch.capsule.cap.>")
    builder = make_builder()
    build = Build(command="no-such-tool-anywhere --build", watch=["src/*.ts"])
    builder.changed(folder, build, [folder / "src" / "main.ts"], ["cap"])
    failed = await next_event(events, "orch.capsule.cap.build_failed")
    assert failed["exit_code"] == 127 and "not found" in str(failed["output"])
    await builder.close()


async def test_rescan_builds_only_what_changed_since_the_last_build(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = tmp_path / "cap"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.ts").write_text("v1")
    events = bus.subscribe("orch.capsule.cap.build_started")
    builder = make_builder()
    build = Build(command="echo built >> log", watch=["src/**/*.ts"])
    assert builder.rescan(folder, build, ["cap"])  # never built by this process: build
    await builder.idle()
    assert builder.rescan(folder, build, ["cap"])  # checks the sources...
    await builder.idle()
    assert len(events.drain()) == 1  # ...which the last build saw as they are
    (folder / "src" / "new").mkdir()
    (folder / "src" / "new" / "added.ts").write_text("x")  # no change event: the watch was down
    builder.rescan(folder, build, ["cap"])
    await builder.idle()
    assert len(events.drain()) == 1
    (folder / "src" / "main.ts").unlink()
    builder.rescan(folder, build, ["cap"])
    await builder.idle()
    assert len(events.drain()) == 1
    assert (folder / "log").read_text() == "built\n" * 3
    await builder.close()


async def test_changes_during_a_build_queue_exactly_one_more(
    tmp_path: Path, bus: EventBus, make_builder: Callable[..., Builder]
) -> None:
    folder = capsule(tmp_path)
    go = tmp_path / "go"
    os.mkfifo(go)
    events = bus.subscribe("orch.capsule.cap.build_started")
    builder = make_builder()
    command = 'echo running > "{ready}"; cat "{go}" > /dev/null; echo run >> log'
    build = Build(command=command.format(ready=tmp_path / "pids", go=go), watch=["src/*"])
    source = folder / "src" / "main.ts"
    assert builder.changed(folder, build, [source], ["cap"])
    await read_pids_text(tmp_path / "pids")  # the first build is running
    for edit in range(5):
        source.write_text(f"edit {edit}")
        assert builder.changed(folder, build, [source], ["cap"])
    assert not builder.changed(folder, build, [folder / "log"], ["cap"])  # not a source
    await asyncio.to_thread(go.write_text, "go")  # the first build ends
    await read_pids_text(tmp_path / "pids")  # the one queued after it runs
    await asyncio.to_thread(go.write_text, "go")
    await builder.idle()
    assert len(events.drain()) == 2
    assert (folder / "log").read_text() == "run\nrun\n"
    await builder.close()
