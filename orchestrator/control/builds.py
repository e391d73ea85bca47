"""The dev loop's build step: when a capsule's sources change, run its `[build] command`.

A change to a file matching the manifest's `[build] watch` globs (relative to the capsule
folder) runs the command in the folder, output captured. One build per folder at a time;
changes during a build queue exactly one more. A source whose content is what the last build
saw does not trigger a build (a build that touches its sources, a formatter, an editor
saving twice), and files the build writes (its `.wasm`) are not sources, so a build never
triggers itself. The new `.wasm` is then picked up by the watcher like any other change.

Used by the runtime. Publishes `orch.capsule.<name>.build_started`, `.build_succeeded` and
`.build_failed` (with the output's tail) for every deployment of the folder.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..capsule.bus import EventBus
from ..desired.manifest import Build

logger = logging.getLogger(__name__)

OUTPUT_TAIL = 4000
BUILD_TIMEOUT_SECONDS = 600.0


def matches(build: Build, folder: Path, path: Path) -> bool:
    """Whether `path` is one of the build's sources (a `watch` glob match)."""
    try:
        relative = path.relative_to(folder).as_posix()
    except ValueError:
        return False
    return any(_glob(relative, pattern) for pattern in build.watch)


def _glob(relative: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(relative, pattern):
        return True
    # "dir/**/*.ts" also matches files directly in dir/
    return "/**/" in pattern and fnmatch.fnmatchcase(relative, pattern.replace("/**/", "/", 1))


@dataclass
class _FolderState:
    running: asyncio.Task[None] | None = None
    again: bool = False
    seen: dict[Path, str] = field(default_factory=dict)  # source -> content hash the last build saw


class Builder:
    """Runs build commands for capsule folders, never two at once for one folder."""

    def __init__(self, *, bus: EventBus) -> None:
        self._bus = bus
        self._folders: dict[Path, _FolderState] = {}

    def changed(self, folder: Path, build: Build, paths: Iterable[Path], names: list[str]) -> bool:
        """Note changed files; start (or queue) a build if a source really changed."""
        state = self._folders.setdefault(folder, _FolderState())
        sources = [p for p in paths if matches(build, folder, p)]
        if not sources or all(state.seen.get(p) == _digest(p) for p in sources):
            return False
        if state.running is not None and not state.running.done():
            state.again = True
            return True
        state.running = asyncio.get_running_loop().create_task(self._run(folder, build, names))
        return True

    async def idle(self) -> None:
        """Wait for every running build (tests and shutdown)."""
        while running := [s.running for s in self._folders.values() if s.running and not s.running.done()]:
            await asyncio.gather(*running, return_exceptions=True)

    async def close(self) -> None:
        for state in self._folders.values():
            if state.running is not None:
                state.running.cancel()

    async def _run(self, folder: Path, build: Build, names: list[str]) -> None:
        state = self._folders[folder]
        while True:
            state.again = False
            state.seen = {p: _digest(p) for p in _sources(folder, build)}
            await self._build_once(folder, build, names)
            if not state.again:
                return

    async def _build_once(self, folder: Path, build: Build, names: list[str]) -> None:
        self._publish(names, "build_started", {"command": build.command})
        started = time.perf_counter()
        try:
            process = await asyncio.create_subprocess_shell(
                build.command,
                cwd=folder,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                output, _ = await asyncio.wait_for(process.communicate(), BUILD_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                output, _ = await process.communicate()
                output += f"\n(build killed after {BUILD_TIMEOUT_SECONDS:.0f} s)".encode()
            code = process.returncode
        except OSError as error:
            output, code = str(error).encode(), -1
        text = output.decode("utf-8", "replace")
        seconds = round(time.perf_counter() - started, 3)
        if code == 0:
            self._publish(names, "build_succeeded", {"command": build.command, "seconds": seconds})
        else:
            logger.warning("build of %s failed (exit %s):\n%s", folder, code, text[-OUTPUT_TAIL:])
            self._publish(
                names,
                "build_failed",
                {"command": build.command, "exit_code": code, "seconds": seconds, "output": text[-OUTPUT_TAIL:]},
            )

    def _publish(self, names: list[str], event: str, payload: dict[str, object]) -> None:
        for name in names:
            self._bus.publish(f"orch.capsule.{name}.{event}", {"capsule": name, **payload})


def _sources(folder: Path, build: Build) -> list[Path]:
    found: set[Path] = set()
    for pattern in build.watch:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"
