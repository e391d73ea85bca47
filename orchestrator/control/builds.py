"""The dev loop's build step: when a capsule's sources change, run its `[build] command`.

A change to a file matching the manifest's `[build] watch` globs (relative to the capsule
folder) runs the command in the folder, output captured. One build per folder at a time;
changes during a build queue exactly one more. A source whose content is what the last build
saw does not trigger a build (a build that touches its sources, a formatter, an editor
saving twice), and files the build writes (its `.wasm`) are not sources, so a build never
triggers itself. The new `.wasm` is then picked up by the watcher like any other change.
After the watcher's rescan (events may have been missed) `rescan()` builds a folder whose
sources differ from what its last build saw, or that has not been built by this process.

Builds run only when enabled (`Builder(enabled=...)`; the runtime turns them off for
sources it did not write itself, e.g. git or a lattice): a disabled builder never runs a
command, and says so once per folder in the log.

Each build runs `sh -c COMMAND` in a new session, so in its own process group, with stdin
from /dev/null. When the shell exits, on its timeout and on `close()`, the whole group is
ended (SIGTERM, then SIGKILL after `KILL_GRACE_SECONDS`): nothing a build started outlives
it, unless it left the group itself (`setsid`, a daemon that double-forks into a new session).
Output (stdout and stderr together) is kept up to its last `OUTPUT_KEEP` bytes while it
runs, so a build that prints gigabytes costs no memory; events carry the last `OUTPUT_TAIL`
characters.

Glob semantics of `[build] watch` (one matcher: `matches()` for a changed file and
`sources()` for the files a build reads use the same rules):
- a pattern is `/`-separated and relative to the capsule folder; `.` and empty segments
  are ignored (`./src//*.ts` is `src/*.ts`); matching is case-sensitive;
- `*` matches any characters within one segment, never a `/` (`src/*.ts` matches
  `src/a.ts`, not `src/lib/a.ts`); it matches names starting with a dot too;
- `?` matches one character except `/`; `[abc]`, `[a-z]` and `[!abc]` one character of
  (or not of) a set;
- `**` as a whole segment matches zero or more folders (`src/**/*.ts` matches `src/a.ts`
  and `src/x/y/a.ts`; a trailing `src/**` matches every file below `src`); `**` inside a
  segment (`a**b`) is just two `*`;
- a pattern that is absolute or has a `..` segment matches nothing (a warning names it):
  sources live inside the capsule folder;
- files in the folders the watcher ignores (node_modules, .git, ...) are never sources,
  and symlinked folders are not followed.

Used by the runtime. Publishes `orch.capsule.<name>.build_started`, `.build_succeeded` and
`.build_failed` (with the output's tail) for every deployment of the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..capsule.bus import EventBus
from ..desired.manifest import Build

logger = logging.getLogger(__name__)

OUTPUT_TAIL = 4000
OUTPUT_KEEP = 64 * 1024
BUILD_TIMEOUT_SECONDS = 600.0
KILL_GRACE_SECONDS = 2.0
MAX_PATTERN_CHARS = 1024
IGNORED_DIRS = frozenset({"node_modules", ".git", ".hg", ".svn", "__pycache__", ".orch", ".venv", ".mypy_cache"})
"""Never searched for sources: the folders the watcher ignores (its IGNORED_DIRS; the two
modules may not import each other, and a test checks that the sets agree)."""

# -- the glob matcher -----------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _segments(pattern: str) -> tuple[str, ...] | None:
    """The pattern's segments, or None for a pattern that can match nothing inside a folder."""
    if pattern.startswith("/") or len(pattern) > MAX_PATTERN_CHARS or "\0" in pattern:
        logger.warning("[build] watch pattern %r matches nothing: it must be a relative path", pattern[:100])
        return None
    parts = tuple(p for p in pattern.split("/") if p not in ("", "."))
    if ".." in parts:
        logger.warning("[build] watch pattern %r matches nothing: '..' leaves the capsule folder", pattern[:100])
        return None
    if parts[-1:] == ("**",):  # a trailing ** matches what is inside, not the folder itself
        parts = (*parts[:-1], "*", "**")
    return parts or None


def _advance(pattern: tuple[str, ...], states: frozenset[int], segment: str) -> frozenset[int]:
    """The pattern positions reachable after matching one more path segment."""
    reached: set[int] = set()
    for index in states:
        if index == len(pattern):
            continue
        token = pattern[index]
        if token == "**":
            reached.add(index)  # ** takes this segment and may take more
        elif fnmatch.fnmatchcase(segment, token):
            reached.add(index + 1)
    return _closure(pattern, reached)


def _closure(pattern: tuple[str, ...], states: Iterable[int]) -> frozenset[int]:
    """Add the positions after each `**` (it may match zero segments)."""
    out = set(states)
    pending = list(out)
    while pending:
        index = pending.pop()
        if index < len(pattern) and pattern[index] == "**" and index + 1 not in out:
            out.add(index + 1)
            pending.append(index + 1)
    return frozenset(out)


def glob_match(pattern: str, relative: str) -> bool:
    """Whether the `/`-separated `relative` path matches `pattern` (the module's semantics)."""
    parts = _segments(pattern)
    if parts is None:
        return False
    states = _closure(parts, (0,))
    for segment in relative.split("/"):
        states = _advance(parts, states, segment)
        if not states:
            return False
    return len(parts) in states


def matches(build: Build, folder: Path, path: Path) -> bool:
    """Whether `path` is one of the build's sources (a `watch` glob match)."""
    try:
        relative = path.relative_to(folder)
    except ValueError:
        return False
    if not relative.parts or any(part in IGNORED_DIRS for part in relative.parts[:-1]):
        return False
    return any(glob_match(pattern, relative.as_posix()) for pattern in build.watch)


def sources(folder: Path, build: Build) -> list[Path]:
    """Every file under `folder` that a `watch` glob matches, sorted. Only folders that
    some pattern could still match below are walked."""
    patterns = [parts for parts in map(_segments, build.watch) if parts is not None]
    if not patterns:
        return []
    found: list[Path] = []
    start = [_closure(parts, (0,)) for parts in patterns]
    stack: list[tuple[Path, list[frozenset[int]]]] = [(folder, start)]
    while stack:
        directory, states = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            after = [_advance(parts, s, entry.name) for parts, s in zip(patterns, states, strict=True)]
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir:
                if entry.name not in IGNORED_DIRS and any(
                    any(i < len(parts) for i in s) for parts, s in zip(patterns, after, strict=True)
                ):
                    stack.append((Path(entry.path), after))
            elif is_file and any(len(parts) in s for parts, s in zip(patterns, after, strict=True)):
                found.append(Path(entry.path))
    return sorted(found)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def _digests(folder: Path, build: Build) -> dict[Path, str]:
    return {path: _digest(path) for path in sources(folder, build)}


# -- the builder ----------------------------------------------------------------------------


@dataclass
class _FolderState:
    running: asyncio.Task[None] | None = None
    again: bool = False
    built: bool = False
    seen: dict[Path, str] = field(default_factory=dict)  # source -> content hash the last build saw


class Builder:
    """Runs build commands for capsule folders, never two at once for one folder."""

    def __init__(
        self,
        *,
        bus: EventBus,
        enabled: bool = True,
        timeout: float = BUILD_TIMEOUT_SECONDS,
        on_finished: Callable[[list[str], int, str], None] | None = None,
    ) -> None:
        self.enabled = enabled
        self._bus = bus
        self._on_finished = on_finished  # (deployment names, exit code, output tail) after each build
        self._timeout = timeout
        self._folders: dict[Path, _FolderState] = {}
        self._told_off: set[Path] = set()
        self._closed = False

    def changed(self, folder: Path, build: Build, paths: Iterable[Path], names: list[str]) -> bool:
        """Note changed files; start (or queue) a build if a source really changed."""
        state = self._folders.setdefault(folder, _FolderState())
        changed = [p for p in paths if matches(build, folder, p)]
        if not changed or all(state.seen.get(p) == _digest(p) for p in changed):
            return False
        return self._request(folder, build, names, check=False)

    def rescan(self, folder: Path, build: Build, names: list[str]) -> bool:
        """After a watcher rescan: build if a source differs from what the last build saw
        (added, removed or edited), or if this process has not built the folder yet."""
        if not build.watch:
            return False
        self._folders.setdefault(folder, _FolderState())
        return self._request(folder, build, names, check=True)

    def _request(self, folder: Path, build: Build, names: list[str], *, check: bool) -> bool:
        if self._closed:
            return False
        if not self.enabled:
            if folder not in self._told_off:
                self._told_off.add(folder)
                logger.info(
                    "capsule folder %s: sources changed, but builds are off (not running %r)", folder, build.command
                )
            return False
        state = self._folders[folder]
        if state.running is not None and not state.running.done():
            state.again = True
            return True
        state.running = asyncio.get_running_loop().create_task(
            self._run(folder, build, names, check=check), name=f"build-{folder.name}"
        )
        return True

    async def idle(self) -> None:
        """Wait for every running build (tests and shutdown)."""
        while running := [s.running for s in self._folders.values() if s.running and not s.running.done()]:
            await asyncio.gather(*running, return_exceptions=True)

    async def close(self) -> None:
        """Stop every build: each one's whole process group is ended before this returns."""
        self._closed = True
        running = [s.running for s in self._folders.values() if s.running is not None and not s.running.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _run(self, folder: Path, build: Build, names: list[str], *, check: bool) -> None:
        state = self._folders[folder]
        while True:
            state.again = False
            seen = await asyncio.to_thread(_digests, folder, build)
            if check and state.built and seen == state.seen:
                return  # a rescan found the sources as the last build saw them
            check = False
            state.seen, state.built = seen, True
            await self._build_once(folder, build, names)
            if not state.again:
                return

    async def _build_once(self, folder: Path, build: Build, names: list[str]) -> None:
        self._publish(names, "build_started", {"command": build.command})
        started = time.perf_counter()
        stop = asyncio.Event()
        # The command runs in a task of its own that is never cancelled: cancelling this one
        # (close()) tells it to stop, and it ends the process group however far it got.
        command = asyncio.ensure_future(self._run_command(folder, build, stop))
        try:
            code, text = await asyncio.shield(command)
        except asyncio.CancelledError:
            logger.info("build of %s stopped: shutting down", folder)
            stop.set()
            await command
            raise
        self._finished(folder, build, names, code=code, text=text, started=started)

    async def _run_command(self, folder: Path, build: Build, stop: asyncio.Event) -> tuple[int | None, str]:
        """Run the command until it exits, times out or `stop` is set; then end its group."""
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_shell(
                lambda: _BuildProtocol(loop),
                build.command,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, ended as a whole
            )
        except OSError as error:
            return -1, f"cannot run the build: {error}"
        note = ""
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        exited: asyncio.Future[Any] = protocol.exited
        try:
            done, _ = await asyncio.wait({exited, stopped}, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                note = f"\n(build killed after {self._timeout:g} s)"
        finally:
            stopped.cancel()
            await _end_group(transport.get_pid(), protocol.exited)  # and what it left running
            if not await protocol.pipes_closed():
                note += "\n(output incomplete: a process the build started left its group and holds it)"
            transport.close()
        return transport.get_returncode(), protocol.output.decode("utf-8", "replace") + note

    def _finished(
        self, folder: Path, build: Build, names: list[str], *, code: int | None, text: str, started: float
    ) -> None:
        seconds = round(time.perf_counter() - started, 3)
        tail = text[-OUTPUT_TAIL:]
        if self._on_finished is not None:
            self._on_finished(names, -1 if code is None else code, "" if code == 0 else tail)
        if code == 0:
            logger.info("build of %s succeeded in %.1f s", folder, seconds)
            self._publish(names, "build_succeeded", {"command": build.command, "seconds": seconds})
            return
        logger.warning("build of %s failed (exit %s) after %.1f s:\n%s", folder, code, seconds, tail)
        self._publish(
            names,
            "build_failed",
            {"command": build.command, "exit_code": code, "seconds": seconds, "output": tail},
        )

    def _publish(self, names: list[str], event: str, payload: dict[str, object]) -> None:
        for name in names:
            self._bus.publish(f"orch.capsule.{name}.{event}", {"capsule": name, **payload})


class _BuildProtocol(asyncio.SubprocessProtocol):
    """Collects a build's output (its last OUTPUT_KEEP bytes) and says when the shell has
    exited (`exited`, at once: not after every pipe closed, as `Process.wait()` on 3.11)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        self.output += data
        if len(self.output) > OUTPUT_KEEP:
            del self.output[: len(self.output) - OUTPUT_KEEP]

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    async def pipes_closed(self) -> bool:
        """Whether the output pipe closed (every process holding it ended) in a grace period."""
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), KILL_GRACE_SECONDS)
        except TimeoutError:
            return False
        return True


def _signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its user: nothing more we may do
        logger.warning("build process group %d: not allowed to signal it", pgid)
        return False
    return True


async def _end_group(pgid: int, exited: asyncio.Future[None]) -> None:
    """SIGTERM the build's process group and SIGKILL it after the grace period (at once
    when the shell has already exited); return once the shell has exited. The shell is a
    session leader: its pid is the group's id."""
    if not exited.done() and _signal_group(pgid, signal.SIGTERM):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), KILL_GRACE_SECONDS)
    _signal_group(pgid, signal.SIGKILL)
    await asyncio.shield(exited)
